"""Where an intervention acts: a module role, layers, tokens and (optionally) heads.

A `Site` names a *location kind* (``role``), and which layers, token positions and
attention heads of it. Roles, in the order the model computes them inside one decoder
layer (that order is also the order composed interventions run in):

==================  =============================================================
``resid_pre``       the layer's input (residual stream before the layer), ``[B, T, H]``
``input_layernorm`` the pre-attention norm's output (what attention reads), ``[B, T, H]``
``attn_logits``     the attention scores (attention primitives only)
``attn_output``     the attention block's output after ``o_proj``, ``[B, T, H]``;
                    with ``heads=``, the per-head outputs before ``o_proj``, ``[B, T, nH, d]``
``mlp_output``      the MLP's output, ``[B, T, H]``
``resid_post``      the layer's output (residual stream after the layer), ``[B, T, H]``
==================  =============================================================
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import torch

from nnsight_av.errors import FormatError, InputError, LayerIndexError

from .params import integer
from .selectors import normalize_selector

if TYPE_CHECKING:
    from nnsight_av.model import AVModel

__all__ = ["Site", "ROLES", "ALIASES", "window", "LayerSpec", "POINT_ORDER", "canonical_role"]

ROLES = ("resid_pre", "input_layernorm", "attn_logits", "attn_output", "mlp_output", "resid_post")
#: The one table of site names: every other spelling used in the project, and TransformerLens' names.
ALIASES = {
    "layer_input": "resid_pre", "resid_in": "resid_pre",
    "layer_output": "resid_post", "resid_out": "resid_post",
    "ln1": "input_layernorm", "attn_input": "input_layernorm", "attn_in": "input_layernorm",
    "before_attn": "input_layernorm",
    "attn": "attn_output", "attn_out": "attn_output", "self_attn": "attn_output",
    "mlp": "mlp_output", "mlp_out": "mlp_output",
    "attention": "attn_logits", "attn_scores": "attn_logits", "attn_pattern": "attn_logits",
}
#: Names that meant different things in different modules; each keeps the meaning it had, with a warning.
AMBIGUOUS = {"resid": "resid_post", "residual": "resid_pre"}
#: Hook points inside one decoder layer, in execution order. ``attn_call`` is the attention
#: function call (its mask and output); ``attn_heads`` its per-head output, before ``o_proj``.
POINT_ORDER = {"resid_pre": 0, "input_layernorm": 1, "attn_call": 2, "attn_heads": 3, "attn_output": 4,
               "mlp_output": 5, "resid_post": 6}

LayerSpec = Union[None, int, Sequence[int], range, str]


def window(start: int, size: int) -> range:
    """Layers ``[start, start + size)``, the sliding window of causal tracing.

    >>> list(window(2, 3))
    [2, 3, 4]
    """
    start = integer(start, "a layer window's start")
    size = integer(size, "a layer window's size", lo=1)
    return range(start, start + size)


def canonical_role(role: str) -> str:
    """The canonical name of ``role`` (aliases accepted), or an `InputError` naming the known roles."""
    if not isinstance(role, str):
        raise InputError(f"a site role must be a string, got {type(role).__name__}")
    if role in AMBIGUOUS:
        warnings.warn(f"site name {role!r} is ambiguous (resid_pre: a layer's input, resid_post: its output); "
                      f"it means {AMBIGUOUS[role]!r} here: write that", FutureWarning, stacklevel=3)
        return AMBIGUOUS[role]
    name = ALIASES.get(role, role)
    if name not in ROLES:
        raise InputError(f"unknown site {role!r}; known sites: {', '.join(ROLES)} "
                         f"(aliases: {', '.join(sorted(ALIASES))})")
    return name


def _normalize_layers(layers: Any) -> Any:
    if layers is None or layers == "all":
        return None
    if isinstance(layers, bool):
        raise LayerIndexError(f"layers must be an int, a list of ints, a range or None, got {layers!r}")
    if isinstance(layers, int):
        return layers
    if isinstance(layers, range):
        return layers
    if isinstance(layers, slice):
        for part in ("start", "stop", "step"):
            value = getattr(layers, part)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise LayerIndexError(f"a layer slice's {part} must be an int, got {value!r}")
        if layers.step == 0:
            raise LayerIndexError("a layer slice's step cannot be 0")
        return range(layers.start or 0, layers.stop, layers.step or 1) if layers.stop is not None else layers
    if isinstance(layers, torch.Tensor):
        layers = layers.tolist()
    if isinstance(layers, (list, tuple)):
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise LayerIndexError(f"layer indices must be ints, got {layer!r}")
            out.append(int(layer))
        return tuple(out)
    raise LayerIndexError(f"layers must be an int, a list of ints, a range or None, got {type(layers).__name__}")


def layers_to_json(layers: Any) -> Any:
    if isinstance(layers, range):
        return {"start": layers.start, "stop": layers.stop, "step": layers.step}
    if isinstance(layers, slice):
        return {"start": layers.start or 0, "stop": None, "step": layers.step or 1}
    if isinstance(layers, tuple):
        return list(layers)
    return layers


def layers_from_json(value: Any) -> Any:
    """The layers of `layers_to_json` output; a range dict is checked (`FormatError`) before it is built."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"start", "stop", "step"}
        if unknown:
            raise FormatError(f"a layer range has keys start, stop, step; got unknown {sorted(map(str, unknown))}")
        parts = {"start": value.get("start", 0), "stop": value.get("stop"), "step": value.get("step", 1)}
        for part, number in parts.items():
            if number is None and part == "stop":
                continue
            if isinstance(number, bool) or not isinstance(number, int):
                raise FormatError(f"a layer range's {part} must be an int, got {number!r}")
        if parts["step"] == 0:
            raise FormatError("a layer range's step cannot be 0")
        if parts["stop"] is None:
            return slice(parts["start"], None, parts["step"])
        return range(parts["start"], parts["stop"], parts["step"])
    return value


