"""M-RoPE position ids computed once per prepared input (issue 17, item 1).

Every layout is checked for exact equality (values, dtype, padding fill, rope_deltas)
with the thinker's own ``get_rope_index``; then that no forward the library makes calls
it again, and that the cached ids change no logits and no generated token.
"""

import nnsight
import numpy as np
import pytest
import torch

import nnsight_av as nav
from nnsight_av.adapters.mrope import collate_positions, decode_positions
from nnsight_av.testing import synthetic_frames as frames
from nnsight_av.testing import synthetic_tone as tone

MODELS = {"qwen2_5_omni": 56, "qwen3_omni_moe": 64}          # model type -> frame size of the tiny processor
IMAGE = np.random.default_rng(0).integers(0, 255, (80, 60, 3)).astype(np.uint8)


def layouts(size: int) -> dict[str, dict]:
    return {
        "audio_in_video": dict(video=frames(4.0, 2, size), audio=tone(4.0), text="What is making the sound?"),
        "audio_in_video_long": dict(video=frames(6.0, 2, size * 2, seed=1), audio=tone(5.0), text="Describe it"),
        "audio_in_video_fps3": dict(video=frames(4.0, 3, size), audio=tone(4.0), text="x", fps=3.0),
        # 4 s per temporal patch: rope times jump past a chunk boundary (transformers' one-step chunk rule).
        "audio_in_video_fps05": dict(video=frames(16.0, 0.5, size), audio=tone(15.0), text="x", fps=0.5),
        "audio_outlasts_video": dict(video=frames(2.0, 2, size), audio=tone(5.0), text="x"),
        # Qwen2.5: the last chunk piece (audio) ends below the video's largest time, so the text after
        # the block starts below the global maximum (rope_deltas and generate's last + 1 then differ).
        "video_outlasts_audio": dict(video=frames(4.0, 2, size), audio=tone(2.4), text="x"),
        "audio_only": dict(audio=tone(3.0), text="What is it?"),
        "image": dict(images=[IMAGE], text="Describe"),
        "images_and_audio": dict(images=[IMAGE, IMAGE[:40]], audio=tone(1.0), text="Describe"),
        "video_without_audio": dict(video=frames(4.0, 2, size), text="x", use_audio_in_video=False),
        "video_and_separate_audio": dict(video=frames(4.0, 2, size), audio=tone(3.0), text="x",
                                         use_audio_in_video=False),
        "text_only": dict(text="What is making the sound?"),
    }


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return nav.testing.tiny_model(request.param, seed=0)


@pytest.fixture(scope="module")
def prepared(model):
    size = MODELS["qwen3_omni_moe" if model.adapter.name == "qwen3_omni" else "qwen2_5_omni"]
    return {name: model.prepare(**kw) for name, kw in layouts(size).items()}


def uncached(data):
    return {k: v for k, v in data.items() if k != "position_ids"}


def reference(model, data):
    """The thinker's own rope index, called as its forward calls it."""
    mask = data.get("feature_attention_mask")
    return model._module.get_rope_index(
        data["input_ids"], data.get("image_grid_thw"), data.get("video_grid_thw"), data.get("attention_mask"),
        bool(data.get("use_audio_in_video") or False), mask.sum(-1) if mask is not None else None,
        data.get("video_second_per_grid"))


def assert_identical(ours, theirs):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (ours.dtype, theirs.dtype, ours.shape)
    assert torch.equal(ours, theirs), f"{(ours != theirs).nonzero()[:5].tolist()}"


@pytest.mark.parametrize("layout", list(layouts(56)))
def test_cached_positions_equal_get_rope_index(model, prepared, layout):
    ex = prepared[layout]
    positions, deltas = reference(model, uncached(ex.data))
    assert_identical(ex.position_ids, positions)
    assert_identical(ex.rope_deltas, deltas)
    again, again_deltas = model.adapter.position_ids(uncached(ex.data))
    assert_identical(again, positions)
    assert_identical(again_deltas, deltas)


