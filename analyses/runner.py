"""The whole pipeline over clip data sets: sinks + MDS, dominance and causal tracing per clip.

`trace_dataset` runs sinks + MDS, the av / a / v dominance test and causal tracing for
each clip (`analyze_clip`), sharing the clean and corrupted forwards between them. Its
runs are resumable and sharded by `analyses.clips.run_clips` (`ResultStore`, `shard_info`,
`run_clips` ... are re-exported here for old imports).
"""

from __future__ import annotations

import difflib
import json
import operator
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from nnsight_av.errors import InputError

from .clips import ResultStore, error_record, merge_shards, run_clips, shard_info, shard_path  # noqa: F401
from .ablation import ablate
from .batching import choose_batch_size, length_batches, pipeline_token_bytes, prefetched, resolve_batch_size
from .datasets import ClipRecord, DatasetCheck, check_dataset, max_positions
from .dominance import DominanceResult, dominance_label
from .mds import sink_analysis
from .options import on_device
from .sink_config import SINK_SHORTCUTS, SinkConfig
from .sinks import resolve_sink_dims
from .plots import plot_pipeline
from .results import RecordsResult
from .store import model_identity  # noqa: F401 - old import path
from .store import replace_text, require_finite, settings_path
from .tracing import (METHODS, TOKEN_SETS, PatchRunner, TraceResult, canonical_site, make_windows,
                      registered_token_sets, resolve_token_sets, trace_clip)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVModel

__all__ = ["ResultStore", "shard_info", "shard_path", "run_clips", "merge_shards", "analyze_clip", "analyze_batch",
           "analyze_clips", "clips_per_batch", "trace_dataset", "PipelineResult", "PipelineConfig"]


