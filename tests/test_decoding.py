"""Greedy, VCD and FMD decoding against plain references (full forwards without a KV cache)."""

import json
import math

import numpy as np
import pytest
import torch

import nnsight_av as nav
from analyses.decoding import (DecodeOutput, blank_modality, diffusion_keep, fmd_generate, greedy_generate,
                               noised_features, vcd_generate)

N_NEW = 4


def extended(data, ids):
    data = dict(data)
    data.pop("position_ids", None)          # the cached ids cover the prompt only: the model computes the longer ones
    extra = torch.tensor([ids] * data["input_ids"].shape[0], dtype=torch.long)
    data["input_ids"] = torch.cat([data["input_ids"], extra], 1)
    data["attention_mask"] = torch.cat([data["attention_mask"], torch.ones_like(extra)], 1)
    return data


def full_logits(model, data, ids):
    """Last-position logits of every batch row after appending ``ids`` (no cache)."""
    with torch.no_grad():
        return model._module(**extended(data, ids), use_cache=False).logits[:, -1].float()


def test_greedy_equals_hf_generate(tiny, av_example):
    out = greedy_generate(tiny, av_example, 10)
    with torch.no_grad():
        ref = tiny._module.generate(**av_example.data, max_new_tokens=10, do_sample=False)
    assert out.token_ids == ref[0, len(av_example):].tolist()
    assert out.method == "greedy" and out.prompt_length == len(av_example) and out.ms > 0
    assert out.text == tiny.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_greedy_stops_at_eos(tiny, av_example):
    out = greedy_generate(tiny, av_example, 3)
    eos = out.token_ids[1]                          # pretend the 2nd token is the end of the answer
    config = tiny._module.generation_config
    previous = config.eos_token_id
    config.eos_token_id = eos
    try:
        stopped = greedy_generate(tiny, av_example, 3)
    finally:
        config.eos_token_id = previous
    assert stopped.token_ids == out.token_ids[:2] and stopped.finished and not out.finished


def test_vcd_equals_the_formula_on_uncached_forwards(tiny, av_example):
    alpha, beta = 1.5, 0.2
    out = vcd_generate(tiny, av_example, N_NEW, alpha=alpha, beta=beta, noise_step=600, seed=3)
    clean = dict(av_example.data)
    noisy = noised_features(clean, 600, 3)
    ids = []
    for _ in range(N_NEW):
        lc, ln = full_logits(tiny, clean, ids)[0], full_logits(tiny, noisy, ids)[0]
        p = torch.softmax(lc, -1)
        score = (1 + alpha) * lc - alpha * ln
        score[p < beta * p.max()] = -math.inf
        ids.append(int(score.argmax()))
    assert out.token_ids == ids
    # alpha = 0 and no cut-off: greedy
    assert vcd_generate(tiny, av_example, N_NEW, alpha=0.0, beta=0.0).token_ids == \
        greedy_generate(tiny, av_example, N_NEW).token_ids


def test_noised_features_follow_the_diffusion_schedule(av_example):
    data = av_example.data
    a = noised_features(data, 500, seed=0)
    b = noised_features(data, 500, seed=0)
    assert torch.equal(a["pixel_values_videos"], b["pixel_values_videos"])        # seeded
    assert torch.equal(a["input_ids"], data["input_ids"])                        # text untouched
    x = data["input_features"]
    for schedule, betas in (("sigmoid", 1 / (1 + np.exp(-np.linspace(-6, 6, 1000))) * (5e-3 - 1e-5) + 1e-5),
                            ("linear", np.linspace(1e-4, 0.02, 1000))):
        keep = float(np.prod(1 - betas[:501]))
        y = noised_features(data, 500, seed=0, schedule=schedule)["input_features"]
        eps = (y - math.sqrt(keep) * x) / math.sqrt(1 - keep)
        assert abs(float(eps.mean())) < 0.02 and abs(float(eps.std()) - 1) < 0.02
    assert torch.equal(a["input_features"], noised_features(data, 500, seed=0, schedule="sigmoid")["input_features"])
    only_audio = noised_features(data, 500, modalities=("audio",))
    assert torch.equal(only_audio["pixel_values_videos"], data["pixel_values_videos"])
    with pytest.raises(nav.InputError, match="noise_step"):
        noised_features(data, 1000)
    with pytest.raises(nav.InputError, match="no video"):
        noised_features({"input_ids": data["input_ids"]}, 10, modalities=("video",))


