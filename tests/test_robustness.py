"""Nothing lost, nothing silently wrong (issue 16): run files, hostile records, the CLI, kills at random points.

The figures the issue asks for are printed at the end of the module (``pytest -s``):
"N bad inputs tried, N kills survived, 0 records lost".
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import nnsight_av as nav
from analyses import EvalResult, TraceResult, trace_dataset
from analyses.datasets import check_dataset, read_dataset
from analyses.dominance import DominanceResult
from analyses.evaluate import check_caption_dataset, evaluate
from analyses.runner import run_clips
from analyses.store import (OutputLock, OutputLockedError, SettingsMismatchError, read_jsonl, repair_tail,
                            settings_path)
from nnsight_av.errors import InputError, UnknownModelError

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"bad_inputs": 0, "kills": 0, "records_lost": 0}
SETTINGS = dict(sink_dims=[0, 1], tau=2.0, token_sets=("all", "sink"))


@pytest.fixture(autouse=True, scope="module")
def report_figures(one_thread):
    yield
    print(f"\nrobustness: {FIGURES['bad_inputs']} bad inputs tried, {FIGURES['kills']} kills survived, "
          f"{FIGURES['records_lost']} records lost")


@pytest.fixture(scope="module")
def tiny():
    return nav.testing.tiny_model(seed=0)


def clip_files(folder: Path, count: int, seconds: float = 2.0) -> list[dict]:
    rows = []
    for i in range(count):
        np.save(folder / f"v{i}.npy", nav.testing.synthetic_frames(seconds, 2, 56, seed=i))
        np.save(folder / f"a{i}.npy", nav.testing.synthetic_tone(seconds, freq=200.0 + 60 * i))
        rows.append({"id": f"clip{i}", "video": f"v{i}.npy", "audio": f"a{i}.npy", "fps": 2})
    return rows


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------
# reading and writing run files
# ---------------------------------------------------------------------------------------
def test_readers_skip_and_count_bad_lines_and_deduplicate(tmp_path):
    """EvalResult.load / TraceResult.load / DominanceResult.load share one reader: a bad line in the middle
    costs only itself (it used to cost every record after it, or raise), and a clip saved twice counts once."""
    caps = tmp_path / "caps.jsonl"
    good = [{"id": str(i), "method": "greedy", "caption": "A dog.", "objects": ["dog"], "ms": 1.0,
             "num_new_tokens": 2} for i in range(11)]
    jsonl(caps, good[:2] + ['{"id": "x", "meth'] + good[2:] + ["[1, 2]", json.dumps(good[0])])
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable line\(s\) \(line 3, 13\)"):
        loaded = EvalResult.load(caps)
    assert [r["id"] for r in loaded.records] == [str(i) for i in range(11)]
    traces = tmp_path / "trace.jsonl"
    record = {"id": "a", "status": "ok", "dominance": "audio",
              "trace": {"kind": "TraceClip", "clip": "a", "info": {}, "meta": {},
                        "rows": [{"token_set": "all", "window": "0-1", "ie_clean": 0.5}]}}
    jsonl(traces, [record, "not json", record, {"id": "b", "status": "error", "error": "x"}])
    with pytest.warns(UserWarning, match="skipped 1"):
        trace = TraceResult.load(traces)
    assert len(trace.effects) == 1                                   # clip "a" once, not twice
    with pytest.warns(UserWarning, match="skipped 1"):
        assert DominanceResult.load(traces).counts()["audio"] == 1
    FIGURES["bad_inputs"] += 4


def test_a_torn_tail_is_cut_a_whole_record_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')                      # whole record, no line break: kept
    assert repair_tail(path) == 0 and path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\n{"id": "b", "v')                   # torn by a kill: only it goes
    with pytest.warns(UserWarning, match="torn last line"):
        assert repair_tail(path) == len(b'{"id": "b", "v')
    assert path.read_text() == '{"id": "a"}\n'
    FIGURES["bad_inputs"] += 2


def test_caption_resume_keeps_every_valid_record(tiny, tmp_path):
    """A bad line in the middle of a caption file: the resume appends, never rewrites (it used to drop every
    record after the bad line), and EvalResult.load returns them all."""
    rows = clip_files(tmp_path, 3)
    data = jsonl(tmp_path / "caps.jsonl", [{**r, "objects": ["dog"]} for r in rows])
    out = tmp_path / "out.jsonl"
    first = evaluate(tiny, data, ["greedy"], out, max_new_tokens=2, progress=False)
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    before = out.read_bytes()
    with pytest.warns(UserWarning, match="skipped 1"):
        again = evaluate(tiny, data, ["greedy"], out, max_new_tokens=2, progress=False)
    assert out.read_bytes() == before                                # nothing rewritten, nothing recomputed
    assert again.records == first.records
    FIGURES["bad_inputs"] += 1


def test_a_second_writer_is_refused_a_dead_ones_lock_is_taken_over(tmp_path):
    out = tmp_path / "r.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom analyses.store import OutputLock\n"
                               f"lock = OutputLock({str(out)!r}).acquire()\nprint('held', flush=True)\n"
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            OutputLock(out).acquire()
        records = read_dataset([{"id": "a", "video": "v.mp4", "prompt": "Q", "options": "AB"}])
        with pytest.raises(OutputLockedError, match="another output file"):
            run_clips(records, lambda r: {}, out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert "pid" in (tmp_path / "r.jsonl.lock").read_text()          # the dead holder's lock file is still there
    with OutputLock(out):                                            # ... and taken over
        pass
    FIGURES["bad_inputs"] += 1


# ---------------------------------------------------------------------------------------
# settings recorded with each output
# ---------------------------------------------------------------------------------------
def test_a_resume_under_other_settings_is_refused(tiny, tmp_path):
    rows = clip_files(tmp_path, 1)
    data = jsonl(tmp_path / "clips.jsonl", [{**r, "prompt": "Which?", "options": "ABCD"} for r in rows])
    out = tmp_path / "trace.jsonl"
    trace_dataset(tiny, data, out, progress=False, window=2, **SETTINGS)
    saved = json.loads(settings_path(out).read_text())
    assert saved["window"] == 2 and saved["model"]["checkpoint"] == tiny.checkpoint
    trace_dataset(tiny, data, out, progress=False, window=2, batch_size=1, **SETTINGS)  # speed settings may change
    with pytest.raises(SettingsMismatchError, match=r"window: 2 \(saved\) != 3 \(now\)") as info:
        trace_dataset(tiny, data, out, progress=False, window=3, site="resid_pre", **SETTINGS)
    assert "site: 'input_layernorm' (saved) != 'resid_pre' (now)" in str(info.value)
    other = nav.testing.tiny_model(seed=1)
    with pytest.raises(SettingsMismatchError, match="model.checkpoint"):
        trace_dataset(other, data, out, progress=False, window=2, **SETTINGS)
    fresh = trace_dataset(tiny, data, out, progress=False, window=3, overwrite=True, **SETTINGS)
    assert len(fresh.records) == 1 and json.loads(settings_path(out).read_text())["window"] == 3
    # captions: a new method may join a resumed file; another token budget or other ASD arguments may not
    caps = jsonl(tmp_path / "caps.jsonl", [{**r, "objects": ["dog"]} for r in rows])
    cap_out = tmp_path / "caps.out.jsonl"
    evaluate(tiny, caps, ["greedy"], cap_out, max_new_tokens=2, progress=False)
    evaluate(tiny, caps, ["greedy", "vcd"], cap_out, max_new_tokens=2, progress=False)
    with pytest.raises(SettingsMismatchError, match="max_new_tokens: 2 \\(saved\\) != 3"):
        evaluate(tiny, caps, ["greedy"], cap_out, max_new_tokens=3, progress=False)
    with pytest.raises(SettingsMismatchError, match="methods.vcd"):
        evaluate(tiny, caps, ["vcd"], cap_out, max_new_tokens=2, progress=False, method_kwargs={"vcd": {"alpha": 2.0}})
    FIGURES["bad_inputs"] += 5


# ---------------------------------------------------------------------------------------
# hostile records: each one an error record, the run goes on
# ---------------------------------------------------------------------------------------
def _hostile_files(folder: Path) -> None:
    os.mkfifo(folder / "pipe.mp4")                                    # a reader would block for ever
    (folder / "folder.mp4").mkdir()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "junk.npy").write_bytes(b"not an array at all")
    np.save(folder / "full.npy", np.zeros((4, 56, 56, 3), np.uint8))
    (folder / "cut.npy").write_bytes((folder / "full.npy").read_bytes()[:500])
    np.save(folder / "flat.npy", np.zeros((4, 56), np.uint8))
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(folder / "nan.npy", np.full(32000, np.nan, np.float32))


def test_hostile_trace_records_become_error_records(tiny, tmp_path):
    good = clip_files(tmp_path, 1)[0] | {"prompt": "Which?", "options": "ABCD"}
    _hostile_files(tmp_path)
    base = {"video": "v0.npy", "audio": "a0.npy", "prompt": "Which?", "options": "ABCD"}
    bad = ["{oops", "[1, 2]", {**base, "id": True}, {**base, "id": "no-options", "options": None},
           {**base, "id": "empty-options", "options": []}, {**base, "id": "int-options", "options": 5},
           {**base, "id": "repeat", "options": "AA"}, {**base, "id": "int-prompt", "prompt": 123},
           {**base, "id": "blank-prompt", "prompt": "  "}, {**base, "id": "label", "label": "Z"},
           {**base, "id": "label-index", "label": 7}, {"id": "no-media", "prompt": "Q", "options": "AB"},
           {**base, "id": "video-int", "video": 42}, {**base, "id": "fps-abc", "fps": "abc"},
           {**base, "id": "fps-0", "fps": 0}, {**base, "id": "fps-1000", "fps": 1000},
           {**base, "id": "fps-nan", "fps": float("nan")}, {**base, "id": "rate-0", "audio_rate": 0},
           {**base, "id": "rate-frac", "audio_rate": 16000.5}, {**base, "id": "dominant", "dominant": "text"},
           {**base, "id": "times-str", "objects": {"audio_times": [["a", 1]]}},
           {**base, "id": "times-order", "objects": {"audio_times": [[3, 1]]}},
           {**base, "id": "objects-key", "objects": {"positionz": [1]}},
           {**base, "id": "objects-mix", "objects": ["dog", 3]},
           {**base, "id": "objects-neg", "objects": {"positions": [-1]}},
           {**base, "id": "missing", "video": "gone.mp4"}, {**base, "id": "fifo", "video": "pipe.mp4"},
           {**base, "id": "dir", "video": "folder.mp4"}, {**base, "id": "empty", "video": "empty.mp4"},
           {**base, "id": "junk", "video": "junk.npy"}, {**base, "id": "cut", "video": "cut.npy"},
           {**base, "id": "flat", "video": "flat.npy"}, {**base, "id": "pickled", "audio": "objects.npy"},
           {**base, "id": "nan-audio", "audio": "nan.npy"},
           {**base, "id": "special", "prompt": "Which?<|AUDIO|>"},
           {**base, "id": "long", "prompt": "dog " * 9000},
           {**base, "id": "huge", "prompt": "x" * 100_001}]
    data = jsonl(tmp_path / "clips.jsonl", [good] + bad)
    start = time.perf_counter()
    check = check_dataset(data, tiny)                                # all of it before any forward
    assert time.perf_counter() - start < 30                          # the FIFO did not block
    assert len(check.invalid) == len(bad) - 1                        # nan-audio is only found when decoded
    assert check.invalid[0].error.startswith("clips.jsonl line 2") and check.invalid[0].id == "clips.jsonl line 2"
    result = trace_dataset(tiny, data, tmp_path / "out.jsonl", progress=False, **SETTINGS)
    by_id = {r["id"]: r for r in result.records}
    assert by_id["clip0"]["status"] == "ok" and len(result.errors) == len(bad)
    expect = {"fps-abc": "fps must be a number", "fps-1000": "fps must be in", "rate-0": "audio_rate must be in",
              "fifo": "not a regular file", "nan-audio": "NaN", "special": "special token '<|AUDIO|>'",
              "long": "the model takes 8192 positions", "times-str": "audio_times must be a number",
              "objects-key": "unknown 'objects' keys", "cut": "cannot read video array", "int-options": "'options'",
              "missing": "not found", "clips.jsonl line 3": "expected a JSON object"}
    for clip, text in expect.items():
        assert text in by_id[clip]["error"], (clip, by_id[clip]["error"])
    assert by_id["fps-abc"]["line"] == 15 and by_id["nan-audio"]["error_type"] == "MediaError"
    with pytest.raises(InputError, match=r"twice in the data set \(dup.jsonl lines 1 and 3\)"):
        read_dataset(jsonl(tmp_path / "dup.jsonl", [good, base | {"id": "x"}, good]))
    FIGURES["bad_inputs"] += len(bad) + 1


def test_hostile_caption_records_become_error_lines(tiny, tmp_path):
    good = clip_files(tmp_path, 1)[0] | {"objects": ["dog"]}
    _hostile_files(tmp_path)
    base = {"video": "v0.npy", "audio": "a0.npy", "objects": ["dog"]}
    bad = ["{oops", {**base, "id": None}, {**base, "id": "no-objects", "objects": None},
           {**base, "id": "int-objects", "objects": [1]}, {**base, "id": "fps-abc", "fps": "abc"},
           {**base, "id": "rate-0", "audio_rate": 0}, {**base, "id": "video-int", "video": 42},
           {**base, "id": "missing", "video": "gone.mp4"}, {**base, "id": "fifo", "video": "pipe.mp4"},
           {**base, "id": "cut", "video": "cut.npy"}, {**base, "id": "nan-audio", "audio": "nan.npy"},
           {**base, "id": "special", "prompt": "Describe <|VIDEO|>"}, {**base, "id": "long", "prompt": "dog " * 9000},
           {**base, "id": "prompt-list", "prompt": ["a"]}]
    data = jsonl(tmp_path / "caps.jsonl", [good] + bad)
    assert len(check_caption_dataset(data, tiny).invalid) == len(bad) - 1
    result = evaluate(tiny, data, ["greedy", "asd"], tmp_path / "out.jsonl", max_new_tokens=2, progress=False)
    assert {r["id"] for r in result.ok} == {"clip0"}
    assert len(result.errors) == 2 * len(bad)                         # one line per (clip, method)
    table = result.table().set_index("method")
    assert table.loc["greedy", "clips"] == 1 and table.loc["greedy", "failed"] == len(bad)
    FIGURES["bad_inputs"] += len(bad)


def test_a_numerical_failure_in_one_clip_does_not_stop_the_run(tiny, tmp_path):
    records = read_dataset([{"id": f"c{i}", "video": "v.mp4", "prompt": "Q", "options": "AB"} for i in range(3)])

    def work(record):
        if record.id == "c1":
            raise ZeroDivisionError("float division by zero")       # not a library error: still one record
        return {"value": 1}

    done = run_clips(records, work, tmp_path / "r.jsonl", progress=False)
    assert [r["status"] for r in done] == ["ok", "error", "ok"] and done[1]["error_type"] == "ZeroDivisionError"
    FIGURES["bad_inputs"] += 1


# ---------------------------------------------------------------------------------------
# configuration errors fail at once, before the model loads
# ---------------------------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """The CLI must fail before it loads a model: loading raises."""
    import nnsight_av.cli as cli

    def refuse(name, device):
        raise AssertionError(f"the model {name!r} was loaded")

    monkeypatch.setattr(cli, "_load", refuse)
    return cli.app


@pytest.mark.parametrize("args, message", [
    (["--site", "resid_mid"], "unknown site 'resid_mid'"),
    (["--token-sets", "all,snk"], "did you mean 'sink'?"),
    (["--sink-dims", "1,x"], "--sink-dims must be comma-separated ints"),
    (["--method", "exactly"], "unknown tracing method"),
    (["--clip-batch", "many"], "clip_batch must be a positive int or 'auto'"),
    (["--model", "toy-omin"], "did you mean 'toy-omni'?"),
    (["--model", "./no/such/folder"], "not a known name (toy-omni, smol-omni, tiny)"),
])
def test_trace_configuration_errors_fail_before_the_model_loads(no_model, tmp_path, args, message):
    data = jsonl(tmp_path / "clips.jsonl", [{"id": "a", "video": "v.mp4", "prompt": "Q", "options": "AB"}])
    args = ["--model", "tiny", *args] if "--model" not in args else args
    start = time.perf_counter()
    result = CliRunner().invoke(no_model, ["trace", str(data), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1              # one line
    assert time.perf_counter() - start < 10                          # no hub retries
    FIGURES["bad_inputs"] += 1


def test_cli_data_set_and_model_errors(no_model, tmp_path, monkeypatch):
    runner = CliRunner()
    missing = runner.invoke(no_model, ["caption-eval", str(tmp_path / "nope.jsonl"), "--model", "tiny"])
    assert missing.exit_code == 2 and "no data set file" in missing.output
    data = jsonl(tmp_path / "caps.jsonl", [{"id": "a", "video": "v.mp4", "objects": ["dog"]}])
    bad_method = runner.invoke(no_model, ["caption-eval", str(data), "--model", "tiny", "--methods", "greedy,asdd"])
    assert bad_method.exit_code == 2 and "did you mean 'asd'?" in bad_method.output
    bad_kwargs = tmp_path / "kw.json"
    bad_kwargs.write_text(json.dumps({"greedy": {"temperature": 2}}))
    kw = runner.invoke(no_model, ["caption-eval", str(data), "--model", "tiny", "--method-kwargs", str(bad_kwargs),
                                  "--methods", "greedy"])
    assert kw.exit_code == 2 and "temperature" in kw.output
    usage = runner.invoke(no_model, ["trace", str(data), "--window", "-1"])
    assert usage.exit_code == 2                                      # typer's own usage errors keep code 2
    # --debug shows the traceback: the error propagates
    debug = runner.invoke(no_model, ["trace", str(data), "--model", "tiny", "--site", "x", "--debug"])
    assert debug.exit_code != 0 and isinstance(debug.exception, InputError)
    # no --model: the shipped model, said; 'tiny': a warning that its weights are random
    loaded = []
    import nnsight_av.cli as cli

    monkeypatch.setattr(cli, "_load", lambda name, device: (loaded.append(name), (_ for _ in ()).throw(
        RuntimeError("stop here")))[1])
    default = runner.invoke(no_model, ["caption-eval", str(data), "--methods", "greedy"])
    assert loaded == ["toy-omni"] and "no --model given: using 'toy-omni'" in default.output
    assert default.exit_code == 1 and "error: RuntimeError: stop here" in default.output
    FIGURES["bad_inputs"] += 5


def test_tiny_warns_and_names_are_checked_without_the_hub(capsys):
    from nnsight_av.demo import load_model
    from nnsight_av.loading import KNOWN_MODELS, check_model_name

    load_model("tiny")
    assert "random weights" in capsys.readouterr().err
    assert {"toy-omni", "tiny", "smol-omni"} <= set(KNOWN_MODELS)
    for name in ("Qwen/Qwen2.5-Omni-7B", "toy-omni", "tiny"):
        assert check_model_name(name) == name
    for name in ("toy-omin", "qwen", "a/b/c", "/no/such/dir", ""):
        with pytest.raises(UnknownModelError):
            nav.load(name)
    FIGURES["bad_inputs"] += 5


def test_custom_code_checkpoint_is_refused_without_a_prompt(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "my_omni", "auto_map": {
        "AutoConfig": "configuration_my.MyConfig"}}))
    (folder / "configuration_my.py").write_text("raise SystemExit('remote code ran')\n")
    code = f"import nnsight_av as nav\ntry:\n    nav.load({str(folder)!r})\nexcept Exception as e:\n    print(e)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert "trust_remote_code=True" in done.stdout and "remote code ran" not in done.stdout + done.stderr
    FIGURES["bad_inputs"] += 1


def test_rank_zero_does_not_wait_for_a_dead_peer(tmp_path, monkeypatch):
    import analyses.clips as runner

    monkeypatch.setattr(runner, "PEER_GRACE", 1.0)
    records = read_dataset([{"id": f"c{i}", "video": "v.mp4", "prompt": "Q", "options": "AB"} for i in range(4)])
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\] are not running.*Restart the missing rank"):
        run_clips(records, lambda r: {"v": 1}, tmp_path / "r.jsonl", rank=0, world_size=2, progress=False)
    assert time.perf_counter() - start < 20
    with pytest.raises(TimeoutError, match="no other rank has written a record for 1 s"):
        holder = OutputLock(runner.shard_path(tmp_path / "s.jsonl", 1, 2)).acquire()   # "alive" but silent
        try:
            run_clips(records, lambda r: {"v": 1}, tmp_path / "s.jsonl", rank=0, world_size=2, progress=False,
                      wait_timeout=1.0)
        finally:
            holder.release()
    FIGURES["bad_inputs"] += 2


# ---------------------------------------------------------------------------------------
# the library's own toy data set through `nnsight-av trace`; ASD's fallback where results are shown
# ---------------------------------------------------------------------------------------
def test_toy_dataset_runs_through_trace(tmp_path):
    from nnsight_av import toy
    from nnsight_av.cli import app

    path = toy.write_dataset(toy.make_dataset(2, seed=0, task="mc"), tmp_path / "toy")
    (clip,) = read_dataset(path)[:1]
    assert clip.objects is None and clip.object_names == ["triangle", "bell"]   # nouns, not token positions
    out = tmp_path / "trace.jsonl"
    result = CliRunner().invoke(app, ["trace", str(path), "--model", "tiny", "--out", str(out), "--token-sets",
                                      "all,sink", "--sink-dims", "0,1", "--tau", "2"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(out, key="id")
    assert [r["status"] for r in records] == ["ok", "ok"] and "errors: 0" in result.output
    captions = toy.write_dataset(toy.make_dataset(2, seed=0, task="caption"), tmp_path / "toy", name="caps.jsonl")
    assert not check_caption_dataset(captions).invalid                 # video_path / audio_path, nouns as objects


def test_cli_exit_codes_for_model_settings_and_failed_clips(tmp_path):
    from nnsight_av.cli import EXIT_CLIPS_FAILED, app

    rows = clip_files(tmp_path, 1)
    data = jsonl(tmp_path / "clips.jsonl", [{**rows[0], "prompt": "Which?", "options": "ABCD"},
                                            {"id": "gone", "video": "gone.npy", "prompt": "Which?", "options": "AB"}])
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    dims = runner.invoke(app, ["trace", str(data), "--model", "tiny", "--out", str(out), "--sink-dims", "9999"])
    assert dims.exit_code == 2 and "sink dims [9999] are out of range" in dims.output and not out.exists()
    args = ["trace", str(data), "--model", "tiny", "--out", str(out), "--token-sets", "all,sink", "--sink-dims",
            "0,1", "--tau", "2"]
    failed = runner.invoke(app, args)
    assert failed.exit_code == EXIT_CLIPS_FAILED, failed.output
    assert "1 of 2 records are invalid" in failed.output and "1 of 2 clips failed (first: gone" in failed.output
    other = runner.invoke(app, args[:-1] + ["3"])                     # another tau: refused, differences listed
    assert other.exit_code == 2 and "tau: 2.0 (saved) != 3.0 (now)" in other.output
    assert len(read_jsonl(out, key="id")) == 2
    FIGURES["bad_inputs"] += 3


def test_asd_fallback_is_shown_with_the_results():
    from analyses.chair import example_vocabulary

    rows = [{"id": str(i), "method": m, "caption": "A dog.", "objects": ["dog"], "ms": 5.0, "num_new_tokens": 3,
             **({"asd": {"fallback_steps": 3 if i < 2 else 1, "reason": "no sink sets"}} if m == "asd" else {})}
            for i in range(3) for m in ("greedy", "asd")]
    result = EvalResult(rows, example_vocabulary())
    table = result.table().set_index("method")
    assert table.loc["asd", "fell_back"] == 2 and table.loc["greedy", "fell_back"] == 0
    (note,) = result.notes()
    assert note.startswith("asd: 2 of 3 captions fell back to greedy at every step (no sink sets)")


# ---------------------------------------------------------------------------------------
# torture: SIGKILL real CLI runs at random points, resume, compare with an uninterrupted run
# ---------------------------------------------------------------------------------------
_TIMING = ("ms", "ms_per_token")


def _kill_and_resume(args: list[str], out: Path, total: int, kills: int, rng: random.Random) -> list[dict]:
    """Run the CLI, SIGKILL it once it has ``k`` records (k random) plus a random delay, resume; repeat.

    Every record that was complete at a kill must be in the final file, unchanged.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "nnsight_av.cli", *args, "--out", str(out)]
    survived: dict[tuple, dict] = {}
    for _ in range(kills):
        before = len(read_jsonl(out, warn=False))
        target = rng.randint(before, max(before, total - 1))
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 240
        while process.poll() is None and time.time() < deadline:
            if len(read_jsonl(out, warn=False)) >= target:
                time.sleep(rng.uniform(0, 0.05))                     # land anywhere, mid-write included
                break
            time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            FIGURES["kills"] += 1
        process.wait()
        for r in read_jsonl(out, warn=False):
            survived[(r["id"], r.get("method"))] = r
    final = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    records = read_jsonl(out)
    kept = {(r["id"], r.get("method")): r for r in records}
    lost = [k for k, r in survived.items() if kept.get(k) != r]
    FIGURES["records_lost"] += len(lost)
    assert not lost, lost
    return records