# ---------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------
@dataclass
class PipelineConfig:
    """Settings of `analyze_clip` / `trace_dataset` (every default of METHOD.md sections 2-5).

    ``sinks``: a `SinkConfig` (default: N = 2, the tracing default); ``k_divide``, ``sink_dims``,
    ``tau``, ``split_rule`` are shortcuts that override its fields and read back the effective values.
    """

    token_sets: Sequence[str] = ("all", "sink", "random", "cross_modal_sink", "unimodal_sink",
                                 "random_cross_modal_sink")
    site: str = "input_layernorm"
    layers: Sequence[int] | None = None
    window: int | None = None
    method: str = "exact"
    ablation: str = "raw"
    correctness: bool = False
    k_divide: float | None = None
    sink_dims: Sequence[int] | None = None
    tau: float | None = None
    criterion: str | None = None
    split_rule: str | None = None
    seed: int = 0
    batch_size: int = 4                       # patched conditions per forward
    clip_batch: int | str = "auto"            # clips per batch of a data-set run (`analyze_clips`)
    skip_overwritten: bool = True
    options: Any = None                       # None: each record's own options
    object_set: bool = True                   # add the "object" set for clips with object annotations
    sinks: SinkConfig | None = None

    def __post_init__(self) -> None:
        sinks = SinkConfig.from_dict(self.sinks).with_(dims=self.sink_dims, tau=self.tau, k_divide=self.k_divide,
                                                       split_rule=self.split_rule, criterion=self.criterion)
        self.sinks = sinks
        self.k_divide, self.sink_dims, self.tau, self.split_rule, self.criterion = \
            sinks.k_divide, sinks.dims, sinks.tau, sinks.split_rule, sinks.criterion

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON (the sink settings under ``"sinks"`` and, for old readers, flat too)."""
        return {k: (list(v) if isinstance(v, tuple) else v.to_dict() if isinstance(v, SinkConfig) else v)
                for k, v in self.__dict__.items()}

    def validate(self) -> "PipelineConfig":
        """Check every setting that needs no model (names, ranges); `InputError` on the first bad one.

        Run before the model loads, so a typo fails the run at once instead of every clip.

        >>> PipelineConfig(site="resid_mid").validate()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nnsight_av.errors.InputError: unknown site 'resid_mid' for patching; choose one of ('input_layernorm', \
'resid_pre', 'resid_post', 'attn_output', 'mlp_output') (aliases: [...])
        """
        canonical_site(self.site)
        names = [self.token_sets] if isinstance(self.token_sets, str) else list(self.token_sets)
        if not names:
            raise InputError("token_sets is empty: name at least one token set")
        known = list(TOKEN_SETS) + list(registered_token_sets())     # registered: analyses.controls' sets
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InputError(f"unknown token set {name!r}{hint}; known sets: {known}")
        if self.method not in METHODS:
            raise InputError(f"unknown tracing method {self.method!r}; choose one of {list(METHODS)}")
        if self.ablation not in ("raw", "encoder"):
            raise InputError(f"ablation must be 'raw' or 'encoder', got {self.ablation!r}")
        if self.split_rule not in ("rank", "sign"):
            raise InputError(f"split_rule must be 'rank' or 'sign', got {self.split_rule!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise InputError(f"window must be a positive number of layers (or None), got {self.window!r}")
        require_finite("k_divide", self.k_divide, low=1e-6)
        if self.tau is not None:
            require_finite("tau", self.tau, low=0.0)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {self.batch_size!r}")
        self.clip_batch = resolve_batch_size(self.clip_batch) or "auto"
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an int, got {self.seed!r}")
        for what in ("sink_dims", "layers"):
            values = getattr(self, what)
            if values is None:
                continue
            try:
                if isinstance(values, (str, bytes)) or any(isinstance(v, bool) for v in values):
                    raise TypeError
                setattr(self, what, [operator.index(v) for v in values])    # numpy / torch ints become ints
            except TypeError:
                raise InputError(f"{what} must be a list of ints, got {values!r}") from None
        self._sync_sinks()
        return self

    def _sync_sinks(self) -> None:
        """Flat sink fields set after construction (``trace_dataset`` overrides, `validate`'s int
        conversion) win over ``sinks``, so the search runs with what the settings record says."""
        self.__post_init__()

    def validate_for(self, model: "AVModel") -> "PipelineConfig":
        """`validate`, then the settings that need the model: sink dims, layers, window against its sizes."""
        self.validate()
        if self.sink_dims is not None:
            resolve_sink_dims(model, self.sink_dims)
        make_windows(model.num_layers, self.layers, self.window)
        if self.window is not None and self.window > model.num_layers:
            raise InputError(f"window {self.window} is larger than the model's {model.num_layers} layers")
        return self

    def settings(self, model: "AVModel | None" = None) -> dict[str, Any]:
        """What a result file records about the run (every setting that changes a record, and the model)."""
        out = {k: v for k, v in self.to_dict().items() if k not in _NOT_RESULTS}
        if model is not None:
            out["model"] = model_identity(model)
        return out


#: Settings that change speed, not records (a resume may change them).
_NOT_RESULTS = frozenset({"batch_size", "clip_batch", "skip_overwritten"})


def analyze_clip(model: "AVModel", record: ClipRecord, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Sinks + MDS, dominance (av / a / v) and, for a dominant clip, causal tracing; one JSON-ready dict.

    Forwards: one prefill for sinks and MDS that also serves as the clean run (letter
    probabilities + the site at every media position + keys / values), the two corrupted runs
    as one batch of two (letter probabilities + cached residuals / keys / values), then only
    the patched conditions (batched, `PatchRunner.run`). The processor prepares the two ablated inputs in a background thread while
    the first prefill runs. `analyze_batch` runs several clips through the same steps at once.
    """
    config = config or PipelineConfig()
    clean = clean_input(model, record)
    with ThreadPoolExecutor(1) as pool:
        ablated = pool.submit(ablated_inputs, model, clean, config)
        clip = _Clip(record, clean)
        _clean_stage(model, [clip], config)
        clip.only_audio, clip.only_video = ablated.result()
    _corrupt_stage(model, [clip], config)
    return _finish(model, clip, config)


def clean_input(model: "AVModel", record: ClipRecord) -> Any:
    """``record`` prepared and on the model's device, checked against the model's positions."""
    clean = on_device(model, record.prepare(model))     # moved once: every analysis below reads it
    limit = max_positions(model)
    if limit is not None and len(clean) > limit:
        raise InputError(f"clip {record.id!r}: {len(clean)} tokens with its media, but the model takes {limit} "
                         "positions; shorten the clip or lower its fps")
    return clean


def ablated_inputs(model: "AVModel", clean: Any, config: PipelineConfig) -> tuple[Any, Any]:
    """The "a" run (video removed) and the "v" run (audio removed) of ``clean``."""
    return (ablate(clean, "video", model, method=config.ablation),
            ablate(clean, "audio", model, method=config.ablation))


@dataclass
class _Clip:
    """One clip on its way through the pipeline's stages."""

    record: ClipRecord
    clean: Any
    only_audio: Any = None
    only_video: Any = None
    options: list[str] = field(default_factory=list)
    runner: Any = None
    clean_rec: Any = None
    rec_a: Any = None
    rec_v: Any = None
    probs: dict[str, torch.Tensor] = field(default_factory=dict)
    sinks: Any = None
    split: Any = None


