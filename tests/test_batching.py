"""Data-set throughput (issue 17 item 3): batches of clips of different lengths give the clip-by-clip records."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import nnsight_av as nav
import analyses.runner as runner_module
from analyses import trace_dataset
from analyses.batching import choose_batch_size, length_batches, pipeline_token_bytes, prefetched, take_row
from analyses.datasets import ClipRecord
from analyses.patching import PatchRunner
from analyses.runner import PipelineConfig, analyze_batch, analyze_clip, analyze_clips, clips_per_batch
from nnsight_av.errors import InputError

#: Tiny models run ~10x faster on one intra-op thread when the CPU is shared (conftest `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")



SETTINGS = dict(token_sets=("all", "sink", "random"), window=2)
SECONDS = (2.0, 4.0, 3.0, 2.0)             # different lengths; two of one length


@pytest.fixture(scope="module")
def toy():
    return nav.load("toy-omni")


def clips(dominant="audio"):
    return [ClipRecord(id=f"c{i}", prompt="What is making the sound?", options=list("ABCD"), dominant=dominant,
                       frames=nav.testing.synthetic_frames(s, 2, 56, seed=i),
                       wave=nav.testing.synthetic_tone(s, freq=250.0 + 70 * i))
            for i, s in enumerate(SECONDS)]


def write_clips(folder: Path) -> Path:
    rows = []
    for i, s in enumerate(SECONDS):
        np.save(folder / f"v{i}.npy", nav.testing.synthetic_frames(s, 2, 56, seed=i))
        np.save(folder / f"a{i}.npy", nav.testing.synthetic_tone(s, freq=250.0 + 70 * i))
        rows.append({"id": f"c{i}", "video": f"v{i}.npy", "audio": f"a{i}.npy", "fps": 2, "dominant": "audio",
                     "prompt": "What is making the sound?", "options": "ABCD"})
    path = folder / "clips.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def flat(value, path=""):
    """Every leaf of a record, keyed by its path (lists of numbers stay one leaf)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flat(v, f"{path}/{k}")
    elif isinstance(value, list) and value and isinstance(value[0], (dict, list)):
        for i, v in enumerate(value):
            yield from flat(v, f"{path}[{i}]")
    else:
        yield path, value


def assert_same_record(a, b, tol=1e-5):
    """Same keys, same texts and integers, numbers equal within ``tol``."""
    fa, fb = dict(flat(a)), dict(flat(b))
    assert fa.keys() == fb.keys()
    for key, x in fa.items():
        y = fb[key]
        if isinstance(x, float) or (isinstance(x, list) and x and isinstance(x[0], float)):
            np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), atol=tol, err_msg=key)
        else:
            assert x == y, key


def test_a_batch_gives_the_clip_by_clip_records(toy):
    config = PipelineConfig(**SETTINGS)
    one = [analyze_clip(toy, c, config) for c in clips()]
    lengths = [len(c.prepare(toy)) for c in clips()]
    assert len(set(lengths)) == 3                                    # the batch really pads
    batch = analyze_batch(toy, clips(), config)
    assert [r["id"] for r in batch] == [c.id for c in clips()]
    for a, b in zip(one, batch):
        assert a["trace"] is not None and len(a["trace"]["rows"]) >= 6     # traced: the patched runs are compared too
        assert_same_record(a, b)


def test_batched_records_equal_the_batch_free_ones_at_row_level(toy):
    """The corrupted and clean records cut out of a padded batch hold each clip's own tensors."""
    items = [c.prepare(toy) for c in clips()[:3]]
    runner = PatchRunner(toy, "input_layernorm", "ABCD")
    singles = [runner.record_corrupt(it, [0, 2]) for it in items]
    batched = runner.record_corrupt_batch(items, [0, 2])
    for s, b, it in zip(singles, batched, items):
        assert b.length == len(it) and b.item is it
        torch.testing.assert_close(b.probs, s.probs, atol=1e-6, rtol=0)
        for layer in (0, 2):
            torch.testing.assert_close(b.resid[layer], s.resid[layer], atol=1e-5, rtol=0)
        for key in s.keys:
            torch.testing.assert_close(b.keys[key], s.keys[key], atol=1e-5, rtol=0)
    probs = runner.corrupt_probs_batch(items)
    for p, s in zip(probs, singles):
        torch.testing.assert_close(p, s.probs, atol=1e-6, rtol=0)


def test_dataset_run_batched_matches_clip_by_clip_and_resumes(toy, tmp_path, monkeypatch):
    data = write_clips(tmp_path)
    whole = trace_dataset(toy, data, tmp_path / "one.jsonl", progress=False, clip_batch=1, **SETTINGS)
    assert whole.throughput["clips"] == 4 and whole.throughput["clips_per_hour"] > 0
    assert whole.facts()["throughput"]["clips_per_hour"] == whole.throughput["clips_per_hour"]

    real, calls = runner_module._finish, []

    def crashing(model, clip, config):
        calls.append(clip.record.id)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(model, clip, config)

    monkeypatch.setattr(runner_module, "_finish", crashing)
    out = tmp_path / "batched.jsonl"
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        trace_dataset(toy, data, out, progress=False, clip_batch=2, **SETTINGS)
    saved = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert saved == calls[:2] and saved == ["c0", "c3"]             # the two shortest first, each saved at once
    calls.clear()
    monkeypatch.setattr(runner_module, "_finish", lambda m, c, cfg: (calls.append(c.record.id), real(m, c, cfg))[1])
    resumed = trace_dataset(toy, data, out, progress=False, clip_batch=2, **SETTINGS)
    assert sorted(calls) == ["c1", "c2"]                              # nothing saved is recomputed
    assert resumed.throughput["clips"] == 2 and resumed.throughput["max_batch_size"] == 2
    assert [r["id"] for r in resumed.records] == [r["id"] for r in whole.records]
    stored = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    for a, b in zip(whole.records, resumed.records):
        assert_same_record(a, b)
        assert_same_record(a, stored[a["id"]])


