"""Result files of long runs: one JSONL reader, append-only writes, a writer lock, a settings record.

Every result file of a data-set run (``trace``, ``dominance``, ``caption-eval``) goes through
this module, so they share one set of rules:

- Records are only ever appended (one line each, flushed and synced); a file is only
  rewritten whole through a temporary file and `os.replace`, so a kill at any moment leaves
  either the old or the new file, never a truncated one. The one in-place change is cutting
  off a torn last line (a write cut short by a crash), and only when it does not parse.
- `read_jsonl` skips every line that does not parse as a JSON object, counts them, warns once
  per file, and de-duplicates by a key (the last record of a key wins, at the place of its
  first one).
- `OutputLock` lets one process write a file at a time (an ``flock`` on ``<file>.lock``,
  released by the kernel when its process dies, so a lock left by a killed run is simply
  taken over).
- `check_settings` keeps the settings and model a file was made with in
  ``<file>.settings.json`` and refuses to resume it under other settings.
"""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping, Sequence

from nnsight_av.errors import InputError, NNsightAVError

if TYPE_CHECKING:
    from nnsight_av import AVModel

__all__ = ["read_jsonl", "JsonlRead", "append_jsonl", "write_jsonl", "repair_tail", "OutputLock", "OutputLockedError",
           "SettingsMismatchError", "settings_path", "check_settings", "settings_diff", "remove_output",
           "require_finite", "replace_text", "model_identity"]


class OutputLockedError(NNsightAVError, RuntimeError):
    """Another live process is writing this result file."""


class SettingsMismatchError(NNsightAVError, ValueError):
    """A result file was made under other settings than the run that would resume it."""


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
@dataclass
class JsonlRead:
    """What `read_jsonl` found: the records, and the numbers of the lines it skipped."""

    records: list[dict[str, Any]]
    bad_lines: list[int]
    duplicates: int = 0


def _key_of(key: str | Sequence[str] | Callable[[Mapping[str, Any]], Hashable] | None,
            record: Mapping[str, Any]) -> Hashable:
    if key is None:
        return None
    if callable(key):
        return key(record)
    if isinstance(key, str):
        return str(record[key])
    return tuple(str(record[k]) for k in key)


def read_jsonl(
    path: str | os.PathLike,
    key: str | Sequence[str] | Callable[[Mapping[str, Any]], Hashable] | None = None,
    *,
    warn: bool = True,
    details: bool = False,
) -> "list[dict[str, Any]] | JsonlRead":
    """The JSON-object lines of ``path`` (none if it does not exist), bad lines skipped and counted.

    A line that does not parse, is not a JSON object, or lacks a field of ``key`` is skipped;
    with ``warn`` one warning names how many and where. ``key`` (a field, fields, or a
    function of the record) de-duplicates: the last record of a key wins, kept at the place of
    the first. ``details=True`` returns a `JsonlRead` with the skipped line numbers.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
    >>> _ = p.write_text('{"id": "a", "v": 1}\\nnot json\\n{"id": "b", "v": 2}\\n{"id": "a", "v": 3}\\n')
    >>> [r["v"] for r in read_jsonl(p, key="id", warn=False)]
    [3, 2]
    >>> read_jsonl(p, key="id", warn=False, details=True).bad_lines
    [2]
    """
    path = Path(path)
    found: dict[Hashable, dict[str, Any]] = {}
    plain: list[dict[str, Any]] = []
    bad: list[int] = []
    duplicates = 0
    if path.exists():
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    if not isinstance(record, dict):
                        raise ValueError("not an object")
                    k = _key_of(key, record)
                except (ValueError, KeyError, TypeError):          # JSONDecodeError and UnicodeDecodeError too
                    bad.append(number)
                    continue
                if key is None:
                    plain.append(record)
                else:
                    duplicates += k in found
                    found[k] = record
    if bad and warn:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) (line {shown}); their clips are recomputed",
                      stacklevel=2)
    records = plain if key is None else list(found.values())
    return JsonlRead(records, bad, duplicates) if details else records


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------
def repair_tail(path: str | os.PathLike) -> int:
    """Make ``path`` end on a line break before appending; returns the bytes cut off (0: none).

    A last line without its line break that does not parse is a write cut short by a crash:
    it is cut off (only those bytes; the file is not rewritten). One that parses is a whole
    record written without the break: a break is appended, nothing is removed.
    """
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "r+b") as handle:
        # Read backwards to the last line break (the torn line is at most one record long).
        block, position, tail = 1 << 16, size, b""
        while position > 0:
            step = min(block, position)
            position -= step
            handle.seek(position)
            tail = handle.read(step) + tail
            if b"\n" in tail:
                break
        if tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n") + 1
        start = position + cut
        fragment = tail[cut:]
        try:
            complete = isinstance(json.loads(fragment), dict)
        except ValueError:
            complete = False
        if complete:
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            return 0
        handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())
    warnings.warn(f"{path}: cut off a torn last line ({size - start} bytes, a write cut short by a crash); "
                  "its clip is recomputed", stacklevel=2)
    return size - start


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record as a line, flushed and synced (a crash loses at most this line)."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "ab") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Replace ``path`` with these records, atomically (a temporary file, synced, then `os.replace`)."""
    path = Path(path)
    return replace_text(path, "".join(json.dumps(r) + "\n" for r in records))