def _options(config: PipelineConfig, record: ClipRecord) -> list[str]:
    return list(config.options) if config.options is not None else list(record.options)


def _windows(model: "AVModel", config: PipelineConfig) -> list[tuple[int, ...]]:
    return make_windows(model.num_layers, config.layers, config.window)


def _clean_stage(model: "AVModel", clips: list[_Clip], config: PipelineConfig) -> None:
    """Sinks + MDS of every clip in one (padded) prefill, the clean records riding on it.

    The clips share their answer options (one `PatchRunner` reads the letters).
    """
    options = _options(config, clips[0].record)
    runner = PatchRunner(model, config.site, options, skip_overwritten=config.skip_overwritten)
    layers = sorted({l for w in _windows(model, config) for l in w})
    cleans = [c.clean for c in clips]
    media = [torch.sort(torch.cat([x.spans.video, x.spans.audio])).values for x in cleans]
    records, found = runner.record_clean_batch_during(lambda: pipeline_sinks(model, cleans, config), cleans, media,
                                                      layers)
    for clip, rec, (sinks, split) in zip(clips, records, found):
        clip.options, clip.runner, clip.clean_rec, clip.sinks, clip.split = options, runner, rec, sinks, split


def _corrupt_stage(model: "AVModel", clips: list[_Clip], config: PipelineConfig) -> None:
    """The "a" and "v" runs of every clip, all in one padded forward (one host pass for twice the rows)."""
    runner = clips[0].runner
    items = [c.only_audio for c in clips] + [c.only_video for c in clips]
    n = len(clips)
    if config.method == "exact":
        starts = sorted({w[0] for w in _windows(model, config)})
        recs = runner.record_corrupt_batch(items, starts)
        recs_a, recs_v = recs[:n], recs[n:]
        probs_a, probs_v = [r.probs for r in recs_a], [r.probs for r in recs_v]
    else:
        recs_a = recs_v = [None] * n
        probs = runner.corrupt_probs_batch(items)
        probs_a, probs_v = probs[:n], probs[n:]
    for clip, rec_a, rec_v, p_a, p_v in zip(clips, recs_a, recs_v, probs_a, probs_v):
        clip.rec_a, clip.rec_v = rec_a, rec_v
        clip.probs = {"av": clip.clean_rec.probs, "a": p_a, "v": p_v}


def _finish(model: "AVModel", clip: _Clip, config: PipelineConfig) -> dict[str, Any]:
    """Dominance from the three runs and, for a dominant clip, the patched conditions: the clip's record."""
    record, options, probs, sinks, split = clip.record, clip.options, clip.probs, clip.sinks, clip.split
    answers = {k: options[int(p.argmax())] for k, p in probs.items()}
    label = dominance_label(answers, record.label, config.correctness)
    dominant = record.dominant or (label if label in ("audio", "video") else None)
    out: dict[str, Any] = {
        "id": record.id, "status": "ok", "dominance": label, "answers": answers,
        "probs": {k: p.tolist() for k, p in probs.items()}, "options": options, "label": record.label,
        "correct": {k: a == record.label for k, a in answers.items()} if record.label is not None else None,
        "sinks": {"video": sinks.video.tolist(), "audio": sinks.audio.tolist(),
                  "split": split.to_dict() if split is not None else None},
        "trace": None,
    }
    if dominant is not None:
        corrupt, corrupt_rec = ((clip.only_video, clip.rec_v) if dominant == "audio" else
                                (clip.only_audio, clip.rec_a))
        clip.rec_a = clip.rec_v = None                                         # free the other cache
        patched = "video" if dominant == "audio" else "audio"
        names = list(config.token_sets)
        if config.object_set and record.objects is not None and "object" not in names:
            names.append("object")
        windows = _windows(model, config)
        sets = resolve_token_sets(clip.clean, patched, names, sinks=sinks, split=split,
                                  objects=record.resolved_objects(), seed=config.seed, clip=record.id)
        result = trace_clip(clip.runner, clip.clean, corrupt, sets, windows, config.method, clip=record.id,
                            dominant=dominant, clean_record=clip.clean_rec, corrupt_record=corrupt_rec,
                            batch_size=config.batch_size)
        result.meta = {"site": clip.runner.site, "method": config.method, "options": options, "seed": config.seed,
                       "split_rule": config.split_rule, "windows": [list(w) for w in windows]}
        out["trace"] = result.to_records()[0]
    clip.rec_a = clip.rec_v = clip.clean_rec = None
    return out


