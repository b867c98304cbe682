"""Activation primitives: `Zero`, `MeanPatch`, `Patch`, `Noise`.

Each edits the selected token rows (and heads) of one site at the chosen layers, in the
running invoke. They share the keywords ``layers=``, ``tokens=``, ``site=``, ``heads=``,
``sets=``, ``allow_empty=``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

from nnsight_av.errors import FormatError, InputError
from nnsight_av.spans import MODALITY_CODES

from .base import Intervention, register_intervention
from .cache import ActivationCache, layout_signature
from .context import MODALITIES, ApplyContext
from .engine import Op
from .params import integer, real
from .site import Site

if TYPE_CHECKING:
    from nnsight_av.model import AVModel

__all__ = ["Zero", "MeanPatch", "Patch", "Noise"]


def _take(value: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor | None) -> torch.Tensor:
    """``value[0, rows]`` (and ``[:, heads]``) as a new tensor."""
    picked = value[0].index_select(0, rows)
    return picked if heads is None else picked.index_select(1, heads)


def _put(value: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor | None, new: torch.Tensor) -> None:
    if heads is None:
        value[0].index_copy_(0, rows, new.to(value.dtype))
    else:
        value[0][rows[:, None], heads[None, :]] = new.to(value.dtype)


class ActivationIntervention(Intervention):
    """Shared compile step: one op per layer that hands `edit` the selected rows."""

    def compile(self, model: "AVModel", ctx: ApplyContext) -> list[Op]:
        heads = self._heads(model)
        self._prepare(model, ctx)
        ops = []
        for layer in self.site.layer_indices(model):
            ops.append(Op(layer, self.site.point, self._op(layer, heads), label=type(self).__name__))
        return ops

    def _prepare(self, model: "AVModel", ctx: ApplyContext) -> None:
        """Checks that need the invoke (layouts, sources); runs before any module is read."""

    def _op(self, layer: int, heads: torch.Tensor | None):
        def run(value: torch.Tensor, ctx: ApplyContext) -> None:
            selected = self._positions(ctx)
            rows, positions = ctx.rows(selected)
            if len(rows) == 0:
                return
            heads_dev = None if heads is None else ctx.to(heads, value.device, tag=("heads", id(self)))
            self.edit(value, Selection(rows, positions, selected, ctx, value.device), heads_dev, layer, ctx)

        return run

    def edit(self, value: torch.Tensor, sel: "Selection", heads: torch.Tensor | None, layer: int,
             ctx: ApplyContext) -> None:
        """Edit ``value`` ``[1, n, ...]`` in place at the rows of ``sel`` (and ``heads``)."""
        raise NotImplementedError


class Selection:
    """The selected tokens present in this forward: rows of the tensor and their positions.

    ``rows``/``positions`` are CPU tensors, ``dev_rows`` the rows on the value's device;
    ``selected`` is the whole selection at this step (present or in the KV cache).
    """

    def __init__(self, rows: torch.Tensor, positions: torch.Tensor, selected: torch.Tensor, ctx: ApplyContext,
                 device: torch.device) -> None:
        self.rows, self.positions, self.selected, self.ctx, self.device = rows, positions, selected, ctx, device

    @property
    def dev_rows(self) -> torch.Tensor:
        return self.ctx.to(self.rows, self.device)

    def where(self, keep: torch.Tensor) -> "Selection":
        """The subset where the CPU bool mask ``keep`` holds."""
        if bool(keep.all()):
            return self
        return Selection(self.rows[keep], self.positions[keep], self.selected, self.ctx, self.device)

    def __len__(self) -> int:
        return len(self.rows)


@register_intervention
class Zero(ActivationIntervention):
    """Set the selected activations to zero.

    >>> Zero(layers=0, tokens="audio", site="resid_pre").to_dict()["site"]
    'resid_pre'
    """

    def edit(self, value, sel, heads, layer, ctx):
        rows = sel.dev_rows
        _put(value, rows, heads, torch.zeros_like(_take(value, rows, heads)))


def _bind_cache(source: Any, sources: Mapping[str, Any] | None, what: str) -> Any:
    """A cache from its JSON reference: a saved file's path, or a name in ``sources``."""
    if source is None or isinstance(source, ActivationCache):
        return source
    if isinstance(source, int) and not isinstance(source, bool):
        return integer(source, f"{what} (an invoke index)", lo=0)
    if isinstance(source, Mapping):
        if "invoke" in source:
            if set(source) != {"invoke"}:
                raise FormatError(f"{what}: an invoke reference is {{'invoke': k}}, got keys {sorted(map(str, source))}")
            return integer(source["invoke"], f"{what} (an invoke index)", lo=0)
        unknown = set(source) - {"name", "path"}
        if unknown:
            raise FormatError(f"{what}: a cache reference has keys name, path; got unknown {sorted(map(str, unknown))}")
        name, path = source.get("name"), source.get("path")
        for key, value in (("name", name), ("path", path)):
            if value is not None and not isinstance(value, str):
                raise FormatError(f"{what}: the cache {key} must be a string, got {value!r:.80}")
        if sources and name in sources:
            return sources[name]
        if path:
            return ActivationCache.load(path)
        raise InputError(f"cannot rebuild the {what} cache {name!r}: it was not saved to a file; "
                         f"pass sources={{{name!r}: cache}} to from_dict")
    if isinstance(source, str):
        return ActivationCache.load(source)
    raise InputError(f"{what} must be an ActivationCache (or an invoke index for Patch), got {type(source).__name__}")


