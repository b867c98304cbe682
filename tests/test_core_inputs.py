"""prepare(): media decoding, chat template, spans and their agreement with the encoders."""

import numpy as np
import pytest
import torch

import nnsight_av as nav
from nnsight_av.spans import chunk_bounds


def test_hand_computed_interleaved_layout(tiny):
    # 4 s at 2 fps, 56x56: 4 temporal patches of 2x2 merged tokens, 1 s each (25 rope units);
    # audio 4 s -> 400 mel frames -> 100 tokens; chunks of 50 rope units = 2 s.
    ex = tiny.prepare(video=nav.testing.synthetic_frames(4.0, 2, 56), audio=nav.testing.synthetic_tone(4.0),
                      text="What is making the sound?")
    layout = ex.layout()
    block = "V" * 8 + "A" * 50 + "V" * 8 + "A" * 50
    assert block in layout and layout.count("V") == 16 and layout.count("A") == 100
    start = layout.index(block)
    ids = ex.input_ids[0].tolist()
    vocab = tiny.tokenizer.get_vocab()
    assert ids[start - 2] == vocab["<|vision_bos|>"] and ids[start - 1] == vocab["<|audio_bos|>"]
    assert ids[start + len(block)] == vocab["<|audio_eos|>"]
    chunks = ex.spans.chunks
    assert [len(c.video) for c in chunks] == [8, 8] and [len(c.audio) for c in chunks] == [50, 50]
    assert chunks[0].video.tolist() == list(range(start, start + 8))
    assert chunks[0].audio.tolist() == list(range(start + 8, start + 58))
    assert chunks[1].video.tolist() == list(range(start + 58, start + 66))
    assert ex.spans.get("chunk1.audio").tolist() == list(range(start + 66, start + 116))
    assert tiny.tokenizer.decode(ex.input_ids[0][ex.spans.prompt]) == "What is making the sound?"
    assert tiny.tokenizer.decode(ex.input_ids[0][ex.spans.system]) == "You are a helpful assistant."


def test_chunks_follow_rope_time_order(tiny, av_example):
    # The model's rope index gives each chunk's video tokens earlier temporal positions than the next chunk's.
    with torch.no_grad():
        pos, _ = tiny._module.get_rope_index(
            av_example.data["input_ids"], None, av_example.data["video_grid_thw"], av_example.data["attention_mask"],
            True, av_example.data["feature_attention_mask"].sum(-1), av_example.data["video_second_per_grid"])
    temporal = pos[0, 0]
    chunks = av_example.spans.chunks
    for before, after in zip(chunks, chunks[1:]):
        assert temporal[before.video].max() < temporal[after.video].min()
        assert temporal[before.audio].max() < temporal[after.audio].min()


def test_span_counts_equal_encoder_outputs(tiny, av_example_long):
    ex = av_example_long
    with torch.no_grad(), tiny.trace(ex):
        audio = tiny.audio_encoder.output.last_hidden_state.save()
        video = tiny.vision_encoder.output.pooler_output.save()
    assert audio.shape[0] == len(ex.spans.audio)
    assert video.shape[0] == len(ex.spans.video)


def test_image_and_separate_audio_spans(tiny, tmp_path):
    png = nav.testing.write_png(tmp_path / "frame.png", size=56)
    ex = tiny.prepare(images=[png], audio=nav.testing.synthetic_tone(2.0), text="Describe")
    assert len(ex.spans.image) == 4 and len(ex.spans.audio) == 50 and len(ex.spans.video) == 0
    with torch.no_grad(), tiny.trace(ex):
        image = tiny.vision_encoder.output.pooler_output.save()
        logits = tiny.logits.save()
    assert image.shape[0] == 4 and logits.shape[1] == len(ex)


def test_chunk_bounds_rule():
    assert chunk_bounds([0, 0, 25, 25, 50, 50, 75, 75], 50) == [(0, 4), (4, 8)]
    assert chunk_bounds(list(range(120)), 50) == [(0, 50), (50, 100), (100, 120)]


def test_real_mp4_goes_through_prepare_to_a_trace(tiny, tmp_path):
    path = nav.testing.write_mp4(tmp_path / "clip.mp4", seconds=4.0, fps=8, size=64, freq=440.0)
    ex = tiny.prepare(video=path, text="What is making the sound?")
    assert ex.request.source["video"] == str(path)
    assert abs(len(ex.request.audio) / 16000 - 4.0) < 0.2
    assert ex.request.video.shape[0] == 8  # 4 s at 2 fps
    assert len(ex.spans.audio) > 90 and len(ex.spans.video) == 16
    with torch.no_grad(), tiny.trace(ex):
        logits = tiny.logits.save()
    assert logits.shape == (1, len(ex), len(tiny.tokenizer))
    # the decoded track is the tone we wrote: its dominant frequency is 440 Hz
    spectrum = np.abs(np.fft.rfft(ex.request.audio))
    assert abs(np.argmax(spectrum) * 16000 / len(ex.request.audio) - 440.0) < 5.0


