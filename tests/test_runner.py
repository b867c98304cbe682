"""Data set records, the resumable JSONL runner (crash + resume), sharding over two processes, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nnsight_av as nav
import analyses.runner as runner_module
from analyses import ClipRecord, TraceResult, read_dataset, run_clips, trace_dataset, write_dataset
from analyses.runner import ResultStore, merge_shards, shard_path
from nnsight_av.errors import InputError, MediaError

from test_tracing import sharpen


#: Tiny models run ~10x faster on one intra-op thread when the CPU is shared (conftest `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = dict(sink_dims=[0, 1], tau=2.0, window=2, token_sets=("all", "sink", "random", "cross_modal_sink"))


def write_clips(folder: Path, count: int = 3, broken: bool = True) -> Path:
    records = []
    for i in range(count):
        np.save(folder / f"v{i}.npy", nav.testing.synthetic_frames(4.0, 2, 64, seed=i))
        np.save(folder / f"a{i}.npy", nav.testing.synthetic_tone(4.0, freq=200.0 + 90 * i))
        records.append({"id": f"clip{i}", "video": f"v{i}.npy", "audio": f"a{i}.npy", "fps": 2,
                        "question": "What is making the sound?", "options": ["dog", "cat", "car", "bird"],
                        "label": "A"})
    if broken:
        (folder / "bad.npy").write_bytes(b"not an array")
        records.insert(1, {"id": "corrupt-file", "video": "bad.npy", "audio": "a0.npy", "prompt": "Which?",
                           "options": "ABCD"})
        records.append({"id": "missing", "video": "gone.mp4", "prompt": "Which?", "options": "ABCD"})
    path = folder / "clips.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def sharp():
    return sharpen(nav.testing.tiny_model(seed=0))


def test_dataset_records(tmp_path):
    recs = read_dataset([{"id": "x", "video_path": "x.mp4", "prompt": "Q?", "options": "ABC", "answer": "B"},
                         {"id": "y", "video": "y.mp4", "audio": "y.wav", "question": "Q?",
                          "options": {"A": "dog", "B": "cat"}, "label": "cat", "objects": {"audio_times": [[0, 1]]},
                          "source": "vggsound"}])
    assert recs[0].video == "x.mp4" and recs[0].label == "B" and recs[0].options == ["A", "B", "C"]
    assert recs[1].label == "B" and recs[1].option_names == ["dog", "cat"] and recs[1].extra == {"source": "vggsound"}
    assert recs[1].prompt == "Q?\nA. dog\nB. cat\nRespond with one letter."
    for suffix in (".json", ".jsonl"):
        path = write_dataset(recs, tmp_path / f"d{suffix}")
        back = read_dataset(path)
        assert [r.to_dict() for r in back] == [r.to_dict() for r in recs]
        assert back[0].root == str(tmp_path.resolve())
    (tmp_path / "wrapped.json").write_text(json.dumps({"clips": [recs[0].to_dict()]}))
    assert read_dataset(tmp_path / "wrapped.json")[0].id == "x"
    bad = [({"id": "a", "video": "v", "prompt": "Q"}, "options"),
           ({"id": "a", "video": "v", "options": "AB"}, "prompt"),
           ({"id": "a", "prompt": "Q", "options": "AB"}, "no 'video'"),
           ({"id": "a", "video": "v", "prompt": "Q", "options": "AB", "label": "C"}, "label"),
           ({"id": "a", "video": "v", "prompt": "Q", "options": "AB", "dominant": "text"}, "dominant")]
    for record, message in bad:
        with pytest.raises(InputError, match=message):
            read_dataset([record])
    with pytest.raises(InputError, match="twice"):
        read_dataset([recs[0].to_dict(), recs[0].to_dict()])
    with pytest.raises(InputError, match="not found"):
        read_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(MediaError, match="not found"):
        ClipRecord.from_dict({"id": "m", "video": "none.npy", "prompt": "Q", "options": "AB"}, tmp_path).media()


def test_store_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "v": 1}\n{"id": "b", "v"')          # the process died mid-write
    store = ResultStore(path)
    assert [r["id"] for r in store.records()] == ["a"]
    store.append({"id": "b", "v": 2})
    assert path.read_text() == '{"id": "a", "v": 1}\n{"id": "b", "v": 2}\n'


def test_crash_and_resume_gives_the_uninterrupted_result(sharp, tmp_path, monkeypatch):
    data = write_clips(tmp_path)
    whole = trace_dataset(sharp, data, tmp_path / "whole.jsonl", progress=False, **SETTINGS)
    ids = [r["id"] for r in whole.records]
    assert ids == ["clip0", "corrupt-file", "clip1", "clip2", "missing"]
    errors = {r["id"]: r for r in whole.errors}
    assert set(errors) == {"corrupt-file", "missing"}
    assert errors["missing"]["error_type"] == "MediaError" and "gone.mp4" in errors["missing"]["error"]
    assert "bad.npy" in errors["corrupt-file"]["error"]
    traced = [r for r in whole.records if r.get("trace")]
    assert traced and all(r["dominance"] in ("audio", "video") for r in traced)

    real, calls = runner_module.analyze_clip, []

    def crashing(model, record, config=None):
        calls.append(record.id)
        if len(calls) == 2:                                                # clip1 (invalid records make no call)
            raise KeyboardInterrupt("simulated crash")
        return real(model, record, config)

    monkeypatch.setattr(runner_module, "analyze_clip", crashing)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        trace_dataset(sharp, data, out, progress=False, **SETTINGS)
    assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == ["clip0", "corrupt-file"]
    calls.clear()
    monkeypatch.setattr(runner_module, "analyze_clip", lambda *a, **k: (calls.append(a[1].id), real(*a, **k))[1])
    resumed = trace_dataset(sharp, data, out, progress=False, **SETTINGS)
    assert calls == ["clip1", "clip2"]                        # nothing saved is recomputed, invalid records never run
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()
    assert resumed.records == whole.records
    table = TraceResult.load(out).table()
    assert set(table.index) == {"all", "sink", "random", "cross_modal_sink"}
    assert resumed.facts()["dominance"]["error"] == 2 and resumed.summary()["errors"].item() == 2


def test_in_process_shards_merge_to_the_single_run(tmp_path):
    records = read_dataset([{"id": f"c{i}", "video": "v.mp4", "prompt": "Q", "options": "AB"} for i in range(5)])

    def work(record):
        if record.id == "c3":
            raise MediaError("c3 cannot be decoded")
        return {"value": int(record.id[1:]) ** 2}

    single = run_clips(records, work, tmp_path / "single.jsonl", progress=False)
    out = tmp_path / "sharded.jsonl"
    part = run_clips(records, work, out, rank=1, world_size=2, progress=False)
    assert [r["id"] for r in part] == ["c1", "c3"] and shard_path(out, 1, 2).exists() and not out.exists()
    merged = run_clips(records, work, out, rank=0, world_size=2, progress=False)
    assert merged == single and out.read_text() == (tmp_path / "single.jsonl").read_text()
    assert not shard_path(out, 1, 2).exists() and not shard_path(out, 0, 2).exists()
    assert merged[3] == {"id": "c3", "status": "error", "error_type": "MediaError", "error": "c3 cannot be decoded"}
    # a shard left by a crashed sharded run is picked up by a later single-process run
    ResultStore(shard_path(tmp_path / "late.jsonl", 0, 3)).append({"id": "c0", "status": "ok", "value": -1})
    late = run_clips(records, work, tmp_path / "late.jsonl", progress=False)
    assert late[0]["value"] == -1 and [r["id"] for r in late] == [r.id for r in records]
    assert merge_shards(tmp_path / "late.jsonl") == late
    # retry_errors recomputes the error record; the new record wins on every later read
    fixed = run_clips(records, lambda r: {"value": int(r.id[1:]) ** 2}, tmp_path / "single.jsonl", retry_errors=True,
                      progress=False)
    assert fixed[3] == {"id": "c3", "value": 9, "status": "ok"}
    assert run_clips(records, work, tmp_path / "single.jsonl", progress=False) == fixed


def test_cli_sharded_over_two_processes(tmp_path):
    data = write_clips(tmp_path, count=2, broken=False)
    args = [str(data), "--model", "tiny", "--token-sets", "all,sink,random", "--sink-dims", "0,1", "--tau", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    script = tmp_path / "cli.py"
    script.write_text("from nnsight_av.cli import app\napp()\n")
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", "29517", str(script), "trace", *args, "--out",
                              str(tmp_path / "sharded.jsonl")], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "dominance" in sharded.stdout
    single = subprocess.run([sys.executable, str(script), "trace", *args, "--out", str(tmp_path / "single.jsonl")],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert (tmp_path / "sharded.jsonl").read_text() == (tmp_path / "single.jsonl").read_text()
    assert not list(tmp_path.glob("sharded.shard*"))
    summary = json.loads((tmp_path / "single.summary.json").read_text())
    assert summary["clips"] == 2 and summary["config"]["token_sets"] == ["all", "sink", "random"]
