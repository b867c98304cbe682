"""Modality dominance score (MDS) of sink tokens and the cross-modal / unimodal split (METHOD.md section 3).

For a sink ``s`` and layer ``l`` on the clean prefill:

- ``V_l(s)``: mean over heads and over video queries ``q > s`` of ``A_l[h, q, s]`` (0 if none);
- ``A_l(s)``: the same over audio queries;
- ``MDS_l(s) = (V - A) / (V + A + 1e-9)`` in ``[-1, 1]``; ``MDS(s)`` = nanmean over layers.

Only the attention paid to the sink columns is computed (`analyses.attention`), inside
the forward, from the post-rotary queries and keys. `sink_analysis` finds the sinks and
their MDS in a single prefill; `modality_dominance` scores sinks you already have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from interventions.runtime.prefill import run_prefill
from nnsight_av.batching import as_list, batch_tensors, check_layers, progress_batches
from nnsight_av.errors import InputError, TokenSelectionError
from nnsight_av.spans import MODALITY_CODES

from .attention import column_attention_sums, group_counts, row_group_ids
from .column_math import column_sums
from .plots import plot_mds_distribution, plot_mds_heatmap
from .results import JsonResult
from .sinks import SinkResult, check_criterion, check_k, modality_codes, resolve_sink_dims, sink_scores

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["MDS_EPS", "mds_score", "MDSResult", "SinkSplit", "modality_dominance", "sink_analysis", "SinkAnalysis",
           "mds_summary"]

MDS_EPS = 1e-9
_MODALITIES = ("video", "audio")


def mds_score(v: torch.Tensor, a: torch.Tensor, eps: float = MDS_EPS) -> torch.Tensor:
    """``(V - A) / (V + A + eps)``.

    >>> [round(x, 6) for x in mds_score(torch.tensor([0.3, 0.0, 0.0]), torch.tensor([0.1, 0.2, 0.0])).tolist()]
    [0.5, -1.0, 0.0]
    """
    return (v - a) / (v + a + eps)


@dataclass
class SinkSplit:
    """Sinks split into four sets: ``av`` / ``aa`` (audio sinks), ``va`` / ``vv`` (video sinks).

    The first letter is the sink's modality, the second the modality that mostly attends
    to it: ``va`` (video sinks relatively more attended by audio) and ``av`` are the
    cross-modal sinks, ``vv`` and ``aa`` the unimodal ones.
    """

    av: Int[torch.Tensor, "positions"]
    va: Int[torch.Tensor, "positions"]
    aa: Int[torch.Tensor, "positions"]
    vv: Int[torch.Tensor, "positions"]
    rule: str = "rank"

    def cross_modal(self, base: str | None = None) -> Int[torch.Tensor, "positions"]:
        """Cross-modal sinks of ``base`` modality ("video" -> va, "audio" -> av); both when None."""
        return self._pick(base, self.va, self.av)

    def unimodal(self, base: str | None = None) -> Int[torch.Tensor, "positions"]:
        """Unimodal sinks of ``base`` modality ("video" -> vv, "audio" -> aa); both when None."""
        return self._pick(base, self.vv, self.aa)

    def halves(self, base: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cross_modal, unimodal)`` sinks of one base modality."""
        return self.cross_modal(base), self.unimodal(base)

    @staticmethod
    def _pick(base: str | None, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        if base is None:
            return torch.sort(torch.cat([video, audio])).values
        if base == "video":
            return video
        if base == "audio":
            return audio
        raise InputError(f"base modality must be 'video', 'audio' or None, got {base!r}")

    def to_dict(self) -> dict[str, list[int]]:
        return {name: getattr(self, name).tolist() for name in ("av", "va", "aa", "vv")}

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        rows = [(p, name, name[0] != name[1]) for name in ("av", "va", "aa", "vv") for p in getattr(self, name).tolist()]
        return pd.DataFrame(rows, columns=["position", "set", "cross_modal"]).sort_values("position",
                                                                                        ignore_index=True)

    def __repr__(self) -> str:
        return (f"SinkSplit(rule={self.rule!r}, av={len(self.av)}, va={len(self.va)}, aa={len(self.aa)}, "
                f"vv={len(self.vv)})")


def _stats(values: np.ndarray) -> dict[str, float | int | None]:
    if values.size == 0:
        return {"n": 0, "median": None, "q1": None, "q3": None, "iqr": None, "mean": None}
    q1, med, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"n": int(values.size), "median": float(med), "q1": float(q1), "q3": float(q3),
            "iqr": float(q3 - q1), "mean": float(values.mean())}


