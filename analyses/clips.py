"""Long runs over clip data sets: resumable JSONL results and sharding over processes.

- Every finished clip is appended to the output JSONL at once (flushed and synced), so a
  crash loses at most the clip in flight; rerunning the same command skips every clip
  whose record is saved (a clip whose media cannot be read gets an error record too, and
  is not retried unless ``retry_errors=True``).
- Sharding: with ``RANK`` / ``WORLD_SIZE`` set (torchrun and accelerate set them; no
  process group is needed), rank ``r`` of ``w`` takes the clips ``i % w == r`` and writes
  ``<out>.shard<r>of<w>.jsonl``; when all ranks are done, rank 0 merges the shards into
  ``<out>`` in data set order.

Every per-clip analysis (dominance, the pipeline of `analyses.runner`, evaluation) runs
through `run_clips`; this module imports none of them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from nnsight_av.errors import InputError, NNsightAVError

from .datasets import ClipRecord

__all__ = ["ResultStore", "shard_info", "shard_path", "run_clips", "merge_shards", "error_record"]


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