def _cache_ref(cache: ActivationCache) -> dict[str, Any]:
    return {"name": cache.name, "path": cache.path}


def _check_layout(cache_layout: tuple, ctx: ApplyContext, what: str) -> None:
    target = layout_signature(ctx.inputs)
    if cache_layout != target:
        raise InputError(f"{what}: source and target layouts differ (source {_describe(cache_layout)}, target "
                         f"{_describe(target)}); patching needs the same length and the same spans")


def _describe(signature: tuple) -> str:
    length, layout, chunks = signature
    counts = {m: layout.count(MODALITY_CODES[m]) for m in ("video", "audio", "image")}
    return f"{length} tokens, " + ", ".join(f"{k}={v}" for k, v in counts.items()) + f", chunks={list(chunks)}"


def _cache_value(cache: ActivationCache, key: str, what: str) -> torch.Tensor:
    if key not in cache.acts:
        raise InputError(f"{what}: the cache has no {key!r} (it holds {', '.join(sorted(cache.acts)) or 'nothing'}); "
                         f"cache the site and layers this intervention uses")
    return cache.acts[key]


class CacheIntervention(ActivationIntervention):
    """An activation primitive that reads an `ActivationCache` held in the parameter ``cache_param``."""

    cache_param: ClassVar[str] = ""

    @classmethod
    def from_params(cls, params, sources=None):
        params = dict(params)
        name = cls.cache_param
        params[name] = _bind_cache(params.get(name), sources, f"{cls.__name__} {name}")
        return super().from_params(params, sources)