@dataclass
class MDSResult(JsonResult):
    """Per sink and layer: ``V`` (video-query attention), ``A`` (audio-query attention) and MDS.

    ``positions[j]`` is a sink of modality ``modality[j]``; ``V[i, j]`` / ``A[i, j]`` belong
    to layer ``layers[i]``. ``mds`` is the layer nanmean of ``per_layer``.
    """

    positions: Int[torch.Tensor, "sinks"]
    modality: list[str]
    layers: list[int]
    V: Float[torch.Tensor, "layer sinks"]
    A: Float[torch.Tensor, "layer sinks"]
    eps: float = MDS_EPS
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions = torch.as_tensor(self.positions, dtype=torch.long).reshape(-1)
        n = self.positions.numel()
        self.V = torch.as_tensor(self.V, dtype=torch.float32).reshape(len(self.layers), n)
        self.A = torch.as_tensor(self.A, dtype=torch.float32).reshape(len(self.layers), n)
        if len(self.modality) != n:
            raise InputError(f"{len(self.modality)} modality labels for {n} sinks")

    @property
    def per_layer(self) -> Float[torch.Tensor, "layer sinks"]:
        return mds_score(self.V, self.A, self.eps)

    @property
    def mds(self) -> Float[torch.Tensor, "sinks"]:
        if self.positions.numel() == 0:
            return torch.zeros(0)
        return torch.nanmean(self.per_layer, dim=0)

    def _of(self, modality: str) -> torch.Tensor:
        return torch.tensor([m == modality for m in self.modality], dtype=torch.bool)

    def of(self, modality: str) -> "MDSResult":
        """The sinks of one modality."""
        keep = self._of(modality)
        return MDSResult(self.positions[keep], [m for m in self.modality if m == modality], list(self.layers),
                         self.V[:, keep], self.A[:, keep], self.eps, dict(self.meta))

    def split(self, rule: str = "rank") -> SinkSplit:
        """The four sets ``av``, ``va``, ``aa``, ``vv``.

        ``rule="rank"`` (default, the authors' code): within each modality's sinks, sorted by
        MDS ascending (ties: position), the lower ``n // 2`` form one half and the rest the
        other; for video sinks the lower half is cross-modal (``va``), for audio sinks the
        upper half (``av``). ``rule="sign"``: a video sink is cross-modal iff MDS < 0, an
        audio sink iff MDS > 0.

        >>> r = MDSResult(torch.tensor([3, 5, 7, 9]), ["video", "video", "audio", "audio"], [0],
        ...               torch.tensor([[0.9, 0.2, 0.1, 0.5]]), torch.tensor([[0.1, 0.3, 0.8, 0.4]]))
        >>> r.split().to_dict()
        {'av': [9], 'va': [5], 'aa': [7], 'vv': [3]}
        """
        mds = self.mds
        out: dict[str, torch.Tensor] = {}
        for modality, (low, high) in (("video", ("va", "vv")), ("audio", ("aa", "av"))):
            keep = self._of(modality)
            pos, score = self.positions[keep], mds[keep]
            if rule == "rank":
                order = sorted(range(pos.numel()), key=lambda j: (float(score[j]), int(pos[j])))
                cut = pos.numel() // 2
                lower = pos[order[:cut]] if cut else torch.zeros(0, dtype=torch.long)
                upper = pos[order[cut:]] if order else torch.zeros(0, dtype=torch.long)
            elif rule == "sign":
                lower_mask = score < 0 if modality == "video" else score <= 0
                lower, upper = pos[lower_mask], pos[~lower_mask]
            else:
                raise InputError(f"split rule must be 'rank' or 'sign', got {rule!r}")
            out[low], out[high] = torch.sort(lower.long()).values, torch.sort(upper.long()).values
        return SinkSplit(out["av"], out["va"], out["aa"], out["vv"], rule)

    def summary(self) -> "pd.DataFrame":
        """Median, quartiles, IQR and mean of the per-sink MDS, per modality (the paper's Table 12)."""
        return mds_summary([self])

    def to_frame(self) -> "pd.DataFrame":
        """One row per sink: position, modality, MDS and the layer-mean V and A."""
        import pandas as pd

        return pd.DataFrame({"position": self.positions.tolist(), "modality": self.modality,
                             "mds": self.mds.tolist(), "V": self.V.mean(0).tolist() if self.layers else [],
                             "A": self.A.mean(0).tolist() if self.layers else []})

    def __repr__(self) -> str:
        parts = []
        mds = self.mds
        for m in _MODALITIES:
            vals = mds[self._of(m)]
            med = f"{float(vals.median()):+.3f}" if vals.numel() else "n/a"
            parts.append(f"{m}={vals.numel()} (median {med})")
        return f"MDSResult({', '.join(parts)}, layers={len(self.layers)})"

    def _repr_html_(self) -> str:
        return (f"<b>{self!r}</b>" + self.summary().to_html(index=False, na_rep="-")
                + self.to_frame().head(20).to_html(index=False))

    def plot_heatmap(self, **kwargs: Any) -> "Figure":
        return plot_mds_heatmap(self, **kwargs)

    def plot(self, kind: str = "heatmap", **kwargs: Any) -> "Figure":
        """``kind="heatmap"`` (`plot_mds_heatmap`) or ``"distribution"`` (`plot_mds_distribution`)."""
        if kind not in ("heatmap", "distribution"):
            raise InputError(f"kind must be 'heatmap' or 'distribution', got {kind!r}")
        return plot_mds_heatmap(self, **kwargs) if kind == "heatmap" else plot_mds_distribution(self, **kwargs)

    def plot_distribution(self, **kwargs: Any) -> "Figure":
        return plot_mds_distribution(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "MDSResult", "version": 1, "positions": self.positions.tolist(), "modality": self.modality,
                "layers": list(self.layers), "V": self.V.tolist(), "A": self.A.tolist(), "eps": self.eps,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MDSResult":
        return cls(torch.tensor(data["positions"], dtype=torch.long), data["modality"], data["layers"],
                   torch.tensor(data["V"], dtype=torch.float32), torch.tensor(data["A"], dtype=torch.float32),
                   data["eps"], data.get("meta", {}))


def mds_summary(results: "MDSResult | Sequence[MDSResult]") -> "pd.DataFrame":
    """Per modality, statistics of the per-sink MDS pooled over ``results`` (e.g. 100 clips).

    >>> r = MDSResult(torch.tensor([1, 2]), ["video", "audio"], [0], torch.tensor([[0.3, 0.1]]),
    ...               torch.tensor([[0.1, 0.3]]))
    >>> mds_summary(r)[["modality", "n", "median"]].round(3).values.tolist()
    [['video', 1, 0.5], ['audio', 1, -0.5]]
    """
    import pandas as pd

    if isinstance(results, MDSResult):
        results = [results]
    rows = []
    for m in _MODALITIES:
        vals = [r.mds[r._of(m)] for r in results]
        pooled = torch.cat(vals).numpy() if vals else np.zeros(0)
        pooled = pooled[~np.isnan(pooled)]
        rows.append({"modality": m, **_stats(pooled)})
    return pd.DataFrame(rows)


def _media_counts(item: "AVInputs") -> tuple[int, int]:
    return int(item.spans.video.numel()), int(item.spans.audio.numel())


def _check_av(item: "AVInputs") -> None:
    n_video, n_audio = _media_counts(item)
    if n_video == 0 or n_audio == 0:
        raise InputError(f"modality dominance compares video and audio queries, so the input needs both; this one has "
                         f"{n_video} video and {n_audio} audio tokens")


def _sink_positions(sinks: Any, item: "AVInputs") -> tuple[torch.Tensor, list[str]]:
    """Video and audio sink positions (sorted) and their modality labels."""
    if isinstance(sinks, SinkResult):
        if sinks.length != len(item):
            raise InputError(f"this SinkResult is for {sinks.length} tokens but the input has {len(item)}")
        pos = sinks.positions
    else:
        pos = torch.as_tensor(sinks.tolist() if isinstance(sinks, torch.Tensor) else [int(p) for p in sinks],
                              dtype=torch.long).reshape(-1)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= len(item)):
            raise TokenSelectionError(f"sink positions must lie in [0, {len(item)})")
    codes = np.frombuffer(modality_codes(item).encode("ascii"), dtype=np.uint8)
    keep = np.unique(pos.numpy())
    video, audio = ord(MODALITY_CODES["video"]), ord(MODALITY_CODES["audio"])
    keep = keep[np.isin(codes[keep], [video, audio])]
    return torch.from_numpy(keep).long(), ["video" if codes[p] == video else "audio" for p in keep]


