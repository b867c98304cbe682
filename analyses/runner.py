"""Long runs over clip data sets: resumable JSONL results, sharding over processes, the whole pipeline.

- Every finished clip is appended to the output JSONL at once (flushed and synced), so a
  crash loses at most the clip in flight; rerunning the same command skips every clip
  whose record is saved (a clip that fails, or a record that failed `check_dataset`, gets
  an error record too, and is not retried unless ``retry_errors=True``). The file rules
  (append-only, one writer, settings recorded beside it) are `analyses.store`'s.
- Sharding: with ``RANK`` / ``WORLD_SIZE`` set (torchrun and accelerate set them; no
  process group is needed), rank ``r`` of ``w`` takes the clips ``i % w == r`` and writes
  ``<out>.shard<r>of<w>.jsonl``; when all ranks are done, rank 0 merges the shards into
  ``<out>`` in data set order.
- `trace_dataset` runs sinks + MDS, the av / a / v dominance test and causal tracing for
  each clip (`analyze_clip`), sharing the clean and corrupted forwards between them.
"""

from __future__ import annotations

import contextlib
import operator
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from nnsight_av.errors import InputError

from .datasets import ClipRecord, DatasetCheck, InvalidRecord, check_dataset
from .store import (OutputLock, OutputLockedError, append_jsonl, check_settings, read_jsonl, remove_output,
                    repair_tail, write_jsonl)

if TYPE_CHECKING:
    from nnsight_av import AVModel

    from .dominance import DominanceResult
    from .tracing import TraceResult

__all__ = ["ResultStore", "shard_info", "shard_path", "run_clips", "merge_shards", "analyze_clip", "trace_dataset",
           "PipelineResult", "PipelineConfig"]


# ---------------------------------------------------------------------------------------
# JSONL store
# ---------------------------------------------------------------------------------------
class ResultStore:
    """An append-only JSONL file of per-clip records keyed by ``id`` (see `analyses.store`).

    The process that writes the file opens it with ``repair=True``: a torn last line (the
    process died while writing it) is cut off, so the next append starts on a fresh line and
    the clip is simply computed again. Readers skip (and count) lines that do not parse.
    """

    def __init__(self, path: str | os.PathLike, repair: bool = True) -> None:
        self.path = Path(path)
        if repair:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_tail(self.path)

    def records(self) -> list[dict[str, Any]]:
        """Every record with an ``id``, the last one of each id (bad lines skipped with a warning)."""
        return read_jsonl(self.path, key="id")

    def append(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.path, record)


def shard_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from the arguments or the ``RANK`` / ``WORLD_SIZE`` environment (default 0, 1)."""
    world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))
    rank = int(rank if rank is not None else os.environ.get("RANK", 0))
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"bad shard: rank {rank} of world size {world}")
    return rank, world


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """``results.jsonl`` -> ``results.shard0of2.jsonl`` (rank 0 of 2)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard{rank}of{world_size}{out.suffix or '.jsonl'}")


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.stem}.shard*of*{out.suffix or '.jsonl'}"))


def _saved(out: Path, warn: bool = True) -> dict[str, dict[str, Any]]:
    """Every saved record for ``out``: the merged file and any shard files (of any world size).

    A clip saved twice (an error record, then a retry) keeps its last record.
    """
    found: dict[str, dict[str, Any]] = {}
    for path in [out] + _shard_files(out):
        for record in read_jsonl(path, key="id", warn=warn):
            found[str(record["id"])] = record
    return found