def test_a_failing_batch_runs_its_clips_one_by_one(toy, monkeypatch):
    config = PipelineConfig(**SETTINGS)
    real = PatchRunner.record_corrupt_batch

    def fails_batched(self, items, starts=None):
        if len(items) > 2:              # more than one clip's two corrupted runs
            raise torch.cuda.OutOfMemoryError("simulated: the batch does not fit")
        return real(self, items, starts)

    monkeypatch.setattr(PatchRunner, "record_corrupt_batch", fails_batched)
    records = clips()[:2]
    broken = ClipRecord(id="broken", prompt="Which?", options=list("ABCD"), video="missing.npy")
    out = analyze_batch(toy, records + [broken], config)
    assert [r["id"] for r in out[:2]] == ["c0", "c1"] and out[0]["trace"] is not None
    assert isinstance(out[2], Exception) and "missing.npy" in str(out[2])


def test_analyze_clips_sorts_by_length_and_records_the_batches(toy):
    stats: dict = {}
    config = PipelineConfig(clip_batch=2, **SETTINGS)
    done = list(analyze_clips(toy, clips("video"), config, stats=stats))
    assert [r.id for r, _ in done] == ["c0", "c3", "c2", "c1"]        # 2 s, 2 s, 3 s, 4 s
    assert stats["batch_sizes"] == [2, 2]
    assert all(isinstance(out, dict) and out["status"] == "ok" for _, out in done)


def test_batch_size_from_memory_and_settings(toy):
    per_token = pipeline_token_bytes(toy)
    assert choose_batch_size(toy, 1000, free=8 * 1000 * per_token, share=1.0) == 8
    assert choose_batch_size(toy, 1000, free=8 * 1000 * per_token, share=0.5) == 4
    assert choose_batch_size(toy, 1000, free=10**15) == 16 and choose_batch_size(toy, 1000, free=1) == 1
    assert choose_batch_size(toy, 1000, free=8 * 1000 * 2 * per_token, token_bytes=2 * per_token, share=1.0) == 8
    assert clips_per_batch(toy, PipelineConfig()) == 1                 # auto on a CPU
    assert clips_per_batch(toy, PipelineConfig(clip_batch="6").validate()) == 6
    for bad in (0, -2, "many", 2.5, True):
        with pytest.raises(InputError, match="clip_batch"):
            PipelineConfig(clip_batch=bad).validate()
    with pytest.raises(InputError, match="share"):
        choose_batch_size(toy, 1000, share=0)


def test_batch_helpers():
    assert length_batches([5, 1, 5, 3], 3) == [[1, 3, 0], [2]]
    mask = torch.ones(2, 1, 7, 7)
    assert take_row(mask, 1, 2, 7, 5).shape == (1, 1, 5, 5)
    assert take_row((torch.zeros(2, 7, 4), None, 3), 0, 2, 7, 6)[0].shape == (1, 6, 4)
    assert take_row(torch.arange(7), 0, 2, 7, 3).tolist() == [0, 1, 2]            # cache_position: no batch dim

    def fails(group):
        if group == 2:
            raise ValueError("group 2")
        return group
    seen = []
    with pytest.raises(ValueError, match="group 2"):
        for group, out in prefetched([1, 2, 3], fails):
            seen.append(out)
    assert seen == [1]


def test_cli_runs_batches_and_reports_clips_per_hour(tmp_path):
    from typer.testing import CliRunner

    from nnsight_av.cli import app

    data = write_clips(tmp_path)
    out = tmp_path / "trace.jsonl"
    result = CliRunner().invoke(app, ["trace", str(data), "--model", "tiny", "--sink-dims", "0,1", "--tau", "2",
                                      "--token-sets", "all", "--clip-batch", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "clips/hour" in result.output
    summary = json.loads(out.with_name("trace.summary.json").read_text())
    assert summary["throughput"]["clips"] == 4 and summary["throughput"]["max_batch_size"] == 3
    assert summary["throughput"]["clips_per_hour"] > 0 and summary["config"]["clip_batch"] == 3
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["c0", "c1", "c2", "c3"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (batch size from free GPU memory)")
def test_gpu_auto_batch_size_from_free_memory():
    model = nav.load("toy-omni")
    model._module.to("cuda")
    stats: dict = {}
    config = PipelineConfig(**SETTINGS)                               # clip_batch="auto"
    done = {record.id: out for record, out in analyze_clips(model, clips(), config, stats=stats)}
    assert max(stats["batch_sizes"]) > 1 and stats["peak_memory_gib"] > 0
    for record in clips():
        assert_same_record(analyze_clip(model, record, config), done[record.id], tol=1e-4)