def modality_dominance(
    model: "AVModel",
    inputs: "AVInputs | Sequence[AVInputs]",
    sinks: Any,
    *,
    layers: Sequence[int] | None = None,
    fuse: bool | None = None,
    backend: str = "auto",
    batch_size: int = 1,
    progress: bool = True,
) -> "MDSResult | list[MDSResult]":
    """MDS of the video and audio sinks of each input (one prefill per batch, no attention maps).

    ``sinks``: a `SinkResult` (its kept video/audio sinks) or positions; for a list of inputs,
    a list with one per input. Sinks of other modalities (text, image) are left out.
    Raises `InputError` if an input lacks video or audio tokens.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="What is making the sound?")
    >>> res = modality_dominance(model, ex, [ex.spans.video[0], ex.spans.audio[0]])
    >>> res.modality, tuple(res.per_layer.shape), bool(res.mds.abs().max() <= 1)
    (['video', 'audio'], (4, 2), True)
    """
    items, single = as_list(inputs)
    if single or isinstance(sinks, SinkResult):
        per_item = [sinks] * len(items) if not single else [sinks]
    else:
        if not isinstance(sinks, (list, tuple)) or len(sinks) != len(items):
            raise InputError(f"for {len(items)} inputs pass a list of {len(items)} sink sets (SinkResult or positions)")
        per_item = list(sinks)
    for item in items:
        _check_av(item)
    found = [_sink_positions(s, it) for s, it in zip(per_item, items)]
    layer_list = check_layers(model, layers)
    results: list[MDSResult | None] = [None] * len(items)
    todo = [i for i, (pos, _) in enumerate(found) if pos.numel()]
    for i, (pos, labels) in enumerate(found):
        if pos.numel() == 0:
            empty = torch.zeros(len(layer_list), 0)
            results[i] = MDSResult(pos, labels, layer_list, empty, empty.clone())
    if todo:
        sums = column_attention_sums(model, [items[i] for i in todo], [found[i][0] for i in todo],
                                     ("video", "audio"), layer_list, strict=True, fuse=fuse, backend=backend,
                                     batch_size=batch_size, progress=progress)
        for i, res in zip(todo, sums):
            mean = res.mean()
            results[i] = MDSResult(found[i][0], found[i][1], layer_list, mean[:, 0], mean[:, 1])
    return results[0] if single else results  # type: ignore[return-value]