def test_wav_path_and_resampled_array(tiny, tmp_path):
    wav = nav.testing.write_wav(tmp_path / "tone.wav", seconds=2.0, rate=8000)
    from_file = tiny.prepare(audio=wav, text="x")
    from_array = tiny.prepare(audio=nav.testing.synthetic_tone(2.0, rate=8000), audio_rate=8000, text="x")
    assert len(from_file.spans.audio) == len(from_array.spans.audio) == 50


def test_errors_name_the_problem(tiny, tmp_path):
    silent = nav.testing.write_mp4(tmp_path / "silent.mp4", seconds=2.0, with_audio=False)
    with pytest.raises(nav.MissingAudioError, match="no audio track"):
        tiny.prepare(video=silent, text="x")
    ok = tiny.prepare(video=silent, text="x", use_audio_in_video=False)
    assert len(ok.spans.audio) == 0 and len(ok.spans.video) > 0
    with pytest.raises(nav.InputError, match="empty"):
        tiny.prepare(text="   ")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01 this is not a video" * 10)
    with pytest.raises(nav.MediaError, match="corrupt.mp4"):
        tiny.prepare(video=corrupt, text="x")
    with pytest.raises(nav.MediaError, match="not found"):
        tiny.prepare(video=tmp_path / "missing.mp4", text="x")
    with pytest.raises(nav.InputError, match="frames"):
        tiny.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), text="x")


def test_unknown_span_and_chunk_errors(av_example):
    with pytest.raises(nav.TokenSelectionError, match="unknown span"):
        av_example.spans.get("smell")
    with pytest.raises(nav.TokenSelectionError, match="2 chunks"):
        av_example.spans.get("chunk7.video")


def test_spans_shift_moves_every_position(av_example):
    moved = av_example.spans.shift(3)
    assert torch.equal(moved.video, av_example.spans.video + 3)
    assert torch.equal(moved.chunks[1].audio, av_example.spans.chunks[1].audio + 3)
    assert moved.length == av_example.spans.length + 3


def test_system_turn_is_found_by_its_role_not_its_position(tiny):
    from nnsight_av.spans import turn_spans

    tokens = tiny.adapter.layout_tokens()
    assert tokens.system_role is not None and tokens.user_role is not None

    def render(conversation):
        return tiny.tokenizer(tiny.render_chat(conversation), add_special_tokens=False).input_ids

    text = lambda t: [{"type": "text", "text": t}]  # noqa: E731
    # a multi-turn chat without a system message: the first (user) turn must not be read as the system
    ids = render([{"role": "user", "content": text("hello")}, {"role": "assistant", "content": text("hi")},
                  {"role": "user", "content": text("What is making the sound?")}])
    system, prompt, _ = turn_spans(ids, tokens, media=())
    assert system == []
    assert tiny.tokenizer.decode([ids[p] for p in prompt]) == "What is making the sound?"
    ids = render([{"role": "system", "content": text("Be brief.")}, {"role": "user", "content": text("hello")}])
    system, prompt, _ = turn_spans(ids, tokens, media=())
    assert tiny.tokenizer.decode([ids[p] for p in system]) == "Be brief."
    assert tiny.tokenizer.decode([ids[p] for p in prompt]) == "hello"


def test_video_pixel_cap_is_chosen_explicitly_and_silences_transformers(tiny, monkeypatch):
    import logging

    from nnsight_av.inputs import VIDEO_PIXEL_CAP

    video_processor = tiny.processor.video_processor
    if not hasattr(type(video_processor), "cap_pixels_per_frame"):
        pytest.skip("this transformers has no cap_pixels_per_frame")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(type(video_processor).__module__)
    logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # the warning is printed once per process
    try:
        frames, tone = nav.testing.synthetic_frames(2.0, 2, 112), nav.testing.synthetic_tone(2.0)
        default = tiny.prepare(video=frames, audio=tone, text="x")
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "cap_pixels_per_frame" in r.getMessage()]
    # The cap bounds a video's total pixels by max_video_tokens; shrink that bound to see it act:
    # 4 frames of 112 x 112 -> 84 x 84 (9 tokens per 2 frames) instead of 16.
    monkeypatch.setattr(video_processor, "max_video_tokens", 20)
    capped = tiny.prepare(video=frames, audio=tone, text="x")
    assert VIDEO_PIXEL_CAP is True and len(default.spans.video) == 32 and len(capped.spans.video) == 18
    monkeypatch.setattr(video_processor, "cap_pixels_per_frame", False)  # a user's own choice is kept
    assert len(tiny.prepare(video=frames, audio=tone, text="x").spans.video) == 32