def test_vcd_noise_keeps_the_signal_fraction_of_its_schedule():
    # METHOD.md section 6: VCD's released sigmoid schedule keeps ~86% of the signal at step 500,
    # DDPM's linear one ~28%; the kept fraction is sqrt(alpha_bar).
    assert math.sqrt(diffusion_keep(500)) == pytest.approx(0.863, abs=1e-3)
    assert math.sqrt(diffusion_keep(500, "sigmoid")) == pytest.approx(0.863, abs=1e-3)
    assert math.sqrt(diffusion_keep(500, "linear")) == pytest.approx(0.279, abs=1e-3)
    x = torch.ones(1, 200_000)
    for schedule, kept in (("sigmoid", 0.863), ("linear", 0.279)):
        y = noised_features({"input_features": x}, 500, seed=1, schedule=schedule)["input_features"]
        assert float(y.mean()) == pytest.approx(kept, abs=5e-3)  # the noise has mean 0
    with pytest.raises(nav.InputError, match="unknown noise schedule 'cosine'"):
        noised_features({"input_features": x}, 500, schedule="cosine")
    with pytest.raises(nav.InputError, match="noise_step must be an integer"):
        diffusion_keep(500.5)


def test_vcd_records_its_schedule_and_refuses_bad_settings(tiny, av_example):
    out = vcd_generate(tiny, av_example, 1)
    assert out.params["schedule"] == "sigmoid" and out.params["noise_step"] == 500
    with pytest.raises(nav.InputError, match="noise schedule"):
        vcd_generate(tiny, av_example, 1, schedule="ddpm")
    with pytest.raises(nav.InputError, match="alpha >= 0"):
        vcd_generate(tiny, av_example, 1, alpha=float("nan"))


def fork_merge_reference(model, audio_only, video_only, fork, w, steps):
    """FMD written plainly: batch [audio-only, video-only], hidden states merged at layer ``fork``."""
    batch = model.adapter.collate([audio_only.data, video_only.data])
    layer = model._module.model.layers[fork]

    def merge(module, args, kwargs):
        h = args[0]
        mixed = (w * h[0] + (1 - w) * h[1])[None].expand_as(h)
        return (mixed, *args[1:]), kwargs

    handle = layer.register_forward_pre_hook(merge, with_kwargs=True)
    try:
        ids = []
        for _ in range(steps):
            ids.append(int(full_logits(model, batch, ids)[0].argmax()))
    finally:
        handle.remove()
    return ids


def test_fmd_equals_a_plain_fork_merge(tiny, av_example):
    audio_only = blank_modality(tiny, av_example, "video")
    video_only = blank_modality(tiny, av_example, "audio")
    out = fmd_generate(tiny, av_example, N_NEW, fork_layer=2, merge=0.3)
    assert out.token_ids == fork_merge_reference(tiny, audio_only, video_only, 2, 0.3, N_NEW)
    assert out.meta["merge_weight_audio"] == pytest.approx(0.3)
    # merge weights 1 and 0 are the audio-only and video-only branches merged into themselves
    only_audio = fmd_generate(tiny, av_example, N_NEW, fork_layer=2, merge=1.0)
    assert only_audio.token_ids == greedy_generate(tiny, audio_only, N_NEW).token_ids


def test_fmd_attention_weight_equals_column_attention(tiny, av_example):
    from analyses.attention import column_attention

    fork = 2
    out = fmd_generate(tiny, av_example, 2, fork_layer=fork, merge="attention")
    audio_only = blank_modality(tiny, av_example, "video")
    video_only = blank_modality(tiny, av_example, "audio")
    rows = list(range(int(av_example.spans.media.max()) + 1, len(av_example)))
    layers = list(range(fork))
    a = column_attention(tiny, audio_only, av_example.spans.audio, layers, rows, progress=False)
    v = column_attention(tiny, video_only, av_example.spans.video, layers, rows, progress=False)
    mass_a, mass_v = float(a.sum(-1).mean()), float(v.sum(-1).mean())   # over layers, heads and rows
    assert out.meta["merge_weight_audio"] == pytest.approx(mass_a / (mass_a + mass_v), abs=1e-5)
    ref = fork_merge_reference(tiny, audio_only, video_only, fork, out.meta["merge_weight_audio"], 2)
    assert out.token_ids == ref