class SinkAnalysis(NamedTuple):
    """Sinks and their MDS from one prefill (unpacks as ``sinks, mds = ...``)."""

    sinks: SinkResult
    mds: MDSResult


def _stored_bytes(model: "AVModel", chunk: Sequence["AVInputs"]) -> int:
    """Memory that keeping q, k and the log-sum-exp of every layer costs for one batch."""
    config = model.adapter.text_config
    heads = model.num_heads
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or model.hidden_size // heads)
    elem = model.raw("embed").weight.element_size()
    per_token = (heads + kv_heads) * head_dim * elem + heads * 4
    return model.num_layers * len(chunk) * max(len(it) for it in chunk) * per_token


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


#: `sink_analysis(defer=None)` keeps every layer's q/k when that takes at most this share of free memory,
DEFER_MEMORY_SHARE = 0.25
#: and, on a GPU, when the input is at least this long: below it the streamed columns cost <= 6% of a
#: forward on an H200 and deferring gained nothing measurable (docs/benchmarks.md); on a CPU always.
DEFER_MIN_TOKENS_CUDA = 16_000


def _should_defer(model: "AVModel", chunk: Sequence["AVInputs"], defer: bool | None) -> bool:
    if defer is not None:
        return bool(defer)
    device = model.raw("embed").weight.device
    if device.type == "cuda" and max(len(it) for it in chunk) < DEFER_MIN_TOKENS_CUDA:
        return False
    free = _free_bytes(device)
    return free is not None and _stored_bytes(model, chunk) <= DEFER_MEMORY_SHARE * free