def merge_shards(out: str | os.PathLike, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Merge ``out`` and its shard files into ``out`` (records in ``order`` of ids, then the rest), remove the shards.

    ``out`` is replaced atomically (a temporary file, then a rename) before any shard is removed,
    so a kill at any point loses no record.
    """
    out = Path(out)
    found = _saved(out)
    ids = list(order or [])
    ids += [i for i in found if i not in set(ids)]
    merged = [found[i] for i in ids if i in found]
    write_jsonl(out, merged)
    for path in _shard_files(out):
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".lock").unlink(missing_ok=True)
    return merged


def error_record(clip_id: str, error: BaseException) -> dict[str, Any]:
    """The record of a clip that could not be run: its id, ``status: "error"``, the error's kind and text."""
    return {"id": clip_id, "status": "error", "error_type": type(error).__name__, "error": str(error)}


def _invalid_record(record: InvalidRecord) -> dict[str, Any]:
    out = {"id": record.id, "status": "error", "error_type": record.error_type, "error": record.error}
    if record.line is not None:
        out["line"] = record.line
    return out


#: Seconds rank 0 waits for the other ranks' next record before it gives up (NNSIGHT_AV_WAIT_TIMEOUT overrides).
DEFAULT_WAIT_TIMEOUT = 3600.0
#: Seconds rank 0 waits when no other rank holds its shard's lock (that rank is not running).
PEER_GRACE = 120.0


def _wait_timeout(value: float | None) -> float:
    if value is None:
        value = float(os.environ.get("NNSIGHT_AV_WAIT_TIMEOUT", DEFAULT_WAIT_TIMEOUT))
    if not value > 0:
        raise InputError(f"wait_timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def _writer_alive(path: Path) -> bool:
    """Whether some process holds the lock of ``path`` (a running rank writes it)."""
    lock = OutputLock(path)
    if not lock.lock_path.exists():
        return False
    try:
        lock.acquire()
    except OutputLockedError:
        return True
    lock.release()
    return False


def _wait_for_ranks(out: Path, order: Sequence[str], world: int, retry_errors: bool, timeout: float,
                    grace: float) -> None:
    """Rank 0: wait until every clip has a record in some shard; fail clearly when the others stop."""
    last_count, last_progress, dead_since, pause = -1, time.time(), None, 0.2
    while True:
        found = _saved(out, warn=False)            # another rank may be halfway through writing a line
        if retry_errors:
            found = {k: v for k, v in found.items() if v.get("status") != "error"}
        missing = [(i, clip) for i, clip in enumerate(order) if clip not in found]
        if not missing:
            return
        now = time.time()
        if len(found) != last_count:
            last_count, last_progress = len(found), now
        owing = sorted({i % world for i, _ in missing})
        alive = [r for r in owing if _writer_alive(shard_path(out, r, world))]
        dead_since = None if alive else (dead_since or now)
        stalled = now - last_progress > timeout
        if stalled or (dead_since is not None and now - dead_since > grace):
            why = (f"no other rank has written a record for {timeout:.0f} s" if stalled else
                   f"rank(s) {owing} are not running (no process holds their shard lock)")
            raise TimeoutError(
                f"rank 0 gave up waiting: {why}; {len(missing)} clips have no record yet (first: "
                f"{[c for _, c in missing[:3]]}). Restart the missing rank(s) with the same command (they resume), "
                f"or rerun with one process: every saved record is kept. (wait_timeout={timeout:.0f} s, "
                "env NNSIGHT_AV_WAIT_TIMEOUT)")
        time.sleep(pause)
        pause = min(2.0, pause * 1.5)


def run_clips(
    records: Sequence[ClipRecord | InvalidRecord],
    fn: Callable[[ClipRecord], Mapping[str, Any]],
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    desc: str = "clips",
    merge: bool = True,
    wait_timeout: float | None = None,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run ``fn`` on each clip not saved yet, appending each result to the JSONL ``out``.

    ``fn(record)`` returns a JSON-ready dict (its ``id`` is set to the clip's). Any exception
    it raises (unreadable media, a clip without audio, a numerical failure ...) becomes an
    error record naming the problem and the run goes on (KeyboardInterrupt stops it; rerun to
    resume). An `InvalidRecord` (see `check_dataset`) is saved as an error record without
    calling ``fn``. One process writes ``out`` at a time (`OutputLock`); ``settings`` (the run's
    settings and model) are kept beside ``out`` and a resume under others is refused
    (`SettingsMismatchError`) unless ``overwrite=True``, which starts ``out`` again.
    With several ranks (see `shard_info`) each writes its shard; rank 0 merges them once every
    clip of the data set has a record. It waits while the other ranks make progress, and fails
    with a clear message after ``wait_timeout`` s without a new record (default 3600, or
    ``NNSIGHT_AV_WAIT_TIMEOUT``), or after 120 s when no other rank is running at all.
    Returns the records of this process's clips, or every record once merged (rank 0 /
    single process), in data set order.
    """
    from tqdm.auto import tqdm

    rank, world = shard_info(rank, world_size)
    timeout = _wait_timeout(wait_timeout)
    out = Path(out)
    target_path = shard_path(out, rank, world) if world > 1 else out
    if overwrite and world > 1:
        raise InputError("overwrite=True (--overwrite) needs a single process; remove the old output and its shard "
                         "files first, or give another output file")
    order = [r.id for r in records]
    with contextlib.ExitStack() as stack:
        if world == 1 or rank == 0:
            stack.enter_context(OutputLock(out))
        if world > 1:
            stack.enter_context(OutputLock(target_path))
        if overwrite:
            remove_output(out, _shard_files(out))
        saved = _saved(out)
        if settings is not None:
            check_settings(out, settings, has_records=bool(saved))
        if retry_errors:
            saved = {k: v for k, v in saved.items() if v.get("status") != "error"}
        target = ResultStore(target_path)
        mine = [r for i, r in enumerate(records) if i % world == rank]
        todo = [r for r in mine if r.id not in saved]
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo),
                   desc=desc if world == 1 else f"{desc} [rank {rank}]", disable=not progress)
        for record in todo:
            if isinstance(record, InvalidRecord):
                result = _invalid_record(record)
            else:
                try:
                    result = dict(fn(record))
                    result["id"] = record.id
                    result.setdefault("status", "ok")
                except Exception as error:                      # noqa: BLE001 - a clip's failure is its record
                    result = error_record(record.id, error)
            target.append(result)
            saved[record.id] = result
            bar.update(1)
        bar.close()
        if world == 1:
            if merge and _shard_files(out):
                return merge_shards(out, order)
            return [saved[i] for i in order if i in saved]
        if rank != 0 or not merge:
            return [saved[r.id] for r in mine if r.id in saved]
        _wait_for_ranks(out, order, world, retry_errors, timeout, min(PEER_GRACE, timeout))
        return merge_shards(out, order)


# ---------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------
@dataclass
class PipelineConfig:
    """Settings of `analyze_clip` / `trace_dataset` (every default of METHOD.md sections 2-5)."""

    token_sets: Sequence[str] = ("all", "sink", "random", "cross_modal_sink", "unimodal_sink",
                                 "random_cross_modal_sink")
    site: str = "input_layernorm"
    layers: Sequence[int] | None = None
    window: int | None = None
    method: str = "exact"
    ablation: str = "raw"
    correctness: bool = False
    k_divide: float = 2
    sink_dims: Sequence[int] | None = None
    tau: float | None = None
    criterion: str | None = None
    split_rule: str = "rank"
    seed: int = 0
    batch_size: int = 4
    skip_overwritten: bool = True
    options: Any = None                       # None: each record's own options
    object_set: bool = True                   # add the "object" set for clips with object annotations

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def validate(self) -> "PipelineConfig":
        """Check every setting that needs no model (names, ranges); `InputError` on the first bad one.

        Run before the model loads, so a typo fails the run at once instead of every clip.

        >>> PipelineConfig(site="resid_mid").validate()
        Traceback (most recent call last):
        ...
        nnsight_av.errors.InputError: unknown site 'resid_mid'; choose one of ('input_layernorm', 'resid_pre', \
'resid_post', 'attn_output', 'mlp_output') (aliases: ['attn', 'before_attn', 'layer_input', 'layer_output', 'mlp', \
'residual', 'self_attn'])
        """
        import difflib

        from .store import require_finite
        from .tracing import METHODS, TOKEN_SETS, canonical_site, registered_token_sets

        canonical_site(self.site)
        names = [self.token_sets] if isinstance(self.token_sets, str) else list(self.token_sets)
        if not names:
            raise InputError("token_sets is empty: name at least one token set")
        for name in names:
            known = list(TOKEN_SETS) + list(registered_token_sets())
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
        return self

    def validate_for(self, model: "AVModel") -> "PipelineConfig":
        """`validate`, then the settings that need the model: sink dims, layers, window against its sizes."""
        from .sinks import resolve_sink_dims
        from .tracing import make_windows

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


def model_identity(model: "AVModel") -> dict[str, Any]:
    """What names a model in a result file's settings: checkpoint, adapter and sizes."""
    return {"checkpoint": str(model.checkpoint), "adapter": model.adapter.name, "layers": int(model.num_layers),
            "hidden_size": int(model.hidden_size)}


def analyze_clip(model: "AVModel", record: ClipRecord, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Sinks + MDS, dominance (av / a / v) and, for a dominant clip, causal tracing; one JSON-ready dict.

    Forwards: one prefill for sinks and MDS that also serves as the clean run (letter
    probabilities + the site at every media position + keys / values), the two corrupted runs
    (letter probabilities + cached residuals / keys / values), then only the patched
    conditions. The processor prepares the two ablated inputs in a background thread while
    the first prefill runs.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .ablation import ablate
    from .datasets import max_positions
    from .dominance import dominance_label
    from .options import on_device
    from .tracing import PatchRunner, make_windows, resolve_token_sets, trace_clip

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
        clean_rec, (sinks, split) = runner.record_clean_during(lambda: _sinks(model, clean, config), clean, media,
                                                               layers)
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


def _sinks(model: "AVModel", clean: Any, config: PipelineConfig) -> tuple[Any, Any]:
    from . import mds as mds_module

    kwargs = {"dims": config.sink_dims, "tau": config.tau, "k_divide": config.k_divide, "criterion": config.criterion}
    joint = getattr(mds_module, "sink_analysis", None)
    if joint is not None:
        sinks, scores = joint(model, clean, progress=False, **kwargs)
    else:  # pragma: no cover - the two-pass route of the issue-4 contract
        from .sinks import find_sinks

        sinks = find_sinks(model, clean, progress=False, **kwargs)
        scores = mds_module.modality_dominance(model, clean, sinks, progress=False)
    return sinks, scores.split(rule=config.split_rule)


@dataclass
class PipelineResult:
    """The records of a `trace_dataset` run, with the traced clips as a `TraceResult`."""

    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def trace(self) -> "TraceResult | None":
        from .tracing import TraceResult

        traced = [r["trace"] for r in self.records if r.get("status") == "ok" and r.get("trace")]
        return TraceResult.from_records(traced) if traced else None

    @property
    def dominance(self) -> "DominanceResult":
        from .dominance import DominanceResult

        return DominanceResult(list(self.records))

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "error"]

    def summary(self) -> dict[str, Any]:
        trace = self.trace
        table = trace.table() if trace is not None else None
        return {"clips": len(self.records), "errors": len(self.errors),
                "dominance": self.dominance.counts(),
                "table_x100": {k: {c: float(v) for c, v in row.items()} for k, row in table.iterrows()}
                if table is not None else {}}


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
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise InputError(f"unknown pipeline setting {key!r}; known: {sorted(config.__dict__)}")
        setattr(config, key, value)
    config.validate_for(model)
    records = check_dataset(dataset, model).records
    done = run_clips(records, lambda rec: analyze_clip(model, rec, config), out, rank=rank, world_size=world_size,
                     retry_errors=retry_errors, progress=progress, desc="trace", settings=config.settings(model),
                     overwrite=overwrite, wait_timeout=wait_timeout)
    return PipelineResult(done, config.to_dict())
