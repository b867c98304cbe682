"""Saved activations: `ActivationCache`, `cache_activations`, `compute_means`, `modality_stds`.

A cache maps ``"<point>@<layer>"`` keys (see `Site.key`) to tensors over the positions
of one input (``[T, ...]``), or, for means, over positions (``by="position"``) or
modalities (``by="modality"``, rows in `MODALITIES` order). It records the layout of the
input(s) it came from, so `Patch` / `MeanPatch` can refuse a target that does not match.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import nnsight
import torch

from nnsight_av.errors import FormatError, InputError
from nnsight_av.inputs import AVInputs

from .base import Intervention
from .context import MODALITIES, ApplyContext
from .engine import Op, execute
from .site import Site, as_site

if TYPE_CHECKING:
    from nnsight_av.model import AVModel

__all__ = ["ActivationCache", "cache_activations", "compute_means", "modality_stds", "layout_signature"]


def layout_signature(inputs: AVInputs) -> tuple:
    """``(length, layout string, per-chunk (video, audio) counts)``: what patching requires to match."""
    return (len(inputs), inputs.layout(), tuple((len(c.video), len(c.audio)) for c in inputs.spans.chunks))


@dataclass
class ActivationCache:
    """Activations (or their means) at some sites, keyed ``"<point>@<layer>"``.

    ``kind``: ``"activations"`` (one input) or ``"mean"``; ``by``: for means, ``"position"``
    or ``"modality"``; ``count``: inputs averaged; ``layout``: `layout_signature` of the
    input(s) (positions) it came from; ``path``: where it was saved, if it was.
    """

    acts: dict[str, torch.Tensor]
    layout: tuple
    kind: str = "activations"
    by: str | None = None
    count: int = 1
    name: str | None = None
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.layout[0])

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.acts[key]

    def __contains__(self, key: str) -> bool:
        return key in self.acts

    def keys(self) -> list[str]:
        return list(self.acts)

    def to(self, device: Any) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self.acts.items()}, self.layout, self.kind, self.by,
                               self.count, self.name, self.path, dict(self.meta))

    # -- persistence -------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"layout": list(self.layout[:2]) + [[list(c) for c in self.layout[2]]], "kind": self.kind,
                "by": self.by, "count": self.count, "name": self.name, "meta": self.meta}

    def save(self, path: str) -> str:
        """Write a safetensors file (tensors + JSON metadata); returns ``path``."""
        from safetensors.torch import save_file

        self.path = str(path)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.acts.items()}, self.path,
                  metadata={"nnsight_av": json.dumps(self._meta())})
        return self.path

    @classmethod
    def load(cls, path: str) -> "ActivationCache":
        """Read a file written by `save`; `FormatError` when it is not one (garbage, truncated, other metadata)."""
        from safetensors import SafetensorError, safe_open

        if not isinstance(path, (str, os.PathLike)):
            raise FormatError(f"an activation cache path must be a string, got {type(path).__name__}")
        if not os.path.isfile(path):
            raise FormatError(f"no activation cache file at {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if "nnsight_av" not in metadata:
                    raise FormatError(f"{str(path)!r} is a safetensors file without nnsight_av metadata "
                                      f"(not written by ActivationCache.save)")
                meta = json.loads(metadata["nnsight_av"])
                acts = {k: handle.get_tensor(k) for k in handle.keys()}
        except FormatError:
            raise
        except (OSError, SafetensorError, ValueError, RuntimeError) as error:
            raise FormatError(f"cannot read an activation cache from {str(path)!r}: {error}") from None
        layout, kind, by, count, name = _checked_meta(meta, acts, str(path))
        extra = meta.get("meta", {})
        if not isinstance(extra, dict):
            raise FormatError(f"activation cache {str(path)!r}: 'meta' must be a JSON object, got {extra!r:.80}")
        return cls(acts, layout, kind, by, count, name, str(path), extra)

    def to_frame(self) -> "Any":
        """One row per key: point, layer, shape, mean L2 norm over rows."""
        import pandas as pd

        rows = []
        for key, value in self.acts.items():
            point, _, layer = key.partition("@")
            flat = value.float().reshape(value.shape[0], -1)
            rows.append({"key": key, "point": point, "layer": int(layer), "shape": tuple(value.shape),
                         "mean_norm": float(torch.nan_to_num(flat.norm(dim=-1)).mean())})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        by = f", by={self.by}" if self.by else ""
        return (f"ActivationCache({self.kind}{by}, {len(self.acts)} keys, length={self.length}, count={self.count}"
                f"{', name=' + repr(self.name) if self.name else ''})")


def _checked_meta(meta: Any, acts: dict[str, torch.Tensor], path: str) -> tuple:
    """``(layout, kind, by, count, name)`` from a cache file's metadata, each field checked."""
    def bad(what: str) -> FormatError:
        return FormatError(f"activation cache {path!r}: {what}")

    if not isinstance(meta, dict):
        raise bad("its metadata is not a JSON object")
    missing = [k for k in ("layout", "kind", "by", "count") if k not in meta]
    if missing:
        raise bad(f"its metadata lacks {', '.join(missing)}")
    layout = meta["layout"]
    try:
        length, order, chunks = layout
        chunks = tuple((int(v), int(a)) for v, a in chunks)
        ok = (isinstance(length, int) and not isinstance(length, bool) and length >= 0 and isinstance(order, str)
              and all(v >= 0 and a >= 0 for v, a in chunks))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise bad(f"layout must be [length >= 0, layout string, [[video, audio], ...]], got {layout!r:.120}")
    kind, by, count, name = meta["kind"], meta["by"], meta["count"], meta.get("name")
    if kind not in ("activations", "mean"):
        raise bad(f"kind must be 'activations' or 'mean', got {kind!r:.80}")
    if by not in ((None,) if kind == "activations" else ("position", "modality")):
        raise bad(f"by={by!r:.80} does not fit kind={kind!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise bad(f"count must be a positive integer, got {count!r:.80}")
    if name is not None and not isinstance(name, str):
        raise bad(f"name must be a string, got {name!r:.80}")
    for key in acts:
        point, _, layer = key.partition("@")
        if not point or not layer.isdigit():
            raise bad(f"tensor {key!r} is not named '<point>@<layer>'")
    return (length, order, chunks), kind, by, count, name


def _sites_of(sites: Any, layers: Any) -> list[Site]:
    if isinstance(sites, Intervention):
        out = sites.sites()
    elif isinstance(sites, (str, Site)):
        out = [as_site(sites, layers)]
    else:
        out = [as_site(s, layers) for s in sites]
    for site in out:
        if site.role == "attn_logits":
            raise InputError("attention logits are not cached; cache activation sites (resid_pre, resid_post, "
                             "input_layernorm, attn_output, mlp_output)")
    return out


def _record_ops(model: "AVModel", sites: list[Site], store: dict[str, torch.Tensor], device: Any) -> list[Op]:
    ops, seen = [], set()
    for site in sites:
        for layer in site.layer_indices(model):
            key = site.key(layer)
            if key in seen:
                continue
            seen.add(key)

            def record(value: torch.Tensor, ctx: ApplyContext, key: str = key) -> None:
                rows, _ = ctx.rows(torch.arange(ctx.length))
                store[key] = value[0].index_select(0, ctx.to(rows, value.device)).detach().to(device)

            ops.append(Op(layer, site.point, record, label="record"))
    return ops


def record_in_invoke(model: "AVModel", sites: Any, inputs: AVInputs | None = None, layers: Any = None,
                     device: Any = "cpu") -> dict[str, torch.Tensor]:
    """Inside an invoke: record ``sites`` into a dict (filled as the forward runs)."""
    store: dict[str, torch.Tensor] = {}
    ctx = ApplyContext(model, inputs)
    execute(model, _record_ops(model, _sites_of(sites, layers), store, device), ctx)
    return store


def cache_activations(model: "AVModel", inputs: AVInputs, sites: Any = "resid_post", layers: Any = None,
                      device: Any = "cpu", name: str | None = None, **trace_kwargs: Any) -> ActivationCache:
    """Run ``inputs`` once and keep the activations at ``sites`` (a role, `Site`, list, or an intervention's sites).

    ``layers`` applies to roles given by name (default: every layer). Tensors go to ``device``.
    """
    if not isinstance(inputs, AVInputs):
        raise InputError(f"cache_activations needs AVInputs (from model.prepare), got {type(inputs).__name__}")
    site_list = _sites_of(sites, layers)
    with torch.no_grad(), model.trace(inputs, **trace_kwargs):
        store = nnsight.save(record_in_invoke(model, site_list, inputs, device=device))
    return ActivationCache(dict(store), layout_signature(inputs), name=name)


def compute_means(model: "AVModel", inputs: Sequence[AVInputs], sites: Any = "resid_post", layers: Any = None,
                  by: str = "position", name: str | None = None, progress: bool = True,
                  path: str | None = None) -> ActivationCache:
    """Mean activations at ``sites`` over ``inputs``, for `MeanPatch`.

    ``by="position"``: a mean per position (all inputs must share one layout);
    ``by="modality"``: a mean per modality (audio, video, image, text) over every token of
    it, ``NaN`` for a modality no input has. Shows a progress bar; saved to ``path`` if given.
    """
    if by not in ("position", "modality"):
        raise InputError(f"compute_means by must be 'position' or 'modality', got {by!r}")
    inputs = list(inputs)
    if not inputs:
        raise InputError("compute_means needs at least one input")
    layout = layout_signature(inputs[0])
    if by == "position":
        for k, ex in enumerate(inputs[1:], start=1):
            if layout_signature(ex) != layout:
                raise InputError(f"compute_means(by='position'): input {k} has a different layout from input 0 "
                                 f"({len(ex)} vs {len(inputs[0])} tokens); use by='modality'")
    from tqdm.auto import tqdm

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for ex in tqdm(inputs, desc="means", disable=not progress):
        cache = cache_activations(model, ex, sites, layers)
        for key, value in cache.acts.items():
            value = value.double()
            if by == "position":
                sums[key] = sums.get(key, 0) + value
                counts[key] = counts.get(key, 0) + 1
            else:
                ids = torch.full((len(ex),), MODALITIES.index("text"), dtype=torch.long)
                for m in ("audio", "video", "image"):
                    span = getattr(ex.spans, m)
                    if len(span):
                        ids[span] = MODALITIES.index(m)
                total = torch.zeros((len(MODALITIES), *value.shape[1:]), dtype=torch.float64)
                total.index_add_(0, ids, value)
                number = torch.bincount(ids, minlength=len(MODALITIES)).double()
                sums[key] = sums.get(key, 0) + total
                counts[key] = counts.get(key, 0) + number
    acts = {}
    for key, total in sums.items():
        count = counts[key]
        if by == "modality":
            count = count.reshape(-1, *([1] * (total.dim() - 1)))
            mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
        else:
            mean = total / count
        acts[key] = mean.float()
    result = ActivationCache(acts, layout if by == "position" else (0, "", ()), kind="mean", by=by,
                             count=len(inputs), name=name)
    if path:
        result.save(path)
    return result


def modality_stds(model: "AVModel", inputs: Sequence[AVInputs] | AVInputs, site: Any = "resid_pre", layer: int = 0,
                  progress: bool = False) -> dict[str, float]:
    """Per modality, the std of activations at ``site`` / ``layer`` pooled over ``inputs``.

    With the default site (the embeddings after media features are merged) this gives the
    ``std`` for ``Noise(scale=3.0, std=...)``, ROME-style.
    """
    if isinstance(inputs, AVInputs):
        inputs = [inputs]
    from tqdm.auto import tqdm

    site_obj = as_site(site, layers=layer)
    key = site_obj.key(site_obj.layer_indices(model)[0])
    stats = {m: [0.0, 0.0, 0] for m in MODALITIES}
    for ex in tqdm(list(inputs), desc="stds", disable=not progress):
        value = cache_activations(model, ex, site_obj).acts[key].double()
        for m in MODALITIES:
            positions = ex.spans.get(m) if m != "text" else ex.spans.text
            if len(positions) == 0:
                continue
            block = value[positions]
            stats[m][0] += float(block.sum())
            stats[m][1] += float((block ** 2).sum())
            stats[m][2] += block.numel()
    out = {}
    for m, (s, s2, n) in stats.items():
        if n:
            mean = s / n
            out[m] = float(max(s2 / n - mean * mean, 0.0) ** 0.5)
    return out