def test_qwen3_fractional_rope_times_stay_float32(model, prepared):
    ex = prepared["audio_in_video_fps3"]
    moved = ex.to("cpu", torch.bfloat16)
    assert moved.data["input_features"].dtype == torch.bfloat16
    assert moved.position_ids.dtype == ex.position_ids.dtype and torch.equal(moved.position_ids, ex.position_ids)
    if model.adapter.name == "qwen3_omni":
        # fps 3 puts patches at 2/3 s * 13: fractional times that bf16 would destroy.
        assert bool((ex.position_ids != ex.position_ids.round()).any())


BATCHES = {
    "clips_of_different_lengths": ["audio_in_video", "audio_in_video_long", "audio_outlasts_video"],
    "clip_image_and_text": ["audio_in_video_long", "images_and_audio", "text_only"],
    "audio_and_text_only": ["audio_only", "text_only"],               # transformers' text-only branch
    "video_without_audio": ["video_without_audio", "video_and_separate_audio", "image"],
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_batched_positions_equal_get_rope_index(model, prepared, batch, side):
    items = [prepared[name] for name in BATCHES[batch]]
    flags = {ex.use_audio_in_video for ex in items}
    if len(flags) > 1:
        items = [ex for ex in items if not ex.use_audio_in_video]
    data = model.adapter.collate([ex.data for ex in items], padding_side=side, pad_id=0)
    assert {int(ex.data["input_ids"].shape[1]) for ex in items} != {data["input_ids"].shape[1]} or len(items) == 1
    positions, deltas = reference(model, uncached(data))
    assert_identical(data["position_ids"], positions)
    multimodal = any(k in data for k in ("image_grid_thw", "video_grid_thw"))
    ours, our_deltas = collate_positions(model.adapter.rope_config(), [ex.position_ids for ex in items], side,
                                         multimodal)
    assert_identical(ours, positions)
    assert_identical(our_deltas, deltas)


def test_collate_drops_positions_when_an_item_has_none(model, prepared):
    a, b = prepared["audio_in_video"], prepared["audio_in_video_long"]
    data = model.adapter.collate([a.data, uncached(b.data)], padding_side="right", pad_id=0)
    assert "position_ids" not in data                    # the model computes them itself, still correctly


class RopeCalls:
    """Counts calls of the thinker's ``get_rope_index`` (an instance attribute shadows the method)."""

    def __init__(self, module):
        self.module, self.calls = module, 0
        self.original = module.get_rope_index

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        self.module.get_rope_index = counted
        return self

    def __exit__(self, *exc):
        del self.module.get_rope_index


def test_no_forward_recomputes_the_rope_index(model, prepared):
    from analyses.attention import run_prefill
    from analyses.decoding import greedy_generate

    ex, other = prepared["audio_in_video"], prepared["audio_in_video_long"]
    with RopeCalls(model._module) as counter:
        with torch.no_grad(), model.trace(uncached(ex.data)):
            model.logits.save()
        assert counter.calls == 1                        # the counter sees the model's own computation
        counter.calls = 0
        with torch.no_grad(), model.trace(ex):
            model.logits.save()
        with torch.no_grad(), model.trace() as tracer:
            for item in (ex, other):
                with tracer.invoke(item):
                    pass
        run_prefill(model, [ex, other], residual_layers=[1], on_residual=lambda layer, h: h.sum())
        with torch.no_grad(), model.generate(ex, max_new_tokens=3, do_sample=False) as tracer:
            tracer.result.save()
        with torch.no_grad(), model.generate(max_new_tokens=3, do_sample=False) as tracer:
            for item in (ex, other):
                with tracer.invoke(item):
                    pass
        greedy_generate(model, ex, max_new_tokens=3)
        assert counter.calls == 0


@pytest.mark.parametrize("layout", ["audio_in_video", "image", "text_only"])
def test_cached_positions_give_the_same_logits(model, prepared, layout):
    ex = prepared[layout]
    with torch.no_grad(), model.trace(ex):
        cached = model.logits.save()
    with torch.no_grad(), model.trace(uncached(ex.data)):
        own = model.logits.save()
    assert torch.equal(cached, own)


def test_batched_trace_with_cached_positions_gives_the_same_logits(model, prepared):
    items = [prepared["audio_in_video_long"], prepared["audio_in_video"]]
    with torch.no_grad(), model.trace() as tracer:
        saved = nnsight.save([])
        for item in items:
            with tracer.invoke(item):
                saved.append(model.logits)
    with torch.no_grad():
        own = model._module(**model.adapter.collate([uncached(ex.data) for ex in items], "right", 0)).logits
    n = len(items[1])
    assert torch.equal(saved[0], own[:1]) and torch.equal(saved[1][:, :n], own[1:, :n])


def test_generation_with_cached_positions_equals_the_models_own(model, prepared):
    items = [prepared["audio_in_video"], prepared["audio_in_video_long"], prepared["video_outlasts_audio"]]
    pad = model.tokenizer.pad_token_id
    for batch in ([items[0]], [items[2]], items):
        data = model.adapter.collate([ex.data for ex in batch], "left", pad) if len(batch) > 1 else dict(batch[0].data)
        with torch.no_grad():
            own = model._module.generate(**uncached(data), max_new_tokens=5, do_sample=False)
        with torch.no_grad(), model.generate(max_new_tokens=5, do_sample=False) as tracer:
            for ex in batch:
                with tracer.invoke(ex):
                    pass
            with tracer.invoke():
                ours = tracer.result.save()
        assert torch.equal(ours, own)


@pytest.mark.parametrize("layout", ["audio_in_video_long", "video_outlasts_audio"])
def test_decoding_continues_from_the_largest_position(model, prepared, layout):
    from analyses.decoding import Decoder

    ex = prepared[layout]
    largest = ex.position_ids.max()
    assert float(ex.rope_deltas) == float(largest + 1 - len(ex))
    mask = torch.ones(1, len(ex) + 2, dtype=torch.long)
    nxt = decode_positions(ex.rope_deltas, mask, count=2)
    assert nxt.shape == (3, 1, 2) and nxt[:, 0, 0].tolist() == [largest + 1] * 3 and nxt[0, 0, 1] == largest + 2
    # The analyses' decoder places generated tokens the same way.
    decoder = Decoder(model)
    with torch.no_grad():
        prefill = decoder.prefill(decoder.data(ex))
    assert torch.equal(prefill.positions, ex.position_ids)
    assert torch.equal(decoder.positions(prefill, 0, 2, batch=1), nxt.to(decoder.positions(prefill, 0, 2, 1).dtype))


def test_salmonn_style_keeps_its_plain_positions():
    model = nav.testing.tiny_model("salmonn_style", seed=0)
    ex = model.prepare(audio=tone(1.0), text="What is it?")
    assert ex.position_ids is None and ex.rope_deltas is None
    assert "position_ids" not in model.adapter.collate([ex.data, ex.data], "right", 0)


def test_edited_input_ids_with_stale_positions_are_refused(model, prepared):
    data = dict(prepared["audio_in_video"].data)
    data["input_ids"] = torch.cat([data["input_ids"], data["input_ids"][:, -1:]], 1)
    data["attention_mask"] = torch.cat([data["attention_mask"], data["attention_mask"][:, -1:]], 1)
    with pytest.raises(nav.InputError, match="position_ids cover"):
        with torch.no_grad(), model.trace(data):
            model.logits.save()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_type", list(MODELS))
def test_gpu_rope_positions_and_forwards(model_type):
    model = nav.testing.tiny_model(model_type, seed=0)
    model._module.to("cuda")
    size = MODELS[model_type]
    ex = model.prepare(**layouts(size)["audio_in_video_long"]).to("cuda")
    assert ex.position_ids.device.type == "cuda"
    # Data already on the device: the index reads its layout back once and answers on the device.
    positions, deltas = model.adapter.position_ids(uncached(ex.data))
    ref_positions, ref_deltas = reference(model, uncached(ex.data))
    assert positions.device.type == "cuda"
    assert_identical(positions, ref_positions)
    assert_identical(deltas, ref_deltas)
    with RopeCalls(model._module) as counter:
        with torch.no_grad(), model.trace(ex):
            cached = model.logits.save()
        with torch.no_grad(), model.generate(ex, max_new_tokens=3, do_sample=False) as tracer:
            tokens = tracer.result.save()
        assert counter.calls == 0
    with torch.no_grad(), model.trace(uncached(ex.data)):
        own = model.logits.save()
    with torch.no_grad():
        own_tokens = model._module.generate(**uncached(ex.data), max_new_tokens=3, do_sample=False)
    assert torch.equal(cached, own) and torch.equal(tokens, own_tokens)
