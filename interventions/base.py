"""The `Intervention` base class, `Compose`, and JSON (de)serialisation."""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

import torch

from nnsight_av.errors import FormatError, InputError, NNsightAVError
from nnsight_av.inputs import AVInputs

from .context import ApplyContext
from .engine import Op, execute
from .params import flag
from .selectors import normalize_selector
from .site import Site, as_site, layers_from_json

if TYPE_CHECKING:
    from nnsight_av.model import AVModel

__all__ = ["Intervention", "Compose", "from_dict", "from_json", "register_intervention", "registered_interventions"]

_REGISTRY: dict[str, type["Intervention"]] = {}


def register_intervention(cls: type["Intervention"]) -> type["Intervention"]:
    """Register ``cls`` under its class name so `from_dict` can rebuild it (usable as a decorator)."""
    _REGISTRY[cls.__name__] = cls
    return cls


def registered_interventions() -> dict[str, type["Intervention"]]:
    return dict(_REGISTRY)


def _sets_to_json(sets: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    return {name: [int(p) for p in positions.tolist()] for name, positions in sets.items()}


def normalize_sets(sets: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """Named position sets as CPU LongTensors (`InputError` on anything that is not positions)."""
    out: dict[str, torch.Tensor] = {}
    if sets is not None and not isinstance(sets, Mapping):
        raise InputError(f"sets must map names to token positions, got {type(sets).__name__}")
    for name, positions in (sets or {}).items():
        if not isinstance(name, str):
            raise InputError(f"set names must be strings, got {name!r}")
        values = normalize_selector(positions)
        values = values if isinstance(values, tuple) else (values,)
        if any(v is None or isinstance(v, str) for v in values):
            raise InputError(f"set {name!r} must hold token positions, got {positions!r}")
        bad = [v for v in values if not 0 <= v < _MAX_POSITION]
        if bad:
            raise InputError(f"set {name!r} holds position {bad[0]}; set positions are token indices >= 0")
        out[name] = torch.as_tensor(values, dtype=torch.long)
    return out


#: Positions beyond this are refused before they reach a LongTensor (no model has 2**40 tokens).
_MAX_POSITION = 1 << 40


class Intervention:
    """Base class of every primitive: an edit at a `Site`, applied inside an invoke.

    Uniform keywords: ``layers=``, ``tokens=``, ``site=``, ``heads=``, plus ``sets=`` (named
    position sets that ``tokens`` may refer to, stored with the intervention) and
    ``allow_empty=`` (an empty token selection is a no-op instead of a
    `TokenSelectionError`).

    Use it with ``iv.apply(model)`` inside an invoke, ``interventions.run(model, inputs, iv)``
    (also ``model.run``) or ``interventions.generate``; combine with ``a + b`` or `Compose`.
    """

    default_site: ClassVar[str] = "resid_post"

    def __init__(self, *, layers: Any = None, tokens: Any = None, site: Site | str | None = None,
                 heads: Any = None, sets: Mapping[str, Any] | None = None, allow_empty: bool = False) -> None:
        self.site = as_site(site if site is not None else self.default_site, layers, tokens, heads)
        if self.site.role == "attn_logits" and not getattr(self, "attention", False):
            raise InputError(f"{type(self).__name__} edits activations; the 'attn_logits' site is for "
                             f"AttentionKnockout / AttentionBoost")
        self.sets = normalize_sets(sets)
        self.allow_empty = flag(allow_empty, "allow_empty")

    # -- compilation (subclasses) ----------------------------------------------------------
    def compile(self, model: "AVModel", ctx: ApplyContext) -> list[Op]:
        """The ops this intervention performs in the invoke described by ``ctx``."""
        raise NotImplementedError

    def sites(self) -> list[Site]:
        """The sites this intervention reads or writes."""
        return [self.site]

    # -- use ---------------------------------------------------------------------------------
    def apply(self, model: "AVModel", inputs: AVInputs | None = None, *, sets: Mapping[str, Any] | None = None) -> None:
        """Apply inside the current invoke (or trace with one input).

        ``inputs``: the invoke's `AVInputs`; found from the running invoke when omitted.
        ``sets``: named position sets for this input (e.g. its sinks), looked up before the
        intervention's own ``sets``. Call it before reading any module the intervention
        touches: nnsight serves modules in execution order. In ``model.generate``, call it
        inside ``for step in tracer.iter[...]:`` to act at those steps.
        """
        ctx = ApplyContext(model, inputs, normalize_sets(sets))
        execute(model, self.compile(model, ctx), ctx)

    def __add__(self, other: "Intervention") -> "Compose":
        if not isinstance(other, Intervention):
            return NotImplemented
        return Compose([self, other])

    # -- helpers for subclasses ------------------------------------------------------------------
    def _positions(self, ctx: ApplyContext, selector: Any = "__site__") -> torch.Tensor:
        selector = self.site.tokens if selector == "__site__" else selector
        return ctx.positions(selector, self.sets, self.allow_empty)

    def _heads(self, model: "AVModel") -> torch.Tensor | None:
        heads = self.site.head_indices(model)
        return None if heads is None else torch.tensor(heads, dtype=torch.long)

    # -- serialisation -----------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Constructor keywords as JSON-able values (subclasses add theirs)."""
        site = self.site.to_dict()
        out = {"site": site["role"], "layers": site["layers"], "tokens": site["tokens"], "heads": site["heads"]}
        if self.sets:
            out["sets"] = _sets_to_json(self.sets)
        if self.allow_empty:
            out["allow_empty"] = True
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description; `interventions.from_dict` rebuilds it."""
        return {"type": type(self).__name__, **self.params()}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_params(cls, params: dict[str, Any], sources: Mapping[str, Any] | None = None) -> "Intervention":
        params = dict(params)
        if "layers" in params:
            params["layers"] = layers_from_json(params["layers"])
        return cls(**params)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Intervention) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if v is not None)
        return f"{type(self).__name__}({parts})"


@register_intervention
class Compose(Intervention):
    """Several interventions applied together in one invoke.

    Order: ops run in the model's execution order (layer by layer; inside a layer
    ``resid_pre``, ``input_layernorm``, attention logits, per-head attention output,
    ``attn_output``, ``mlp_output``, ``resid_post``); ops at the same layer and hook point
    run in list order, each seeing the previous one's edit (so the last write wins).
    ``a + b`` is ``Compose([a, b])`` (nested composes are flattened).
    """

    def __init__(self, children: Iterable[Intervention]) -> None:
        flat: list[Intervention] = []
        for child in children:
            if isinstance(child, Compose):
                flat.extend(child.children)
            elif isinstance(child, Intervention):
                flat.append(child)
            else:
                raise InputError(f"Compose takes interventions, got {type(child).__name__}")
        self.children = flat

    def compile(self, model: "AVModel", ctx: ApplyContext) -> list[Op]:
        return [op for child in self.children for op in child.compile(model, ctx)]

    def sites(self) -> list[Site]:
        return [site for child in self.children for site in child.sites()]

    def __add__(self, other: Intervention) -> "Compose":
        if not isinstance(other, Intervention):
            return NotImplemented
        return Compose([*self.children, other])

    def __radd__(self, other: Any) -> "Compose":
        if other == 0:  # sum([...])
            return self
        return NotImplemented

    def __len__(self) -> int:
        return len(self.children)

    def __iter__(self):
        return iter(self.children)

    def params(self) -> dict[str, Any]:
        return {"children": [child.to_dict() for child in self.children]}

    @classmethod
    def from_params(cls, params: dict[str, Any], sources: Mapping[str, Any] | None = None) -> "Compose":
        children = params.get("children")
        if not isinstance(children, (list, tuple)):
            raise FormatError(f"Compose needs 'children': a list of intervention dicts, got {children!r:.80}")
        rebuilt = []
        for index, child in enumerate(children):
            try:
                rebuilt.append(from_dict(child, sources))
            except NNsightAVError as error:  # same class, with where it is
                raise type(error)(f"Compose children[{index}]: {error}") from error
        return cls(rebuilt)

    def __repr__(self) -> str:
        return " + ".join(repr(child) for child in self.children) if self.children else "Compose([])"


def from_dict(data: Mapping[str, Any], sources: Mapping[str, Any] | None = None) -> Intervention:
    """Rebuild an intervention from `Intervention.to_dict` output.

    ``sources`` maps the names of in-memory activation caches (``ActivationCache.name``)
    to the caches, for `Patch` / `MeanPatch` whose cache was not saved to a file.

    >>> from interventions import Zero
    >>> iv = Zero(layers=[1, 2], tokens="video", site="mlp_output")
    >>> from_dict(json.loads(json.dumps(iv.to_dict()))) == iv
    True
    """
    if not isinstance(data, Mapping) or "type" not in data:
        raise FormatError(f"not an intervention description (no 'type' key): {data!r:.200}")
    kind = data["type"]
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise FormatError(f"unknown intervention type {kind!r:.80}; known: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[kind]
    params = {k: v for k, v in data.items() if k != "type"}
    allowed = _keywords(cls)
    unknown = [k for k in params if not isinstance(k, str) or (allowed is not None and k not in allowed)]
    if unknown:
        raise FormatError(f"{kind} has no parameter {', '.join(repr(k) for k in unknown)}; it takes "
                          f"{', '.join(sorted(allowed or ()))}")
    try:
        return cls.from_params(params, sources)
    except NNsightAVError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as error:
        # A registered class whose own checks missed a malformed value: still the library's error.
        raise FormatError(f"cannot rebuild {kind} from {params!r:.200}: {type(error).__name__}: {error}") from error


def _keywords(cls: type) -> set[str] | None:
    """The keyword names ``cls(...)`` accepts (following ``**kwargs`` up the MRO); None: any."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            return None
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def from_json(text: str, sources: Mapping[str, Any] | None = None) -> Intervention:
    """`from_dict` of a JSON string (`FormatError` when it is not JSON)."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise FormatError(f"from_json takes a JSON string, got {type(text).__name__}")
    try:
        data = json.loads(text)
    except ValueError as error:
        raise FormatError(f"not valid JSON: {error}") from None
    return from_dict(data, sources)


def as_intervention(value: Intervention | Sequence[Intervention] | None) -> Intervention | None:
    """``None``, one intervention, or a list of them composed in order."""
    if value is None:
        return None
    if isinstance(value, Intervention):
        return value
    if isinstance(value, Mapping):
        return from_dict(value)
    items = list(value)
    if not items:
        return None
    return items[0] if len(items) == 1 else Compose(items)