def test_killed_runs_lose_nothing(tiny, tmp_path):
    rng = random.Random(int(os.environ.get("NNSIGHT_AV_TORTURE_SEED", time.time())))
    rows = clip_files(tmp_path, 3)
    caps = jsonl(tmp_path / "caps.jsonl", [{**r, "objects": ["dog"]} for r in rows])
    args = ["caption-eval", str(caps), "--model", "tiny", "--methods", "greedy,asd", "--max-new-tokens", "4"]
    killed = _kill_and_resume(args, tmp_path / "caps.out.jsonl", 6, 2, rng)
    whole = evaluate(tiny, caps, ["greedy", "asd"], tmp_path / "whole.jsonl", max_new_tokens=4, progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in _TIMING} for r in rs]  # noqa: E731
    assert strip(killed) == strip(whole.records)
    data = jsonl(tmp_path / "clips.jsonl", [{**r, "prompt": "Which?", "options": "ABCD"} for r in rows])
    args = ["trace", str(data), "--model", "tiny", "--token-sets", "all,sink", "--sink-dims", "0,1", "--tau", "2"]
    traced = _kill_and_resume(args, tmp_path / "trace.jsonl", 3, 2, rng)
    reference = trace_dataset(tiny, data, tmp_path / "trace.whole.jsonl", progress=False, **SETTINGS)
    assert traced == reference.records
    assert (tmp_path / "trace.jsonl").read_text() == (tmp_path / "trace.whole.jsonl").read_text()
