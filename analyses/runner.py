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
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from nnsight_av.errors import InputError

from .clips import ResultStore, error_record, merge_shards, run_clips, shard_info, shard_path  # noqa: F401
from .ablation import ablate
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

__all__ = ["ResultStore", "shard_info", "shard_path", "run_clips", "merge_shards", "analyze_clip", "trace_dataset",
           "PipelineResult", "PipelineConfig"]


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
    batch_size: int = 4
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
_NOT_RESULTS = frozenset({"batch_size", "skip_overwritten"})


def analyze_clip(model: "AVModel", record: ClipRecord, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Sinks + MDS, dominance (av / a / v) and, for a dominant clip, causal tracing; one JSON-ready dict.

    Forwards: one prefill for sinks and MDS that also serves as the clean run (letter
    probabilities + the site at every media position + keys / values), the two corrupted runs
    (letter probabilities + cached residuals / keys / values), then only the patched
    conditions. The processor prepares the two ablated inputs in a background thread while
    the first prefill runs.
    """
    config = config or PipelineConfig()
    options = list(config.options) if config.options is not None else list(record.options)
    clean = on_device(model, record.prepare(model))     # moved once: every analysis below reads it
    limit = max_positions(model)
    if limit is not None and len(clean) > limit:
        raise InputError(f"clip {record.id!r}: {len(clean)} tokens with its media, but the model takes {limit} "
                         "positions; shorten the clip or lower its fps")
    windows = make_windows(model.num_layers, config.layers, config.window)
    layers = sorted({l for w in windows for l in w})
    runner = PatchRunner(model, config.site, options, skip_overwritten=config.skip_overwritten)
    media = torch.sort(torch.cat([clean.spans.video, clean.spans.audio])).values
    with ThreadPoolExecutor(1) as pool:
        ablated = pool.submit(lambda: (ablate(clean, "video", model, method=config.ablation),    # the "a" run
                                       ablate(clean, "audio", model, method=config.ablation)))  # the "v" run
        clean_rec, (sinks, split) = runner.record_clean_during(
            lambda: pipeline_sinks(model, clean, config), clean, media, layers)
        only_audio, only_video = ablated.result()
    starts = sorted({w[0] for w in windows})
    if config.method == "exact":
        rec_a = runner.record_corrupt(only_audio, starts)
        rec_v = runner.record_corrupt(only_video, starts)
        probs = {"av": clean_rec.probs, "a": rec_a.probs, "v": rec_v.probs}
    else:
        rec_a = rec_v = None
        probs = {"av": clean_rec.probs, "a": runner.corrupt_probs(only_audio), "v": runner.corrupt_probs(only_video)}
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
        corrupt, corrupt_rec = (only_video, rec_v) if dominant == "audio" else (only_audio, rec_a)
        rec_a = rec_v = None                                                   # free the other cache
        patched = "video" if dominant == "audio" else "audio"
        names = list(config.token_sets)
        if config.object_set and record.objects is not None and "object" not in names:
            names.append("object")
        sets = resolve_token_sets(clean, patched, names, sinks=sinks, split=split,
                                  objects=record.resolved_objects(), seed=config.seed, clip=record.id)
        result = trace_clip(runner, clean, corrupt, sets, windows, config.method, clip=record.id, dominant=dominant,
                            clean_record=clean_rec, corrupt_record=corrupt_rec, batch_size=config.batch_size)
        result.meta = {"site": runner.site, "method": config.method, "options": options, "seed": config.seed,
                       "split_rule": config.split_rule, "windows": [list(w) for w in windows]}
        out["trace"] = result.to_records()[0]
    return out


def pipeline_sinks(model: "AVModel", clean: Any, config: PipelineConfig) -> tuple[Any, Any]:
    """Global sinks of ``clean`` and their MDS split, as `analyze_clip` computes them."""
    sinks, scores = sink_analysis(model, clean, progress=False, **config.sinks.search_kwargs())
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
                "dominance": self.dominance.counts(),
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
    ``overwrite=True`` (which starts it again).
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
    done = run_clips(records, lambda rec: analyze_clip(model, rec, config), out, rank=rank, world_size=world_size,
                     retry_errors=retry_errors, progress=progress, desc="trace", settings=config.settings(model),
                     overwrite=overwrite, wait_timeout=wait_timeout)
    return PipelineResult(done, config.to_dict())