def _mds_from_sums(model: "AVModel", item: "AVInputs", gids: torch.Tensor, pos: torch.Tensor, labels: list[str],
                   layer_list: list[int], sums: torch.Tensor) -> "MDSResult":
    """``sums [L, 2, S]`` (summed over heads and rows) -> V and A means -> `MDSResult`."""
    counts = group_counts(gids, 2, pos, True)
    denom = (counts * model.num_heads).float()
    mean = torch.where(denom > 0, sums / denom.clamp(min=1), torch.zeros_like(sums))
    return MDSResult(pos, labels, layer_list, mean[:, 0], mean[:, 1])


def sink_analysis(
    model: "AVModel",
    inputs: "AVInputs | Sequence[AVInputs]",
    dims: Sequence[int] | None = None,
    tau: float | None = None,
    k_divide: float = 2,
    *,
    k: int | None = None,
    fuse: bool | None = None,
    backend: str = "auto",
    batch_size: int = 1,
    defer: bool | None = None,
    criterion: str | None = None,
    progress: bool = True,
) -> "SinkAnalysis | list[SinkAnalysis]":
    """`find_sinks` and `modality_dominance` in a single prefill.

    The sinks are known only after the last layer. ``defer=True`` keeps every layer's
    post-rotary q, k and row log-sum-exp (no copies: the tensors the forward made) and,
    after the last layer, reduces the attention to the global sinks' columns only: the cost
    grows with the number of sinks, the memory is ``layers x (heads + kv_heads) x T x
    head_dim`` elements (1.9 GB at 8k tokens, 6.5 GB at 28k for a 7B model in bf16).
    ``defer=False`` instead reduces every video/audio column at every layer on the fly to
    two numbers per column (``O(T)`` memory; one extra causal pass over the logits per
    layer). ``None`` (default) defers when the stored tensors take at most a quarter of the
    free memory (`DEFER_MEMORY_SHARE`), on a GPU only from 16k tokens on
    (`DEFER_MIN_TOKENS_CUDA`). Both give the same numbers (to float rounding); see
    docs/sinks.md for the measured cost.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="What is making the sound?")
    >>> sinks, mds = sink_analysis(model, ex, dims=[0], tau=0.0)   # tau 0: every token is a sink
    >>> sinks.K == len(ex) // 2, mds.positions.tolist() == sinks.positions.tolist()
    (True, True)
    """
    items, single = as_list(inputs)
    check_k(k_divide, k)
    for item in items:
        _check_av(item)
    dims = resolve_sink_dims(model, dims, items)
    tau = float(model.adapter.tau() if tau is None else tau)
    criterion = check_criterion(model.adapter.sink_criterion() if criterion is None else criterion)
    layer_list = list(range(model.num_layers))
    out: list[SinkAnalysis] = []
    for chunk in progress_batches(items, batch_size, progress, "sink analysis"):
        gids = [row_group_ids(it, {"video": None, "audio": None}) for it in chunk]   # 0 video, 1 audio, -1 rest
        kind = _DeferredColumns if _should_defer(model, chunk, defer) else _StreamedColumns
        columns = kind(chunk, gids, backend)
        scores_found, _ = run_prefill(
            model, chunk, residual_layers=layer_list, on_residual=lambda layer, h: sink_scores(h, dims, criterion),
            attention_layers=layer_list, on_attention=columns.on_attention, fuse=fuse)
        # Per layer to the CPU first: with device_map='auto' the layers sit on different GPUs.
        all_scores = torch.stack([scores_found[l].cpu() for l in layer_list])                # [L, B, T]
        found = []
        for i, item in enumerate(chunk):
            sinks = SinkResult(all_scores[:, i, :len(item)], layer_list, list(dims), tau, float(k_divide),
                               modality_codes(item), k, criterion=criterion)
            found.append((sinks, *_sink_positions(sinks, item)))
        sums = columns.sums(layer_list, [pos for _, pos, _ in found])
        for i, (item, (sinks, pos, labels)) in enumerate(zip(chunk, found)):
            out.append(SinkAnalysis(sinks, _mds_from_sums(model, item, gids[i], pos, labels, layer_list, sums[i])))
    return out[0] if single else out