@dataclass(frozen=True)
class Site:
    """A role plus the layers, tokens and heads an intervention addresses.

    ``layers``: an int, a list, a ``range`` (see `window`), ``slice(k, None)`` or ``None`` (every
    layer); negative indices count from the end. ``tokens``: a token selector (see
    `interventions.selectors`), ``None`` for every position. ``heads``: query-head indices,
    allowed for ``attn_output`` (per-head outputs) and ``attn_logits`` only.

    >>> Site("resid_post", layers=range(2, 4), tokens="video").to_dict()["layers"]
    {'start': 2, 'stop': 4, 'step': 1}
    >>> Site("mlp", heads=[0])
    Traceback (most recent call last):
    ...
    nnsight_av.errors.InputError: heads= applies to the 'attn_output' and 'attn_logits' sites only, not 'mlp_output'
    """

    role: str = "resid_post"
    layers: Any = None
    tokens: Any = None
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", canonical_role(self.role))
        object.__setattr__(self, "layers", _normalize_layers(self.layers))
        object.__setattr__(self, "tokens", normalize_selector(self.tokens))
        heads = self.heads
        if heads is not None:
            if isinstance(heads, torch.Tensor):
                heads = heads.tolist()
            heads = (heads,) if isinstance(heads, int) else tuple(heads)
            if not heads:
                raise InputError("heads= is empty: pass None for every head")
            for h in heads:
                if isinstance(h, bool) or not isinstance(h, int):
                    raise InputError(f"head indices must be ints, got {h!r}")
            if self.role not in ("attn_output", "attn_logits"):
                raise InputError(f"heads= applies to the 'attn_output' and 'attn_logits' sites only, not {self.role!r}")
            object.__setattr__(self, "heads", tuple(int(h) for h in heads))

    # -- resolution against a model ------------------------------------------------------
    def layer_indices(self, model: "AVModel") -> list[int]:
        """The layers as sorted, non-negative, checked indices (`LayerIndexError` when out of range)."""
        n = model.num_layers
        spec = self.layers
        if spec is None:
            return list(range(n))
        if isinstance(spec, slice):
            spec = range(*spec.indices(n))
        if isinstance(spec, range) and spec:
            # Check the ends before expanding: range(0, 10**8) must not become a list first.
            for end in (spec[0], spec[-1]):
                if not -n <= end < n:
                    raise LayerIndexError(f"layers {spec.start}..{spec.stop} (step {spec.step}) reach layer {end}, "
                                          f"out of range: this model has {n} layers (0..{n - 1})")
        values = [spec] if isinstance(spec, int) else list(spec)
        if not values:
            raise LayerIndexError("no layers selected (layers= is empty)")
        return sorted({model.check_layer(int(v)) for v in values})

    def head_indices(self, model: "AVModel") -> list[int] | None:
        """The heads, checked against the model's head count (`InputError` when out of range)."""
        if self.heads is None:
            return None
        n = model.num_heads
        for h in self.heads:
            if not -n <= h < n:
                raise InputError(f"head {h} is out of range: this model has {n} attention heads (0..{n - 1})")
        return sorted({h % n for h in self.heads})

    @property
    def point(self) -> str:
        """The hook point inside a layer this site reads and writes (see `POINT_ORDER`)."""
        if self.role == "attn_logits":
            return "attn_call"
        if self.role == "attn_output" and self.heads is not None:
            return "attn_heads"
        return self.role

    def key(self, layer: int) -> str:
        """Cache key of this site's value at ``layer``, e.g. ``"resid_post@3"``."""
        return f"{self.point}@{layer}"

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "layers": layers_to_json(self.layers), "tokens": self.tokens,
                "heads": list(self.heads) if self.heads is not None else None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Site":
        """Rebuild a `Site` from `to_dict` output (`FormatError` for a malformed dict)."""
        if not isinstance(data, Mapping):
            raise FormatError(f"a site description must be a dict, got {type(data).__name__}")
        unknown = set(data) - {"role", "layers", "tokens", "heads"}
        if unknown:
            raise FormatError(f"a site description has keys role, layers, tokens, heads; got unknown "
                              f"{sorted(map(str, unknown))}")
        return cls(data.get("role", "resid_post"), layers_from_json(data.get("layers")), data.get("tokens"),
                   data.get("heads"))

    def with_(self, **changes: Any) -> "Site":
        """A copy with ``changes`` applied (``role``, ``layers``, ``tokens``, ``heads``)."""
        fields = {"role": self.role, "layers": self.layers, "tokens": self.tokens, "heads": self.heads}
        fields.update(changes)
        return Site(**fields)


def as_site(site: "Site | str", layers: Any = None, tokens: Any = None, heads: Any = None) -> Site:
    """A `Site` from a role name or a `Site`; explicit ``layers``/``tokens``/``heads`` override its fields."""
    if isinstance(site, Site):
        changes = {k: v for k, v in (("layers", layers), ("tokens", tokens), ("heads", heads)) if v is not None}
        return site.with_(**changes) if changes else site
    return Site(site, layers, tokens, heads)