def test_blank_modality_keeps_the_layout(tiny, av_example):
    black = blank_modality(tiny, av_example, "video")
    silent = blank_modality(tiny, av_example, "audio")
    assert torch.equal(black.input_ids, av_example.input_ids) and torch.equal(silent.input_ids, av_example.input_ids)
    pixels = black.data["pixel_values_videos"]
    assert torch.allclose(pixels, pixels[:1].expand_as(pixels))     # black frames: every patch the same
    assert torch.equal(silent.data["pixel_values_videos"], av_example.data["pixel_values_videos"])
    assert not torch.equal(silent.data["input_features"], av_example.data["input_features"])


def test_errors(tiny, av_example):
    with pytest.raises(nav.LayerIndexError, match="fork_layer"):
        fmd_generate(tiny, av_example, 2, fork_layer=4)
    with pytest.raises(nav.InputError, match="merge"):
        fmd_generate(tiny, av_example, 2, merge="max")
    audio_only = tiny.prepare(audio=nav.testing.synthetic_tone(1.0), text="hi")
    with pytest.raises(nav.InputError, match="both audio and video"):
        fmd_generate(tiny, audio_only, 2)
    with pytest.raises(nav.InputError, match="beta"):
        vcd_generate(tiny, av_example, 2, beta=2.0)
    with pytest.raises(nav.InputError, match="max_new_tokens"):
        greedy_generate(tiny, av_example, 0)
    with pytest.raises(nav.InputError, match="'video' or 'audio'"):
        blank_modality(tiny, av_example, "text")


def test_output_round_trip(tiny, av_example, tmp_path):
    out = vcd_generate(tiny, av_example, 3)
    back = DecodeOutput.from_json(out.to_json(tmp_path / "o.json"))
    assert back == out and back.ms_per_token == pytest.approx(out.ms / 3)
    assert list(out.to_frame()["step"]) == [1, 2, 3]


# ---------------------------------------------------------------------------------------
# evaluation runner
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    from analyses.evaluate import write_caption_dataset

    root = tmp_path_factory.mktemp("captions")
    np.save(root / "frames.npy", nav.testing.synthetic_frames(2.0, 2, 56, seed=4))
    np.save(root / "wave.npy", nav.testing.synthetic_tone(2.0, freq=330.0))
    nav.testing.write_mp4(root / "clip.mp4", seconds=2.0, fps=4, size=56, seed=5)
    return write_caption_dataset([
        {"id": "a", "video": "frames.npy", "audio": "wave.npy", "objects": ["dog"]},
        {"id": "b", "video": "clip.mp4", "objects": "cat", "prompt": "Describe it."},
    ], root / "data.jsonl")


ASD_TINY = {"config": {"sink_dims": [0, 5], "tau": 1.5, "boost_start": 1, "target_start": 2}}


def test_evaluate_runs_each_method_and_resumes(tiny, caption_data, monkeypatch):
    import importlib

    ev = importlib.import_module("analyses.evaluate")   # the package attribute is the function

    out = caption_data.parent / "out.jsonl"
    calls = []
    real = ev.run_method

    def counting(model, ex, method, max_new_tokens, **kwargs):
        calls.append(method)
        return real(model, ex, method, max_new_tokens, **kwargs)

    monkeypatch.setattr(ev, "run_method", counting)
    first = ev.evaluate(tiny, caption_data, ["greedy"], out, max_new_tokens=3, progress=False)
    assert calls == ["greedy", "greedy"] and len(first.records) == 2
    records = ev.read_caption_dataset(caption_data)
    assert first.records[0]["caption"] == greedy_generate(tiny, records[0].prepare(tiny), 3).text
    with out.open("a") as handle:                     # an interrupted write leaves half a line
        handle.write('{"id": "a", "meth')
    calls.clear()
    both = ev.evaluate(tiny, caption_data, ["greedy", "asd"], out, max_new_tokens=3, progress=False,
                       method_kwargs={"asd": ASD_TINY})
    assert calls == ["asd", "asd"]                    # greedy pairs were read back, not rerun
    assert [(r["id"], r["method"]) for r in both.records] == [("a", "greedy"), ("a", "asd"), ("b", "greedy"),
                                                             ("b", "asd")]
    assert len(out.read_text().splitlines()) == 4
    assert both.records[1]["asd"]["sinks"]["av"] + both.records[1]["asd"]["sinks"]["va"] > 0
    table = both.table()
    assert list(table["method"]) == ["greedy", "asd"] and (table["ms_per_token"] > 0).all()
    assert set(table.columns) >= {"CHAIR_s", "CHAIR_i", "clips"}
    key = lambda r: (r["id"], r["method"])  # noqa: E731
    assert sorted(ev.EvalResult.load(out).records, key=key) == sorted(both.records, key=key)