class _StreamedColumns:
    """Every video/audio column reduced at every layer while the forward runs (``O(T)`` memory)."""

    def __init__(self, chunk: Sequence["AVInputs"], gids: list[torch.Tensor], backend: str) -> None:
        self.cols = [torch.sort(torch.cat([it.spans.video, it.spans.audio]).long()).values for it in chunk]
        self.col_batch, self.grp_batch = batch_tensors(chunk, self.cols, -1), batch_tensors(chunk, gids, -1)
        self.backend = backend
        self.found: dict[int, torch.Tensor] = {}

    def on_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> None:
        if self.col_batch.device != q.device:
            self.col_batch = self.col_batch.to(device=q.device, dtype=torch.int32)
            self.grp_batch = self.grp_batch.to(device=q.device, dtype=torch.int32)
        self.found[layer] = column_sums(q, k, lse, self.col_batch, self.grp_batch, 2, scale, True, self.backend,
                                        validate=False).sum(1)

    def sums(self, layer_list: list[int], positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per input, ``[L, 2, S]`` for its sinks ``positions`` (sorted media positions)."""
        every = torch.stack([self.found.pop(l).cpu() for l in layer_list])                 # [L, B, 2, S_media]
        return [every[:, i][:, :, torch.searchsorted(self.cols[i], pos)] for i, pos in enumerate(positions)]


class _DeferredColumns:
    """Each layer's q, k and lse kept (the forward's own tensors); only the sinks' columns reduced at the end."""

    def __init__(self, chunk: Sequence["AVInputs"], gids: list[torch.Tensor], backend: str) -> None:
        self.chunk, self.grp_batch, self.backend = chunk, batch_tensors(chunk, gids, -1), backend
        self.stored: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}

    def on_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> None:
        self.stored[layer] = (q, k, lse, scale)

    def sums(self, layer_list: list[int], positions: list[torch.Tensor]) -> list[torch.Tensor]:
        sink_cols = batch_tensors(self.chunk, positions, -1)
        if sink_cols.shape[1] == 0:
            self.stored.clear()
            return [torch.zeros(len(layer_list), 2, 0) for _ in positions]
        per_layer = []
        for layer in layer_list:
            q, k, lse, scale = self.stored.pop(layer)          # each layer's tensors freed once reduced
            if sink_cols.device != q.device:
                sink_cols = sink_cols.to(device=q.device, dtype=torch.int32)
                self.grp_batch = self.grp_batch.to(device=q.device, dtype=torch.int32)
            per_layer.append(column_sums(q, k, lse, sink_cols, self.grp_batch, 2, scale, True, self.backend,
                                         validate=False).sum(1))
            del q, k, lse
        every = torch.stack([t.cpu() for t in per_layer])                                    # [L, B, 2, S]
        return [every[:, i, :, :pos.numel()] for i, pos in enumerate(positions)]
