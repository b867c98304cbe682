"""Long runs over clip data sets: resumable JSONL results and sharding over processes.

- Every finished clip is appended to the output JSONL at once (flushed and synced), so a
  crash loses at most the clip in flight; rerunning the same command skips every clip
  whose record is saved (a clip that fails, or a record that failed `check_dataset`, gets
  an error record too, and is not retried unless ``retry_errors=True``). The file rules
  (append-only, one writer, settings recorded beside it) are `analyses.store`'s.
- Sharding: with ``RANK`` / ``WORLD_SIZE`` set (torchrun and accelerate set them; no
  process group is needed), rank ``r`` of ``w`` takes the clips ``i % w == r`` and writes
  ``<out>.shard<r>of<w>.jsonl``; when all ranks are done, rank 0 merges the shards into
  ``<out>`` in data set order.

Every per-clip analysis (dominance, the pipeline of `analyses.runner`, evaluation) runs
through `run_clips`; this module imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from nnsight_av.errors import InputError

from .datasets import ClipRecord, InvalidRecord
from .store import (OutputLock, OutputLockedError, append_jsonl, check_settings, read_jsonl, remove_output,
                    repair_tail, write_jsonl)

__all__ = ["ResultStore", "shard_info", "shard_path", "run_clips", "merge_shards", "error_record", "clips_per_hour",
           "DEFAULT_WAIT_TIMEOUT", "PEER_GRACE"]


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


def clips_per_hour(clips: int, seconds: float) -> float:
    """Throughput of a run: ``clips`` done in ``seconds`` (0 before the first second-fraction passes).

    >>> clips_per_hour(10, 36.0)
    1000.0
    """
    return 3600.0 * clips / seconds if seconds > 0 else 0.0


def _as_record(record: ClipRecord, value: Any) -> dict[str, Any]:
    if isinstance(value, BaseException):
        return error_record(record.id, value)
    result = dict(value)
    result["id"] = record.id
    result.setdefault("status", "ok")
    return result


def _results(todo: Sequence[Any], fn: Callable[[ClipRecord], Mapping[str, Any]] | None,
             batched: Callable[[list[ClipRecord]], Any] | None) -> Any:
    """``(record, saved record)`` for each clip of ``todo``: invalid ones as error records, the rest by
    ``fn`` one at a time (in order) or by ``batched`` all together (in the order it finishes them)."""
    valid = []
    for record in todo:
        if isinstance(record, InvalidRecord):
            yield record, _invalid_record(record)
        elif batched is not None:
            valid.append(record)
        else:
            try:
                saved = _as_record(record, fn(record))          # type: ignore[misc]
            except Exception as error:                          # noqa: BLE001 - a clip's failure is its record
                saved = error_record(record.id, error)
            yield record, saved
    if valid:
        for record, value in batched(valid):                    # type: ignore[misc]
            yield record, _as_record(record, value)


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
    batched: "Callable[[list[ClipRecord]], Iterable[tuple[ClipRecord, Any]]] | None" = None,
    stats: dict[str, Any] | None = None,
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

    ``batched(records)``, when given, runs instead of ``fn``: it gets every valid clip still to do
    and yields ``(record, result or exception)`` as clips finish, in any order (e.g.
    `analyses.runner.analyze_clips`); each is saved at once. The progress bar shows clips/hour;
    ``stats`` (a dict) receives ``clips`` (computed in this call), ``seconds`` and ``clips_per_hour``.
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
        started, computed = time.perf_counter(), 0
        for record, result in _results(todo, fn, batched):
            target.append(result)
            saved[record.id] = result
            computed += 1
            bar.update(1)
            bar.set_postfix_str(f"{clips_per_hour(computed, time.perf_counter() - started):.0f} clips/h", refresh=False)
        bar.close()
        if stats is not None:
            seconds = time.perf_counter() - started
            stats.update(clips=computed, seconds=round(seconds, 3),
                         clips_per_hour=round(clips_per_hour(computed, seconds), 1))
        if world == 1:
            if merge and _shard_files(out):
                return merge_shards(out, order)
            return [saved[i] for i in order if i in saved]
        if rank != 0 or not merge:
            return [saved[r.id] for r in mine if r.id in saved]
        _wait_for_ranks(out, order, world, retry_errors, timeout, min(PEER_GRACE, timeout))
        return merge_shards(out, order)