def test_eval_table_chair_from_stored_captions():
    from analyses.evaluate import EvalResult

    records = [
        {"id": "1", "method": "greedy", "caption": "A dog and a cat.", "objects": ["dog"], "ms": 40.0,
         "num_new_tokens": 4},
        {"id": "2", "method": "greedy", "caption": "Puppies play.", "objects": ["dog"], "ms": 20.0,
         "num_new_tokens": 2},
        {"id": "1", "method": "asd", "caption": "A dog.", "objects": ["dog"], "ms": 60.0, "num_new_tokens": 3},
        {"id": "2", "method": "asd", "caption": "A cow moos.", "objects": ["dog"], "ms": 30.0, "num_new_tokens": 3},
    ]
    from analyses.chair import example_vocabulary

    table = EvalResult(records, example_vocabulary()).table().set_index("method")
    assert table.loc["greedy", "CHAIR_s"] == pytest.approx(1 / 2) and table.loc["greedy", "CHAIR_i"] == pytest.approx(1 / 3)
    assert table.loc["asd", "CHAIR_s"] == pytest.approx(1 / 2) and table.loc["asd", "CHAIR_i"] == pytest.approx(1 / 2)
    assert table.loc["greedy", "ms_per_token"] == pytest.approx(60 / 6)
    assert table.loc["asd", "ms_per_token"] == pytest.approx(90 / 6)


def test_caption_eval_cli(caption_data):
    from typer.testing import CliRunner

    from nnsight_av.cli import app

    out = caption_data.parent / "cli.jsonl"
    result = CliRunner().invoke(app, ["caption-eval", str(caption_data), "--out", str(out), "--methods", "greedy",
                                      "--max-new-tokens", "2", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "CHAIR_s" in result.output and len(out.read_text().splitlines()) == 1


def test_dataset_errors(tmp_path, tiny):
    from analyses.evaluate import evaluate, read_caption_dataset

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "video": "v.mp4"}]))
    with pytest.raises(nav.InputError, match="'objects'"):
        read_caption_dataset(bad)
    bad.write_text(json.dumps({"clips": [{"id": "x", "video": "v.mp4", "objects": ["dog"]}] * 2}))
    with pytest.raises(nav.InputError, match="duplicate clip ids"):
        read_caption_dataset(bad)
    missing = tmp_path / "m.json"
    missing.write_text(json.dumps([{"id": "x", "video": "nowhere.mp4", "objects": ["dog"]}]))
    result = evaluate(tiny, missing, ["greedy"], progress=False)     # a bad clip is an error line, not a crash
    (row,) = result.errors
    assert row["error_type"] == "MediaError" and "not found" in row["error"] and not result.ok
    with pytest.raises(nav.InputError, match="unknown decoding methods"):
        evaluate(tiny, [], ["beam"], progress=False)


def test_hooked_attention_refuses_sliding_windows():
    from interventions.runtime.routing import _ACTIVE, AttentionHook, _hooked_attention

    module = torch.nn.Linear(2, 2)
    token = _ACTIVE.set((AttentionHook([module]),))
    try:
        q = torch.randn(1, 2, 3, 4)
        with pytest.raises(nav.AdapterError, match="sliding_window"):
            _hooked_attention(module, q, q, q, None, scaling=0.5, sliding_window=2)
        out, _ = _hooked_attention(module, q, q, q, None, scaling=0.5, sliding_window=None)   # plain: SDPA
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.5)
        assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)
    finally:
        _ACTIVE.reset(token)


@pytest.mark.parametrize("method", ["vcd", "fmd"])
def test_two_row_prefills_carry_the_media_plan(tiny, av_example, monkeypatch, method):
    """VCD's clean + noised rows and FMD's two blanked branches are prepared inputs with their media
    plan and cached positions (a raw dict would make the prefill read device tensors on the host)."""
    from interventions.runtime.decoder import Decoder
    from nnsight_av.adapters.base import PLAN_KEY

    seen = []
    real = Decoder.prefill
    monkeypatch.setattr(Decoder, "prefill", lambda self, data, *a, **k: (seen.append(data), real(self, data, *a, **k))[1])
    (vcd_generate if method == "vcd" else fmd_generate)(tiny, av_example, max_new_tokens=2, static=False)
    assert seen and all(PLAN_KEY in data and data["input_ids"].shape[0] == 2 for data in seen)
    assert all(torch.is_tensor(data.get("position_ids")) for data in seen)