def analyze_batch(model: "AVModel", records: Sequence[ClipRecord], config: PipelineConfig | None = None
                  ) -> list["dict[str, Any] | Exception"]:
    """`analyze_clip` of several clips at once: each clip's record, or the exception that stopped it.

    Clips with the same answer options share their sink/clean prefill and their two corrupted
    forwards (one right-padded batch each); the patched conditions run per clip. Each record
    equals `analyze_clip`'s to float rounding (a batch of one: exactly). When a batched step
    fails (e.g. out of memory), its clips are run one by one, so a failure stays with its clip.

    >>> import nnsight_av as nav
    >>> from analyses.datasets import ClipRecord
    >>> model = nav.testing.tiny_model()
    >>> clips = [ClipRecord(id=str(s), prompt="Which?", options=list("AB"), dominant="audio",
    ...                     frames=nav.testing.synthetic_frames(s, 2, 56), wave=nav.testing.synthetic_tone(s))
    ...          for s in (2.0, 4.0)]
    >>> config = PipelineConfig(token_sets=("all",), sink_dims=[0, 1], tau=2.0)
    >>> out = analyze_batch(model, clips, config)
    >>> [r["id"] for r in out], out[1]["trace"] is not None
    (['2.0', '4.0'], True)
    """
    config = config or PipelineConfig()
    prepared = [_prepared(model, r, config) for r in records]
    by_id = {r.id: out for r, out in _run_prepared(model, list(zip(records, prepared)), config, len(records))}
    return [by_id[r.id] for r in records]


#: With ``clip_batch`` > 1, clips are prepared in groups of this many batches (of the next ``AUTO_WINDOW``
#: clips with ``"auto"``), the next group while the model runs the current one, and sorted by length within
#: a group. Only the first group's preparation is not hidden behind the model's work.
WINDOW_BATCHES = 2
AUTO_WINDOW = 16