def replace_text(path: str | os.PathLike, text: str) -> Path:
    """Replace the file at ``path`` with ``text`` atomically (a synced temporary file, then `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)
    return path


# ---------------------------------------------------------------------------------------
# one writer at a time
# ---------------------------------------------------------------------------------------
class OutputLock:
    """An exclusive lock on writing ``path``, held through ``<path>.lock`` (a context manager).

    The lock is an ``flock`` the kernel releases when the holder dies, so a ``.lock`` file
    left by a killed run does not block the next one. A second live writer gets
    `OutputLockedError` naming the holder's pid and host.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
    >>> with OutputLock(out):
    ...     (out.parent / "r.jsonl.lock").exists()
    True
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, one writer is the user's job
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLockedError(
                f"{self.path} is being written by another process ({holder}); wait for it to finish or give "
                f"another output file") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------------------------------
# the settings a file was made with
# ---------------------------------------------------------------------------------------
def settings_path(out: str | os.PathLike) -> Path:
    """``results.jsonl`` -> ``results.jsonl.settings.json``."""
    out = Path(out)
    return out.with_name(out.name + ".settings.json")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(value, tuple):
        value = list(value)
    return {prefix.rstrip("."): value}


def settings_diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """One line per setting that differs between two (nested) settings dicts.

    >>> settings_diff({"site": "resid_pre", "window": 2}, {"site": "resid_pre", "window": 3})
    ['window: 2 (saved) != 3 (now)']
    """
    a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(now)))
    unset = object()
    lines = []
    for key in list(a) + [k for k in b if k not in a]:
        old, new = a.get(key, unset), b.get(key, unset)
        if old != new:
            shown = ["<unset>" if v is unset else repr(v) for v in (old, new)]
            lines.append(f"{key}: {shown[0]} (saved) != {shown[1]} (now)")
    return lines


def remove_output(out: str | os.PathLike, extra: Sequence[Path] = ()) -> None:
    """Delete a result file, its settings record and ``extra`` files (the user asked for a new output)."""
    out = Path(out)
    for path in [out, settings_path(out), *extra]:
        path.unlink(missing_ok=True)


def check_settings(
    out: str | os.PathLike,
    settings: Mapping[str, Any],
    *,
    has_records: bool,
    merge: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None,
) -> None:
    """Record ``settings`` for ``out``, or refuse (`SettingsMismatchError`) if its records were made otherwise.

    ``has_records``: whether ``out`` already holds records (a file with records and no settings
    record, from an older version, is adopted with a warning). ``merge(saved, now)`` may return
    the parts to compare and the settings to store (caption runs add methods over time).
    """
    path = settings_path(out)
    saved = None
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            warnings.warn(f"{path} does not parse; it is written again", stacklevel=2)
    if saved is None:
        if has_records:
            warnings.warn(f"{out} has no settings record (an older version wrote it): its records are taken as made "
                          "with the current settings", stacklevel=2)
        replace_text(path, json.dumps(dict(settings), indent=1, sort_keys=True))
        return
    compare_saved, compare_now, store = saved, dict(settings), dict(settings)
    if merge is not None:
        (compare_saved, compare_now), store = merge(saved, settings)
    differences = settings_diff(compare_saved, compare_now) if has_records else []
    if differences:
        raise SettingsMismatchError(
            f"{out} was made with other settings, so its records cannot be resumed:\n  " + "\n  ".join(differences)
            + "\nrerun with the saved settings, give another output file, or pass --overwrite "
              "(overwrite=True) to start it again")
    if store != saved:
        replace_text(path, json.dumps(store, indent=1, sort_keys=True))


def model_identity(model: "AVModel") -> dict[str, Any]:
    """What names a model in a result file's settings: checkpoint, adapter and sizes."""
    return {"checkpoint": str(model.checkpoint), "adapter": model.adapter.name, "layers": int(model.num_layers),
            "hidden_size": int(model.hidden_size)}


def require_finite(name: str, value: Any, low: float | None = None, high: float | None = None,
                   integer: bool = False) -> float:
    """``value`` as a number, checked finite (and in ``[low, high]``); `InputError` naming ``name`` otherwise.

    >>> require_finite("fps", "2", low=0.1)
    2.0
    """
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be finite, got {value!r}")
    if integer and number != int(number):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        span = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise InputError(f"{name} must be in {span}, got {value!r}")
    return number