@register_intervention
class MeanPatch(CacheIntervention):
    """Replace the selected activations with their mean over a reference set of inputs.

    ``means``: an `ActivationCache` from `interventions.compute_means` (``by="position"``: a
    mean per position, the target must share the reference layout; ``by="modality"``: a
    mean per modality, taken by each selected token's modality).
    """

    cache_param = "means"

    def __init__(self, means: ActivationCache | str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.means = _bind_cache(means, None, "MeanPatch means")
        if self.means is not None and not isinstance(self.means, ActivationCache):
            raise InputError(f"MeanPatch means must be an ActivationCache from compute_means (or its saved path), "
                             f"got {means!r:.80}")
        if self.means is not None and self.means.kind != "mean":
            raise InputError("MeanPatch needs means from interventions.compute_means, got an activation cache")

    def _prepare(self, model: "AVModel", ctx: ApplyContext) -> None:
        if self.means is None:
            raise InputError("MeanPatch has no means: pass means=compute_means(model, inputs, ...)")
        if self.means.by == "position":
            _check_layout(self.means.layout, ctx, "MeanPatch (by position)")

    def edit(self, value, sel, heads, layer, ctx):
        key = self.site.key(layer)
        table = _cache_value(self.means, key, "MeanPatch")
        if self.means.by == "position":
            sel = sel.where(sel.positions < table.shape[0])
            index = sel.positions
        else:
            index = ctx.modality_ids(sel.positions)
            missing = torch.isnan(table.reshape(table.shape[0], -1)[:, 0])[index]
            if bool(missing.any()):
                absent = sorted({MODALITIES[i] for i in index[missing].tolist()})
                raise InputError(f"MeanPatch: the reference inputs had no {', '.join(absent)} tokens to average")
        if len(sel) == 0:
            return
        means = ctx.to(table, value.device, tag=("means", id(self), key))
        new = means.index_select(0, ctx.to(index, value.device))
        if heads is not None:
            new = new.index_select(1, heads)
        _put(value, sel.dev_rows, heads, new)

    def params(self):
        return {**super().params(), "means": None if self.means is None else _cache_ref(self.means)}


@register_intervention
class Patch(CacheIntervention):
    """Copy activations from a source run into this run at the selected positions.

    ``source`` is either an `ActivationCache` from `interventions.cache_activations` (a
    clean run saved earlier), or the index of another invoke of the same trace: apply the
    same ``Patch`` in that invoke too (it records there) and in the target invokes (they
    write). The source invoke must come before its targets. Source and target must have
    the same layout (length and spans), else `InputError`. Positions the source lacks
    (tokens generated after the cached prompt) are left alone.
    """

    cache_param = "source"

    def __init__(self, source: ActivationCache | int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(source, bool):
            raise InputError("Patch source must be an ActivationCache or an invoke index, got a bool")
        self.source = _bind_cache(source, None, "Patch source")
        self._live: dict[Any, tuple] = {}

    def _prepare(self, model: "AVModel", ctx: ApplyContext) -> None:
        if self.source is None:
            raise InputError("Patch has no source: pass source=cache_activations(model, clean, ...) or an invoke index")
        if isinstance(self.source, ActivationCache):
            _check_layout(self.source.layout, ctx, "Patch")
            return
        if ctx.index is None:
            raise InputError("Patch(source=<invoke>) could not tell which invoke it runs in")
        if not 0 <= self.source < max(len(ctx.all_inputs), 1):
            raise InputError(f"Patch(source={self.source}): this trace has {len(ctx.all_inputs)} invokes")
        if ctx.index == self.source:
            return
        if self.source > ctx.index:
            raise InputError(f"Patch(source={self.source}) applied in invoke {ctx.index}: the source invoke must "
                             f"come before the invokes it patches")
        _check_layout(layout_signature(ctx.all_inputs[self.source]), ctx, "Patch")

    def compile(self, model: "AVModel", ctx: ApplyContext) -> list[Op]:
        ops = super().compile(model, ctx)
        if isinstance(self.source, int) and ctx.index == self.source:
            for op in ops:
                op.fn = self._recorder(op.layer)
        return ops

    def _recorder(self, layer: int):
        def record(value: torch.Tensor, ctx: ApplyContext) -> None:
            self._live[(layer, self.site.point)] = (ctx.stamp, value[0].detach().clone(), ctx.past, ctx.offset)

        return record

    def edit(self, value, sel, heads, layer, ctx):
        if isinstance(self.source, ActivationCache):
            table = _cache_value(self.source, self.site.key(layer), "Patch")
            sel = sel.where(sel.positions < table.shape[0])
            if len(sel) == 0:
                return
            table = ctx.to(table, value.device, tag=("patch", id(self), layer))
            src = table.index_select(0, ctx.to(sel.positions, value.device))
        else:
            entry = self._live.get((layer, self.site.point))
            if entry is None or (entry[0] is not None and entry[0] != ctx.stamp):
                raise InputError(f"Patch(source={self.source}): the source invoke recorded nothing at layer {layer} "
                                 f"in this forward; call the same Patch's apply() in invoke {self.source} too")
            _, table, past, offset = entry
            src = table.index_select(0, ctx.to(sel.positions + offset - past, table.device))
        if heads is not None:
            src = src.index_select(1, heads)
        _put(value, sel.dev_rows, heads, src)

    def params(self):
        if isinstance(self.source, ActivationCache):
            source: Any = _cache_ref(self.source)
        else:
            source = None if self.source is None else {"invoke": self.source}
        return {**super().params(), "source": source}


@register_intervention
class Noise(ActivationIntervention):
    """Add seeded Gaussian noise to the selected activations (ROME-style corruption).

    The noise at a token of modality ``m`` has standard deviation ``scale * std[m]``.
    ``std``: a float (every modality), a dict ``{"video": 0.4, "audio": 0.2, ...}`` (see
    `interventions.modality_stds`), or ``None``: the std of that modality's activations at
    this site in the current input. Default site: the embeddings (``resid_pre`` of layer 0).
    The same seed gives the same noise for the same selection, whatever else is in the batch.
    """

    default_site = "resid_pre"

    def __init__(self, scale: float = 3.0, std: float | Mapping[str, float] | None = None, seed: int = 0,
                 **kwargs: Any) -> None:
        if not isinstance(kwargs.get("site"), Site):
            kwargs.setdefault("layers", 0)  # the embeddings, as in ROME
        super().__init__(**kwargs)
        self.scale = real(scale, "Noise scale", lo=0)
        if isinstance(std, Mapping):
            unknown = set(std) - set(MODALITIES)
            if unknown:
                raise InputError(f"Noise std keys must be modalities {MODALITIES}, got {sorted(map(str, unknown))}")
            std = {k: real(v, f"Noise std[{k!r}]", lo=0) for k, v in std.items()}
        elif std is not None:
            std = real(std, "Noise std", lo=0)
        self.std = std
        # The generator is seeded with seed * 1_000_003 + layer, which must fit torch's 64-bit seed.
        self.seed = integer(seed, "Noise seed", lo=0, hi=1 << 32)

    def _stds(self, value: torch.Tensor, ctx: ApplyContext, modality: torch.Tensor, heads) -> torch.Tensor:
        if isinstance(self.std, float):
            return torch.full((len(modality),), self.std, device=value.device)
        if isinstance(self.std, dict):
            table = [self.std.get(m, math.nan) for m in MODALITIES]
            missing = sorted({MODALITIES[i] for i in modality.tolist() if math.isnan(table[i])})
            if missing:
                raise InputError(f"Noise: no std given for {', '.join(missing)} tokens (std has {sorted(self.std)})")
            return torch.tensor(table, device=value.device)[ctx.to(modality, value.device)]
        stds = torch.zeros(len(MODALITIES), device=value.device)
        for index in sorted(set(modality.tolist())):
            rows, _ = ctx.rows(ctx.positions(MODALITIES[index], allow_empty=True))
            stds[index] = _take(value, ctx.to(rows, value.device), heads).float().std(unbiased=False)
        return stds[ctx.to(modality, value.device)]

    def edit(self, value, sel, heads, layer, ctx):
        rows = sel.dev_rows
        current = _take(value, rows, heads)
        shape = (len(sel.selected), *current.shape[1:])
        generator = torch.Generator(device=value.device).manual_seed(self.seed * 1_000_003 + layer)
        noise = torch.randn(shape, generator=generator, device=value.device, dtype=torch.float32)
        which = torch.searchsorted(sel.selected, sel.positions)
        noise = noise.index_select(0, ctx.to(which, value.device))
        std = self._stds(value, ctx, ctx.modality_ids(sel.positions), heads)
        std = std.reshape(-1, *([1] * (noise.dim() - 1)))
        _put(value, rows, heads, current.float() + self.scale * std * noise)

    def params(self):
        return {**super().params(), "scale": self.scale, "std": self.std, "seed": self.seed}
