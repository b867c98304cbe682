"""Long runs over clip data sets: resumable JSONL results, sharding over processes, the whole pipeline.

- Every finished clip is appended to the output JSONL at once (flushed and synced), so a
  crash loses at most the clip in flight; rerunning the same command skips every clip
  whose record is saved (a clip whose media cannot be read gets an error record too, and
  is not retried unless ``retry_errors=True``).
- Sharding: with ``RANK`` / ``WORLD_SIZE`` set (torchrun and accelerate set them; no
  process group is needed), rank ``r`` of ``w`` takes the clips ``i % w == r`` and writes
  ``<out>.shard<r>of<w>.jsonl``; when all ranks are done, rank 0 merges the shards into
  ``<out>`` in data set order.
- `trace_dataset` runs sinks + MDS, the av / a / v dominance test and causal tracing for
  each clip (`analyze_clip`), sharing the clean and corrupted forwards between them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from nnsight_av.errors import InputError, NNsightAVError

from .datasets import ClipRecord, read_dataset

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
    """An append-only JSONL file of per-clip records keyed by ``id``.

    The process that writes the file opens it with ``repair=True``: a torn last line (the
    process died while writing it) is cut off, so the next append starts on a fresh line and
    the clip is simply computed again. Readers of other processes' files leave them alone
    and skip a line that does not parse.
    """

    def __init__(self, path: str | os.PathLike, repair: bool = True) -> None:
        self.path = Path(path)
        if repair:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair()

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:
                handle.truncate(cut)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line broken some other way: that clip is recomputed
        return out

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        with open(self.path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


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


def _saved(out: Path) -> dict[str, dict[str, Any]]:
    """Every saved record for ``out``: the merged file and any shard files (of any world size).

    A clip saved twice (an error record, then a retry) keeps its last record.
    """
    found: dict[str, dict[str, Any]] = {}
    for path in [out] + _shard_files(out):
        for record in ResultStore(path, repair=False).records() if path.exists() else []:
            if "id" in record:
                found[str(record["id"])] = record
    return found


def merge_shards(out: str | os.PathLike, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Merge ``out`` and its shard files into ``out`` (records in ``order`` of ids, then the rest), remove the shards."""
    out = Path(out)
    found = _saved(out)
    ids = list(order or [])
    ids += [i for i in found if i not in set(ids)]
    merged = [found[i] for i in ids if i in found]
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in merged))
    os.replace(tmp, out)
    for path in _shard_files(out):
        path.unlink(missing_ok=True)
    return merged


def error_record(clip_id: str, error: BaseException) -> dict[str, Any]:
    return {"id": clip_id, "status": "error", "error_type": type(error).__name__, "error": str(error)}


def run_clips(
    records: Sequence[ClipRecord],
    fn: Callable[[ClipRecord], Mapping[str, Any]],
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    desc: str = "clips",
    merge: bool = True,
    wait_timeout: float = 7 * 24 * 3600.0,
) -> list[dict[str, Any]]:
    """Run ``fn`` on each clip not saved yet, appending each result to the JSONL ``out``.

    ``fn(record)`` returns a JSON-ready dict (its ``id`` is set to the clip's). A
    `nnsight_av.errors.NNsightAVError` (unreadable media, a clip without audio ...) becomes an
    error record naming the problem and the run goes on; any other exception stops it
    (rerun to resume). With several ranks (see `shard_info`) each writes its shard; rank 0
    merges them once every clip of the data set has a record (it polls the shard files, up
    to ``wait_timeout`` s).
    Returns the records of this process's clips, or every record once merged (rank 0 /
    single process), in data set order.
    """
    from tqdm.auto import tqdm

    rank, world = shard_info(rank, world_size)
    out = Path(out)
    order = [r.id for r in records]
    saved = _saved(out)
    if retry_errors:
        saved = {k: v for k, v in saved.items() if v.get("status") != "error"}
    target = ResultStore(shard_path(out, rank, world) if world > 1 else out)
    mine = [r for i, r in enumerate(records) if i % world == rank]
    todo = [r for r in mine if r.id not in saved]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc if world == 1 else f"{desc} [rank {rank}]",
               disable=not progress)
    for record in todo:
        try:
            result = dict(fn(record))
            result["id"] = record.id
            result.setdefault("status", "ok")
        except NNsightAVError as error:
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
    deadline, pause = time.time() + wait_timeout, 0.2
    while True:
        found = _saved(out)
        if retry_errors:
            found = {k: v for k, v in found.items() if v.get("status") != "error"}
        if set(order) <= set(found):
            break
        if time.time() > deadline:
            missing = [i for i in order if i not in found]
            raise TimeoutError(f"rank 0 waited {wait_timeout:.0f} s for the other ranks; {len(missing)} clips "
                               f"have no record yet (first: {missing[:3]})")
        time.sleep(pause)
        pause = min(2.0, pause * 1.5)
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
    from .dominance import dominance_label
    from .options import on_device
    from .tracing import PatchRunner, make_windows, resolve_token_sets, trace_clip

    config = config or PipelineConfig()
    options = list(config.options) if config.options is not None else list(record.options)
    clean = on_device(model, record.prepare(model))     # moved once: every analysis below reads it
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
    kwargs = {"dims": config.sink_dims, "tau": config.tau, "k_divide": config.k_divide, "criterion": config.criterion}
    sinks, scores = sink_analysis(model, clean, progress=False, **kwargs)
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
    dataset: "str | os.PathLike | Iterable[Any]",
    out: str | os.PathLike,
    config: PipelineConfig | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> PipelineResult:
    """`analyze_clip` over a data set (`read_dataset`), resumable and shardable (`run_clips`).

    ``overrides`` set `PipelineConfig` fields (``token_sets=...``, ``window=1`` ...).
    """
    config = config or PipelineConfig()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise InputError(f"unknown pipeline setting {key!r}; known: {sorted(config.__dict__)}")
        setattr(config, key, value)
    records = read_dataset(dataset)
    done = run_clips(records, lambda rec: analyze_clip(model, rec, config), out, rank=rank, world_size=world_size,
                     retry_errors=retry_errors, progress=progress, desc="trace")
    return PipelineResult(done, config.to_dict())