def analyze_clips(model: "AVModel", records: Sequence[ClipRecord], config: PipelineConfig | None = None, *,
                  stats: dict[str, Any] | None = None) -> Iterator[tuple[ClipRecord, "dict[str, Any] | Exception"]]:
    """``(record, result or exception)`` for every clip, batched for throughput (what `trace_dataset` runs).

    ``config.clip_batch``: clips per batch, or ``"auto"``: on a GPU as many as half the free
    memory holds, at most 16k tokens a batch (`analyses.batching.choose_batch_size`, recalibrated
    from each group's measured peak), on a CPU one (its forwards gain nothing from batching).
    The next clips are prepared (processor, ablated copies) on a thread while the model runs,
    sorted by length (`length_batches`) and grouped by answer options. ``stats`` (a dict)
    receives the batch sizes used and, on a GPU, ``peak_memory_gib`` (the most allocated at
    once, the weights included). Results come batch by batch, in each batch's order.
    """
    config = config or PipelineConfig()
    fixed = clips_per_batch(model, config)
    device = model.raw("embed").weight.device
    cuda = device.type == "cuda"
    window = AUTO_WINDOW if fixed is None else 1 if fixed == 1 else WINDOW_BATCHES * fixed
    groups = [list(records[i:i + window]) for i in range(0, len(records), window)]
    stats = stats if stats is not None else {}
    stats.setdefault("batch_sizes", [])
    token_bytes = pipeline_token_bytes(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for group, prepared in prefetched(groups, lambda g: [_prepared(model, r, config) for r in g]):
        pairs = list(zip(group, prepared))
        lengths = [len(p.clean) for p in prepared if isinstance(p, _Clip)]
        size = fixed or choose_batch_size(model, max(lengths, default=1), token_bytes=token_bytes)
        base, before = (torch.cuda.memory_allocated(device) if cuda else 0), len(stats["batch_sizes"])
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        yield from _run_prepared(model, pairs, config, size, stats)
        if cuda and lengths:
            peak = torch.cuda.max_memory_allocated(device)
            stats["peak_memory_gib"] = max(stats.get("peak_memory_gib", 0.0), peak / 2**30)
            used = max(stats["batch_sizes"][before:] or [1])
            token_bytes = max(token_bytes, (peak - base) // max(1, used * max(lengths)))   # measured calibration
    if cuda:
        stats.setdefault("peak_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30)


def clips_per_batch(model: "AVModel", config: PipelineConfig) -> int | None:
    """``config.clip_batch`` for ``model``: a fixed number, or None to choose from free memory (a GPU);
    ``"auto"`` on a CPU is 1 (its forwards are compute-bound: batching would add padding, not speed)."""
    fixed = resolve_batch_size(config.clip_batch)
    if fixed is None and model.raw("embed").weight.device.type != "cuda":
        return 1
    return fixed


def _prepared(model: "AVModel", record: ClipRecord, config: PipelineConfig) -> "_Clip | Exception":
    """The clip's inputs (clean and both ablated), or the exception that stopped its preparation."""
    try:
        clean = clean_input(model, record)
        clip = _Clip(record, clean)
        clip.only_audio, clip.only_video = ablated_inputs(model, clean, config)
        return clip
    except Exception as error:                          # noqa: BLE001 - a clip's failure is its record
        return error


def _run_prepared(model: "AVModel", pairs: list[tuple[ClipRecord, Any]], config: PipelineConfig, size: int,
                  stats: dict[str, Any] | None = None) -> Iterator[tuple[ClipRecord, Any]]:
    """Batches of at most ``size`` prepared clips (same options, sorted by length) through the stages."""
    ready: list[_Clip] = []
    for record, prepared in pairs:
        if isinstance(prepared, Exception):
            yield record, prepared
        else:
            ready.append(prepared)
    by_options: dict[tuple[str, ...], list[_Clip]] = {}
    for clip in ready:
        by_options.setdefault(tuple(_options(config, clip.record)), []).append(clip)
    for clips in by_options.values():
        for rows in length_batches([len(c.clean) for c in clips], size):
            batch = [clips[i] for i in rows]
            if stats is not None:
                stats.setdefault("batch_sizes", []).append(len(batch))
            yield from _run_stages(model, batch, config)


def _run_stages(model: "AVModel", batch: list[_Clip], config: PipelineConfig
                ) -> Iterator[tuple[ClipRecord, Any]]:
    failed: Exception | None = None
    try:
        _clean_stage(model, batch, config)
        _corrupt_stage(model, batch, config)
    except Exception as error:                          # noqa: BLE001 - a clip's failure is its record
        failed = error
    if failed is not None:
        if len(batch) == 1:
            yield batch[0].record, failed
            return
        failed = None                                   # its traceback holds the batch's tensors: drop them first
        for clip in batch:                              # one by one: the failure stays with its clip
            clip.clean_rec = clip.rec_a = clip.rec_v = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for clip in batch:
            yield from _run_stages(model, [clip], config)
        return
    for clip in batch:
        try:
            yield clip.record, _finish(model, clip, config)
        except Exception as error:                      # noqa: BLE001
            yield clip.record, error


def pipeline_sinks(model: "AVModel", clean: Any, config: PipelineConfig) -> Any:
    """Global sinks of ``clean`` and their MDS split, as `analyze_clip` computes them (a list of
    such pairs for a list of inputs, from one padded prefill)."""
    found = sink_analysis(model, clean, progress=False, batch_size=len(clean) if isinstance(clean, list) else 1,
                          **config.sinks.search_kwargs())
    if isinstance(clean, list):
        return [(sinks, scores.split(rule=config.split_rule)) for sinks, scores in found]
    sinks, scores = found
    return sinks, scores.split(rule=config.split_rule)


@dataclass
class PipelineResult(RecordsResult):
    """The records of a `trace_dataset` run, with the traced clips as a `TraceResult`.

    ``config``: the settings (`PipelineConfig.to_dict`); `save` writes it beside the records
    (``<path>.settings.json``, where a `trace_dataset` output keeps its settings), so `load` of
    a run file reads the run's settings too.
    """

    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)   # this call's clips, seconds, clips/hour, batches

    @property
    def trace(self) -> "TraceResult | None":
        traced = [r["trace"] for r in self.records if r.get("status") == "ok" and r.get("trace")]
        return TraceResult.from_records(traced) if traced else None

    @property
    def dominance(self) -> "DominanceResult":
        return DominanceResult(list(self.records))

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "error"]

    def facts(self) -> dict[str, Any]:
        """The headline numbers as a dict: clips, errors, dominance counts and the trace table (x100).

        This was ``summary()`` before the result protocol made ``summary()`` a DataFrame.
        """
        trace = self.trace
        table = trace.table() if trace is not None else None
        return {"clips": len(self.records), "errors": len(self.errors),
                "dominance": self.dominance.counts(), "throughput": dict(self.throughput),
                "table_x100": {k: {c: float(v) for c, v in row.items()} for k, row in table.iterrows()}
                if table is not None else {}}

    def summary(self) -> "pd.DataFrame":
        """One row: clips, failed clips, clips per dominance label and traced clips (`facts` has the trace table)."""
        import pandas as pd

        counts = self.dominance.counts()
        return pd.DataFrame([{"clips": len(self.records), "errors": len(self.errors),
                              **{label: n for label, n in counts.items() if label != "error"},
                              "traced": sum(bool(r.get("trace")) for r in self.records)}])

    def to_frame(self) -> "pd.DataFrame":
        """One row per clip: its dominance columns (`DominanceResult.to_frame`), sinks kept per modality, traced."""
        frame = self.dominance.to_frame()
        for modality in ("video", "audio"):
            frame[f"{modality}_sinks"] = [len((r.get("sinks") or {}).get(modality) or []) for r in self.records]
        frame["traced"] = [bool(r.get("trace")) for r in self.records]
        return frame

    def plot(self) -> "Figure":
        """Dominance counts and the traced clips' effects; see `analyses.plots.plot_pipeline`."""
        return plot_pipeline(self)

    def save(self, path: str | os.PathLike) -> Path:
        """One JSON line per clip, and ``config`` in ``<path>.settings.json``."""
        path = super().save(path)
        replace_text(settings_path(path), json.dumps(self.config, indent=1, sort_keys=True))
        return path

    @classmethod
    def _from_saved(cls, records: list[dict[str, Any]], path: Path) -> "PipelineResult":
        sidecar = settings_path(path)
        return cls(records, json.loads(sidecar.read_text()) if sidecar.exists() else {})


def trace_dataset(
    model: "AVModel",
    dataset: "str | os.PathLike | Iterable[Any] | DatasetCheck",
    out: str | os.PathLike,
    config: PipelineConfig | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    wait_timeout: float | None = None,
    **overrides: Any,
) -> PipelineResult:
    """`analyze_clip` over a data set, resumable and shardable (`run_clips`).

    ``overrides`` set `PipelineConfig` fields (``token_sets=...``, ``window=1`` ...). The
    settings are checked (`PipelineConfig.validate_for`) and the data set read and checked
    (`check_dataset`) before any clip runs; invalid records and clips that fail become error
    records. ``out`` keeps the settings and model it was made with (``<out>.settings.json``):
    resuming it under others raises `analyses.store.SettingsMismatchError` unless
    ``overwrite=True`` (which starts it again). Clips run in batches (`analyze_clips`;
    ``clip_batch=`` sets the clips per batch, default ``"auto"``: from free memory on a GPU, one
    on a CPU; with one, `analyze_clip` runs clip by clip in data set order); the result's
    ``throughput`` (and `PipelineResult.facts`) gives the clips/hour.
    """
    config = config or PipelineConfig()
    if "sinks" in overrides:
        # the flat shortcuts hold the old config's values and would win over the new one; given ones still do
        for name in SINK_SHORTCUTS:
            setattr(config, name, None)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise InputError(f"unknown pipeline setting {key!r}; known: {sorted(config.__dict__)}")
        setattr(config, key, value)
    config._sync_sinks()
    config.validate_for(model)
    records = check_dataset(dataset, model).records
    stats: dict[str, Any] = {}
    done = run_clips(records, lambda rec: analyze_clip(model, rec, config), out, rank=rank, world_size=world_size,
                     retry_errors=retry_errors, progress=progress, desc="trace", settings=config.settings(model),
                     overwrite=overwrite, wait_timeout=wait_timeout, stats=stats,
                     batched=None if clips_per_batch(model, config) == 1 else     # 1: clip by clip, in order
                     lambda todo: analyze_clips(model, todo, config, stats=stats))
    return PipelineResult(done, config.to_dict(), _throughput(stats))


def _throughput(stats: dict[str, Any]) -> dict[str, Any]:
    sizes = stats.get("batch_sizes") or []
    out = {"clips": stats.get("clips", 0), "seconds": stats.get("seconds", 0.0),
           "clips_per_hour": stats.get("clips_per_hour", 0.0), "batches": len(sizes),
           "max_batch_size": max(sizes, default=0)}
    if "peak_memory_gib" in stats:
        out["peak_memory_gib"] = round(float(stats["peak_memory_gib"]), 3)
    return out
