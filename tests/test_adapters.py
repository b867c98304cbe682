"""Adapters: Qwen3-Omni, a model outside transformers, and adapter validation.

Ground truth here is built independently of the code under test: layouts written out by
hand from the processors' documented rules, the models' own rope index, encoder outputs
captured with plain forward hooks, and adapters broken on purpose.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nnsight_av as nav
from nnsight_av.adapters.base import registered_adapters
from nnsight_av.adapters.qwen2_5_omni import Qwen25OmniAdapter
from nnsight_av.adapters.qwen3_omni import Qwen3OmniAdapter, qwen3_audio_token_count
from nnsight_av.adapters.salmonn_style import SalmonnStyleAdapter
from nnsight_av.testing.check import CHECKS, AdapterReport, attention_from_qk
from nnsight_av.validation import quick_check, role_problems, token_problems

ROOT = Path(__file__).resolve().parents[1]
frames = nav.testing.synthetic_frames
tone = nav.testing.synthetic_tone


@pytest.fixture(scope="module")
def qwen3():
    return nav.testing.tiny_model("qwen3_omni_moe", seed=0)


@pytest.fixture(scope="module")
def salmonn():
    return nav.testing.tiny_model("salmonn_style", seed=0)


@pytest.fixture(scope="module")
def example():
    """docs/examples/salmonn_style_adapter.py, the guide's worked example, run once."""
    path = ROOT / "docs" / "examples" / "salmonn_style_adapter.py"
    spec = importlib.util.spec_from_file_location("salmonn_style_adapter_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main()


def fresh(model_type):
    return nav.testing.tiny_model(model_type, seed=0, validate=False)


# -- check_adapter on every registered adapter ---------------------------------------------------
def tiny_type_of(adapter_cls):
    from nnsight_av.testing.tiny import _BUILDERS

    names = [t for t in _BUILDERS if t == adapter_cls.name or t in adapter_cls.model_types]
    assert names, f"adapter {adapter_cls.name!r} is registered but has no tiny model in nav.testing.tiny_model"
    return names[0]


@pytest.mark.parametrize("name", sorted(registered_adapters()))
def test_check_adapter_passes_for_every_registered_adapter(name, request, example):
    adapter_cls = registered_adapters()[name]
    model_type = tiny_type_of(adapter_cls)
    if model_type == "salmonn_style":
        report = example["report"]          # the guide's example ran check_adapter on this tiny model
    else:
        model = request.getfixturevalue("tiny" if model_type == "qwen2_5_omni" else "qwen3")
        report = nav.testing.check_adapter(model)
    assert report.adapter == name
    assert [c.name for c in report.checks] == list(CHECKS)
    assert report.ok, str(report)
    assert report.raise_for_failures() is report
    # The messages carry the measured facts, not just "ok".
    assert "max |q/k softmax - eager|" in report["attention"].message
    assert re.search(r"audio=\d+, video=\d+ tokens", report["spans:interleaved"].message)


def test_report_round_trips_and_has_a_table(example):
    report = example["report"]
    again = AdapterReport.from_json(report.to_json())
    assert again == report
    frame = report.to_frame()
    assert list(frame["check"]) == list(CHECKS) and set(frame["status"]) == {"pass"}
    row = nav.testing.status_table([report]).splitlines()[-1]
    assert row.startswith("| salmonn_style |") and "12/12" in row and "all pass" in row


def test_docs_status_table_lists_every_adapter_with_installed_versions():
    import nnsight
    import transformers

    text = (ROOT / "docs" / "adapters.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| tiny:" in line]
    for name in registered_adapters():
        row = next((r for r in rows if r.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/adapters.md status table has no row for {name}"
        assert f"| {transformers.__version__} | {nnsight.__version__} |" in row
        assert "all pass" in row


def test_attention_from_qk_matches_a_hand_computed_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    got = attention_from_qk(q, k, None, 0.5)
    for h in range(2):
        for t in range(3):
            scores = [float(q[0, h, t] @ k[0, 0, s]) * 0.5 for s in range(t + 1)]
            expected = np.exp(scores) / np.exp(scores).sum()
            assert np.allclose(got[0, h, t, :t + 1].numpy(), expected, atol=1e-6)
            assert float(got[0, h, t, t + 1:].abs().sum()) == 0.0
    padded = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    padded[..., 0] = False
    assert torch.allclose(attention_from_qk(q, k, padded, 0.5)[..., 1:, 0], torch.zeros(1, 2, 2))


# -- broken adapters fail validation, by name ------------------------------------------------------
class MissingVision(Qwen25OmniAdapter):
    name = "broken_missing_vision"
    roles = {**Qwen25OmniAdapter.roles, "vision_encoder": ("model.vision_tower",)}


class MissingNorm(SalmonnStyleAdapter):
    name = "broken_missing_norm"
    roles = {**SalmonnStyleAdapter.roles, "final_norm": ("lm.model.final_layernorm",)}


class WrongNorm(Qwen25OmniAdapter):
    name = "broken_wrong_norm"
    roles = {**Qwen25OmniAdapter.roles, "final_norm": ("model.layers.3.input_layernorm",)}


class WrongAudioToken(SalmonnStyleAdapter):
    name = "broken_audio_token"
    token_config = {**SalmonnStyleAdapter.token_config, "audio": ("image_token_id",)}


class WrongVisionPath(SalmonnStyleAdapter):
    name = "broken_vision_is_audio"
    roles = {**SalmonnStyleAdapter.roles, "vision_encoder": ("audio_encoder",), "vision_projector": ("audio_projector",)}


def rewrap(model, adapter):
    return nav.AVModel(model._module, adapter=adapter, processor=model.processor,
                       processor_kwargs=model.processor_kwargs, default_system=model.default_system)


def test_missing_module_path_fails_roles_by_name():
    model = rewrap(fresh("qwen2_5_omni"), MissingVision)
    report = nav.testing.check_adapter(model, checks=["roles", "tokens", "spans:video"])
    assert report["roles"].passed is False
    assert "'vision_encoder'" in report["roles"].message and "model.vision_tower" in report["roles"].message
    assert report["tokens"].passed is True
    assert report["spans:video"].passed is None and "not run" in report["spans:video"].message
    with pytest.raises(nav.AdapterError, match=r"roles: module role 'vision_encoder' does not resolve"):
        report.raise_for_failures()
    with pytest.raises(nav.AdapterError, match="vision_encoder"):
        quick_check(model)                      # what nav.load runs


def test_required_path_that_does_not_exist_is_reported_not_raised():
    base = fresh("salmonn_style")
    report = nav.testing.check_adapter(base._module, adapter=MissingNorm, processor=base.processor)
    assert report["roles"].passed is False
    assert "final_norm" in report["roles"].message and "lm.model.final_layernorm" in report["roles"].message
    assert all(c.passed is None for c in report.checks[1:])
    with pytest.raises(nav.AdapterError, match="final_norm"):
        nav.testing.check_adapter(base._module, adapter=MissingNorm, processor=base.processor,
                                  raise_on_failure=True)


def test_existing_but_wrong_path_fails_wiring_by_name():
    model = rewrap(fresh("qwen2_5_omni"), WrongNorm)
    assert role_problems(model) == []           # the shape alone cannot tell: a norm over hidden
    report = nav.testing.check_adapter(model, checks=["roles", "wiring"])
    assert report["roles"].passed is True
    assert report["wiring"].passed is False
    assert "final_norm" in report["wiring"].message and "model.layers.3.input_layernorm" in report["wiring"].message


def test_wrong_token_id_fails_tokens_and_spans_by_name():
    model = rewrap(fresh("salmonn_style"), WrongAudioToken)
    problems = token_problems(model)
    assert any("token 'audio'" in p and "image_token_id" in p and "<AudioHere>" in p for p in problems)
    assert any("share the id" in p for p in problems)
    with pytest.raises(nav.AdapterError, match="token 'audio'"):
        quick_check(model)
    report = nav.testing.check_adapter(model, checks=["tokens", "spans:audio"])
    assert report["tokens"].passed is False and "'audio'" in report["tokens"].message
    assert report["spans:audio"].passed is False
    assert "SpanError" in report["spans:audio"].message or "audio" in report["spans:audio"].message


def test_vision_role_on_the_audio_encoder_fails_the_span_counts():
    model = rewrap(fresh("salmonn_style"), WrongVisionPath)
    report = nav.testing.check_adapter(model, checks=["roles", "spans:video"])
    assert report["roles"].passed is True
    assert report["spans:video"].passed is False and "vision_encoder" in report["spans:video"].message


def test_load_validates_and_can_opt_out(salmonn, tmp_path):
    salmonn._module.save_pretrained(tmp_path)
    salmonn.processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["audio_token_id"] = config["image_token_id"]      # a checkpoint whose config names the wrong id
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(nav.AdapterError, match="token 'audio'.*tokenizer's audio_token '<AudioHere>'"):
        nav.load(str(tmp_path))
    loaded = nav.load(str(tmp_path), validate=False)
    assert loaded.adapter.token_id("audio") == config["image_token_id"]


# -- full-size configurations, built on the meta device ------------------------------------------
def meta_model(config_cls, model_cls, adapter, **config):
    with torch.device("meta"):
        module = model_cls(config_cls(**config))
    return nav.AVModel(module, adapter=adapter)


QWEN25_IDS = dict(audio_start_token_id=151647, audio_end_token_id=151648, vision_start_token_id=151652,
                  vision_end_token_id=151653)


@pytest.mark.parametrize("size,hidden,layers,heads,kv,inter,sinks", [
    ("7B", 3584, 28, 28, 4, 18944, [458, 2570]),
    ("3B", 2048, 36, 16, 2, 11008, None),
])
def test_qwen2_5_omni_full_size_configurations(size, hidden, layers, heads, kv, inter, sinks):
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    model = meta_model(Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration, Qwen25OmniAdapter,
                       text_config=dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=152064),
                       audio_config=dict(output_dim=hidden), vision_config=dict(out_hidden_size=hidden), **QWEN25_IDS)
    assert role_problems(model) == [] and token_problems(model) == []
    assert (model.num_layers, model.hidden_size, model.num_heads, model.adapter.num_kv_heads) == (layers, hidden, heads, kv)
    assert model.adapter.head_dim == 128
    assert model.adapter.known_sink_dims() == sinks
    assert model.adapter.tau() == 25.0
    assert [model.adapter.token_id(r) for r in ("audio", "image", "video")] == [151646, 151655, 151656]


def test_qwen3_omni_full_size_configuration():
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    model = meta_model(Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration, Qwen3OmniAdapter,
                       text_config=dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        moe_intermediate_size=768, vocab_size=152064),
                       audio_config=dict(output_dim=2048), vision_config=dict(out_hidden_size=2048),
                       position_id_per_seconds=13, audio_token_id=151675, audio_start_token_id=151669,
                       audio_end_token_id=151670, vision_start_token_id=151652, vision_end_token_id=151653)
    assert role_problems(model) == [] and token_problems(model) == []
    assert (model.num_layers, model.hidden_size, model.adapter.head_dim) == (48, 2048, 128)
    assert model.adapter.known_sink_dims() is None
    assert model.adapter.layer_paths["router"] == "mlp.gate"


# -- Qwen3-Omni -----------------------------------------------------------------------------------------
def hand_timestamp_layout(per_patch, patches, seconds_per_patch, pps, audio):
    """The processor's rule written out: video first while its time <= the next audio index."""
    video_times = [p * seconds_per_patch * pps for p in range(patches) for _ in range(per_patch)]
    out, v, a = [], 0, 0
    while v < len(video_times) or a < audio:
        if v < len(video_times) and (a >= audio or video_times[v] <= a):
            out.append("V"); v += 1
        else:
            out.append("A"); a += 1
    return "".join(out)


def test_qwen3_interleaved_layout_and_chunks_by_hand(qwen3):
    ex = qwen3.prepare(video=frames(4.0, 2, 64), audio=tone(4.0), text="What is making the sound?")
    # 64x64 frames, 16-px patches, 2x2 merge: 4 tokens per temporal patch; 8 frames: 4 patches of 1 s;
    # 4 s of audio: 52 tokens; 13 rope units per second.
    block = hand_timestamp_layout(4, 4, 1.0, 13, 52)
    assert block == ("VVVV" + "A" * 13) * 4
    assert block in ex.layout() and ex.layout().count("V") == 16 and ex.layout().count("A") == 52
    start = ex.layout().index(block)
    chunk0, chunk1 = ex.spans.chunks
    # chunk 0 = rope times [0, 26): patches 0 and 1 and audio tokens 0..25
    assert chunk0.video.tolist() == list(range(start, start + 4)) + list(range(start + 17, start + 21))
    assert chunk0.audio.tolist() == list(range(start + 4, start + 17)) + list(range(start + 21, start + 34))
    assert chunk1.video.tolist() == list(range(start + 34, start + 38)) + list(range(start + 51, start + 55))
    assert (chunk0.start_s, chunk0.end_s, chunk1.start_s, chunk1.end_s) == (0.0, 2.0, 2.0, 4.0)


def test_qwen3_span_parser_uses_the_models_processor_kwargs():
    """A per-model processor override (here the rope time scale) reaches the adapter's layout code."""
    base = nav.testing.tiny_model("qwen3_omni_moe", seed=1)
    base._module.config.position_id_per_seconds = 25          # the rope index and the processor agree again
    model = nav.AVModel(base._module, adapter=base.adapter, processor=base.processor,
                        default_system=base.default_system,
                        processor_kwargs={**base.processor_kwargs, "position_id_per_seconds": 25})
    assert model.adapter is not base.adapter and base.adapter.processor_kwargs.get("position_id_per_seconds") is None
    assert model.adapter.config_problems() == []
    ex = model.prepare(video=frames(4.0, 2, 64), audio=tone(4.0), text="What is making the sound?")
    block = hand_timestamp_layout(4, 4, 1.0, 25, 52)
    assert block != hand_timestamp_layout(4, 4, 1.0, 13, 52) and block in ex.layout()
    start = ex.layout().index(block)
    chunk0, chunk1 = ex.spans.chunks                          # 2 s chunks = 50 rope units: patches 0-1 + audio 0-49
    assert chunk0.audio.numel() == 50 and chunk1.audio.numel() == 2 and chunk0.video.numel() == 8
    assert int(chunk0.video[0]) == start


def test_qwen3_chunks_follow_the_models_own_rope_times(qwen3):
    ex = qwen3.prepare(video=frames(6.0, 2, 64, seed=3), audio=tone(5.5), text="Describe it")
    data = ex.data
    pos, _ = qwen3._module.get_rope_index(data["input_ids"], None, data["video_grid_thw"], data["attention_mask"],
                                          True, data["feature_attention_mask"].sum(-1), data["video_second_per_grid"])
    temporal = pos[0, 0]
    media = torch.cat([ex.spans.video, ex.spans.audio]).sort().values
    times = temporal[media] - temporal[media].min()
    assert bool((times[1:] >= times[:-1]).all()), "token order is not rope-time order"
    per_chunk = 2 * 13
    assert len(ex.spans.chunks) == 3
    for c, chunk in enumerate(ex.spans.chunks):
        t = temporal[chunk.all] - temporal[media].min()
        assert bool(((t >= c * per_chunk) & (t < (c + 1) * per_chunk)).all()), f"chunk {c} times {t.tolist()}"


def test_qwen3_odd_frame_rate_uses_the_processors_float_times(qwen3):
    # fps 3: 2/3 s per patch, patch 3 sits at 3 * (2/3) * 13 = 26.0 (float32 tensor: 26.0000013).
    ex = qwen3.prepare(video=frames(4.0, 3, 64), audio=tone(4.0), text="x", fps=3.0)
    grid = ex.data["video_grid_thw"][0].tolist()
    expected = hand_timestamp_layout(grid[1] * grid[2] // 4, grid[0], 2 / 3, 13, 52)
    assert expected in ex.layout()
    n = len(ex.spans.chunks[0].video) // 4
    assert [len(c.video) // 4 for c in ex.spans.chunks] == [3, grid[0] - 3] and n == 3


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.37])
def test_qwen3_audio_token_count_matches_its_encoder(qwen3, seconds):
    ex = qwen3.prepare(audio=tone(seconds), text="x")
    captured = []
    hook = qwen3._module.audio_tower.register_forward_hook(lambda m, a, out: captured.append(out.last_hidden_state))
    try:
        with torch.no_grad():
            qwen3._module(**ex.data)
    finally:
        hook.remove()
    frames_count = int(ex.data["feature_attention_mask"].sum())
    assert captured[0].shape[0] == qwen3_audio_token_count(frames_count) == len(ex.spans.audio)
    # 13 per full second, three stride-2 convolutions on the rest, written out here.
    rest = frames_count % 100
    tail = rest
    for _ in range(3):
        tail = (tail - 1) // 2 + 1 if tail else 0
    assert len(ex.spans.audio) == 13 * (frames_count // 100) + tail


def test_qwen3_deepstack_adds_to_visual_positions_after_layer_0(qwen3):
    ex = qwen3.prepare(video=frames(2.0, 2, 64), audio=tone(2.0), text="x")
    with torch.no_grad(), qwen3.trace(ex):
        out0 = qwen3.layers[0].output.save()
        in1 = qwen3.layers[1].input.save()
        router = qwen3.layers[1].router.output[0].save()
        out1 = qwen3.layers[1].output.save()
        in2 = qwen3.layers[2].input.save()
    video, other = ex.spans.video, torch.cat([ex.spans.text, ex.spans.audio])
    assert torch.equal(out0[0, other], in1[0, other])
    assert (out0[0, video] - in1[0, video]).abs().min() > 0       # one DeepStack level in the tiny config
    assert torch.equal(out1, in2)
    assert router.shape == (len(ex), 4)                             # router logits over 4 experts


def test_qwen3_time_scale_mismatch_is_caught_at_load(qwen3):
    class Mismatch(Qwen3OmniAdapter):
        processor_kwargs = {"position_id_per_seconds": 25}

    model = nav.AVModel(qwen3._module, adapter=Mismatch, processor=qwen3.processor,
                        processor_kwargs=qwen3.processor_kwargs)
    with pytest.raises(nav.AdapterError, match=r"position_id_per_seconds \(13\).*\(25\)"):
        quick_check(model)


def test_qwen3_span_parser_rejects_a_reordered_block(qwen3):
    ex = qwen3.prepare(video=frames(2.0, 2, 64), audio=tone(2.0), text="x")
    ids = ex.input_ids[0].tolist()
    # Put patch 1's first video token (time 13) before audio token 12 (time 12).
    video = int(ex.spans.video[4])
    assert ids[video - 1] == qwen3.adapter.token_id("audio")
    ids[video - 1], ids[video] = ids[video], ids[video - 1]
    with pytest.raises(nav.SpanError, match=f"position {video - 1}: by the timestamp rule the next token is audio"):
        qwen3.adapter.spans(ids, ex.data)


def test_qwen3_load_round_trip(qwen3, tmp_path):
    qwen3._module.save_pretrained(tmp_path)
    qwen3.processor.save_pretrained(tmp_path)
    loaded = nav.load(str(tmp_path), dtype=torch.float32, attn_implementation="sdpa",
                      processor_kwargs=qwen3.processor_kwargs, default_system=qwen3.default_system)
    assert loaded.adapter.name == "qwen3_omni"
    ex = qwen3.prepare(video=frames(2.0, 2, 64), audio=tone(2.0), text="x")
    again = loaded.prepare(video=frames(2.0, 2, 64), audio=tone(2.0), text="x")
    assert torch.equal(ex.input_ids, again.input_ids)
    with torch.no_grad():
        with qwen3.trace(ex):
            a = qwen3.logits.save()
        with loaded.trace(again):
            b = loaded.logits.save()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# -- the model outside transformers -----------------------------------------------------------------
def test_salmonn_layout_by_hand(salmonn):
    # 2 frames at 2 fps (0.5 s each), 4 tokens per frame; 1.3 s of audio = 130 frames = 6 tokens of 0.25 s
    # starting at 0, .25, .5, .75, 1.0, 1.25: frame 0 keeps 2, the last frame the other 4.
    ex = salmonn.prepare(video=frames(1.0, 2, 64), audio=tone(1.3), text="Hi")
    assert "VVVVAAVVVVAAAA" in ex.layout()
    ids = ex.input_ids[0].tolist()
    vocab = salmonn.tokenizer.get_vocab()
    start = ids.index(vocab["<vision>"])
    assert ids[start + 1] == vocab["<audio>"] and ids[start + 16] == vocab["</audio>"]
    assert ex.spans.video.tolist() == [start + 2 + i for i in (0, 1, 2, 3, 6, 7, 8, 9)]
    assert ex.spans.audio.tolist() == [start + 2 + i for i in (4, 5, 10, 11, 12, 13)]


def test_salmonn_chunks_are_2s_windows(salmonn):
    ex = salmonn.prepare(video=frames(5.0, 2, 64), audio=tone(5.0), text="Hi")
    chunks = ex.spans.chunks
    assert [(c.start_s, c.end_s) for c in chunks] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    assert [len(c.video) for c in chunks] == [16, 16, 8]        # frames 0-3, 4-7, 8-9; 4 tokens each
    assert [len(c.audio) for c in chunks] == [8, 8, 4]          # 4 audio tokens per second
    layout = ex.layout()
    first_chunk = layout[int(chunks[0].all.min()):int(chunks[0].all.max()) + 1]
    assert first_chunk == "VVVVAA" * 4


def test_salmonn_spans_reject_tampered_ids(salmonn):
    ex = salmonn.prepare(video=frames(1.0, 2, 64), audio=tone(1.0), text="Hi")
    ids = ex.input_ids[0].tolist()
    del ids[int(ex.spans.audio[0])]
    with pytest.raises(nav.SpanError, match="audio"):
        salmonn.adapter.spans(ids, ex.data)


def test_salmonn_processor_errors_name_the_problem(salmonn):
    with pytest.raises(nav.InputError, match="unknown arguments.*'size'"):
        salmonn.processor(text="<audio><AudioHere></audio>", audio=[tone(1.0)], size=3)
    with pytest.raises(nav.InputError, match="more <AudioHere> placeholders"):
        salmonn.processor(text="<audio><AudioHere></audio><audio><AudioHere></audio>", audio=[tone(1.0)])
    with pytest.raises(ValueError, match="audio placeholder tokens but the audio encoder produced"):
        data = salmonn.processor(text="<audio><AudioHere></audio>", audio=[tone(1.0)])
        data["input_ids"] = data["input_ids"][:, :-2]
        data["attention_mask"] = data["attention_mask"][:, :-2]
        salmonn._module(**data)


@pytest.mark.parametrize("fixture", ["qwen3", "salmonn"])
def test_batched_generation_equals_separate(fixture, request):
    salmonn = request.getfixturevalue(fixture)      # left padding: rope deltas / positions per row
    a = salmonn.prepare(video=frames(2.0, 2, 64), audio=tone(2.0), text="What is making the sound?")
    b = salmonn.prepare(video=frames(1.0, 2, 64, seed=1), audio=tone(1.0, freq=300.0), text="Describe it")
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with salmonn.generate(**kwargs) as tracer:
        with tracer.invoke(a):
            pass
        with tracer.invoke(b):
            pass
        with tracer.invoke():
            both = tracer.result.save()
    offsets = salmonn.padding_offsets
    assert offsets == [0, len(a) - len(b)]
    for k, ex in enumerate((a, b)):
        with salmonn.generate(ex, **kwargs) as tracer:
            alone = tracer.result.save()
        assert torch.equal(both[k, offsets[k]:], alone[0])


def test_guide_example_runs_every_feature(example):
    ex, model = example["example"], example["model"]
    n = len(ex)
    assert example["logits"].shape == (1, n, model.lm_head._module.out_features)
    assert example["query"].shape == (1, model.num_heads, n, model.adapter.head_dim)
    assert example["key"].shape == (1, model.adapter.num_kv_heads, n, model.adapter.head_dim)
    assert example["first"].shape[1] == n and example["second"].shape[0] == 1
    ids = example["ids"]
    assert ids.shape == (1, n + 4) and torch.equal(ids[0, :n], ex.input_ids[0])
    assert len(example["steps"]) == 4
    # The reload ran the unedited input: it must equal a clean run of the original model.
    with torch.no_grad(), model.trace(ex):
        clean = model.logits.save()
    torch.testing.assert_close(example["reloaded"], clean, rtol=0, atol=1e-6)
    assert (example["logits"][0, -1] - clean[0, -1]).abs().max() > 1e-6       # the chunk-0 audio edit mattered


def fenced(markdown: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.S)


def test_guide_quotes_the_real_adapter():
    """The guide's ```py excerpts are verbatim from the adapter; its ```python blocks run in test_docs.py."""
    guide = (ROOT / "docs" / "adapters.md").read_text()
    source = (ROOT / "nnsight_av" / "adapters" / "salmonn_style.py").read_text()
    excerpts = fenced(guide, "py")
    assert len(excerpts) >= 7
    for excerpt in excerpts:
        assert excerpt.rstrip("\n") in source, f"docs/adapters.md quotes code that is not in the adapter:\n{excerpt}"
    runnable = "\n".join(fenced(guide, "python"))
    for call in ("nav.AVModel(module, adapter=SalmonnStyleAdapter", "nav.testing.check_adapter(model)",
                 "model.trace(ex)", "attention_call", "model.generate(ex"):
        assert call in runnable


# -- the analyses run unchanged on the new architectures ----------------------------------------------
@pytest.mark.parametrize("fixture", ["qwen3", "salmonn"])
def test_analyses_run_unchanged(fixture, request):
    from analyses import sink_analysis
    from analyses.asd import asd_generate
    from analyses.decoding import greedy_generate

    model = request.getfixturevalue(fixture)
    ex = model.prepare(video=frames(2.0, 2, 64), audio=tone(2.0), text="Describe what you see and hear")
    # Random weights have no massive activations: plant the sink test (two dims, tau 0: every token passes).
    sinks, mds = sink_analysis(model, ex, dims=[0, 1], tau=0.0, progress=False)
    media = set(ex.spans.media.tolist())
    assert set(sinks.positions.tolist()) <= media and len(sinks.positions) > 0
    values = mds.mds[~torch.isnan(mds.mds)]
    assert bool(((values >= -1) & (values <= 1)).all())
    # The analyses' own KV-cache decoder must agree with the model's generate (rope, merging, cache).
    greedy = greedy_generate(model, ex, max_new_tokens=3)
    with torch.no_grad(), model.generate(ex, max_new_tokens=3, do_sample=False) as tracer:
        ids = tracer.result.save()
    assert greedy.token_ids == ids[0, len(ex):].tolist()[:len(greedy.token_ids)]
    guided = asd_generate(model, ex, max_new_tokens=2)
    assert guided.num_new_tokens >= 1 and set(guided.sinks) >= {"av", "va", "aa", "vv"}
