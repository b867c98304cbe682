"""The toy world generator and the shipped toy-omni model."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

import nnsight_av as nav
from nnsight_av import toy
from nnsight_av.errors import InputError, UnknownModelError

# Seeds 1-3 drew the training, validation and test clips of scripts/train_toy.py: use others here.
HELD_OUT_SEED = 12345


# -- generator ---------------------------------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed():
    first = toy.make_dataset(5, seed=7)
    second = toy.make_dataset(5, seed=7)
    other = toy.make_dataset(5, seed=8)
    for a, b in zip(first, second):
        assert a.to_dict() == b.to_dict()
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    assert [r.to_dict() for r in first] != [r.to_dict() for r in other]
    assert not np.array_equal(first[0].audio, other[0].audio)


def test_same_clip_index_gives_the_same_clip_for_both_tasks():
    mc, caption = toy.make_dataset(3, seed=4, task="mc"), toy.make_dataset(3, seed=4, task="caption")
    for a, b in zip(mc, caption):
        assert a.entity == b.entity and np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
        assert a.prompt != b.prompt and b.options == [] and b.answer == ""


def test_media_shapes_and_ranges():
    record = toy.make_dataset(1, seed=0)[0]
    assert record.frames.shape == (int(toy.SECONDS * toy.FPS), toy.FRAME_SIZE, toy.FRAME_SIZE, 3)
    assert record.frames.dtype == np.uint8
    assert record.audio.shape == (int(toy.SECONDS * toy.SAMPLE_RATE),) and record.audio.dtype == np.float32
    assert np.abs(record.audio).max() <= 1.0 and np.abs(record.audio).max() > 0.1
    # The shape moves: the frames are not all equal.
    assert np.abs(record.frames[0].astype(int) - record.frames[-1].astype(int)).sum() > 0


@pytest.mark.parametrize("n", [10, 23, 37])
def test_classes_are_balanced(n):
    counts = Counter(r.entity for r in toy.make_dataset(n, seed=3, keep_arrays=False, distractor=False))
    assert set(counts) <= set(toy.ENTITY_NAMES)
    assert sum(counts.values()) == n
    expected = {n // 10, n // 10 + (n % 10 > 0)}
    assert set(counts.values()) <= expected and len(counts) == min(n, 10)


def test_modality_groups_follow_the_table():
    looks, sounds = defaultdict(list), defaultdict(list)
    for item in toy.ENTITIES:
        looks[(item.colour, item.shape)].append(item.name)
        sounds[item.sound].append(item.name)
    for item in toy.ENTITIES:
        shared_look = len(looks[(item.colour, item.shape)]) > 1
        shared_sound = len(sounds[item.sound]) > 1
        expected = "audio" if shared_look else "video" if shared_sound else "both"
        assert not (shared_look and shared_sound)
        assert item.identified_by == expected, item.name
    groups = Counter(item.identified_by for item in toy.ENTITIES)
    assert groups["audio"] >= 2 and groups["video"] >= 2 and groups["both"] >= 1


def test_same_look_entities_are_visually_identical_and_acoustically_different():
    pairs = [(a.name, b.name) for a in toy.ENTITIES for b in toy.ENTITIES
             if a.name < b.name and (a.colour, a.shape) == (b.colour, b.shape)]
    assert pairs
    for a, b in pairs:
        for seed in (0, 11):
            frames_a, audio_a, _ = toy.make_clip(a, seed)
            frames_b, audio_b, _ = toy.make_clip(b, seed)
            assert np.array_equal(frames_a, frames_b)
            # Different sounds: their magnitude spectra differ clearly, not just by a little noise.
            spec_a, spec_b = np.abs(np.fft.rfft(audio_a)), np.abs(np.fft.rfft(audio_b))
            assert np.abs(spec_a - spec_b).sum() > 0.5 * np.abs(spec_a).sum()


def test_same_sound_entities_are_acoustically_identical_and_visually_different():
    pairs = [(a.name, b.name) for a in toy.ENTITIES for b in toy.ENTITIES if a.name < b.name and a.sound == b.sound]
    assert pairs
    for a, b in pairs:
        for seed in (0, 11):
            frames_a, audio_a, _ = toy.make_clip(a, seed)
            frames_b, audio_b, _ = toy.make_clip(b, seed)
            assert np.array_equal(audio_a, audio_b)
            assert (frames_a != frames_b).any(axis=-1).sum() > 100  # many pixels differ


def test_the_moving_shape_has_its_entitys_colour():
    for name in ("bell", "drum", "box", "clock"):
        frames, _, _ = toy.make_clip(name, 5, distractor=False)
        target = np.asarray(toy.COLOURS[toy.entity(name).colour])
        close = (np.abs(frames.astype(int) - target).max(-1) <= 15).sum(axis=(1, 2))
        assert (close > 100).all(), name  # every frame shows a blob of that colour


def test_prompts_answers_captions_and_objects():
    records = toy.make_dataset(12, seed=9)
    for r in records:
        assert r.prompt == toy.mc_prompt()
        assert f"\n{r.answer}. {r.entity}\n" in r.prompt
        assert r.options[r.label] == r.entity
        assert toy.caption_objects(r.caption) == r.objects
        parsed = toy.parse_caption(r.caption)
        assert parsed["heard"] == [r.entity] and parsed["seen"][0] == (r.colour, r.shape)
        assert [s for _, s in parsed["seen"][1:]] == ([r.distractor] if r.distractor else [])
    assert {r.distractor is None for r in toy.make_dataset(40, seed=1, keep_arrays=False)} == {True, False}
    caption = toy.make_dataset(2, seed=9, task="caption")[0]
    assert caption.prompt == toy.CAPTION_PROMPT


def test_bad_input_raises_clear_errors():
    with pytest.raises(InputError, match="unknown toy entity"):
        toy.make_clip("unicorn", 0)
    with pytest.raises(InputError, match="task must be"):
        toy.make_dataset(2, task="vqa")
    with pytest.raises(InputError, match="positive"):
        toy.make_dataset(0)
    with pytest.raises(InputError, match="distractor"):
        toy.make_clip("bell", 0, distractor="hexagon")
    with pytest.raises(InputError, match="ablate"):
        toy.make_dataset(1)[0].prepare(None, ablate="both")


def test_write_and_read_dataset(tmp_path):
    records = toy.make_dataset(2, seed=21)
    path = toy.write_dataset(records, tmp_path)
    back = toy.read_dataset(path)
    assert [r.to_dict() | {"video_path": None, "audio_path": None} for r in back] == \
        [r.to_dict() for r in records]
    for original, loaded in zip(records, back):
        frames, audio = loaded.media()
        assert np.array_equal(audio, original.audio)  # float wav: exact
        assert frames.shape == original.frames.shape
        # H.264 is lossy but close: mean absolute pixel error of a few levels.
        assert np.abs(frames.astype(float) - original.frames.astype(float)).mean() < 6


def test_tokenizer_makes_every_toy_word_one_token():
    tokenizer = toy.toy_tokenizer()
    for word in toy.TOY_WORDS:
        assert len(tokenizer.tokenize(word)) == 1, word
        assert len(tokenizer.tokenize(" " + word)) == 1, word


# -- shipped model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return nav.load("toy-omni")


def test_toy_omni_loads_offline(model, monkeypatch):
    assert isinstance(model, nav.AVModel) and model.checkpoint == "toy-omni"
    assert model.default_system == toy.DEFAULT_SYSTEM
    assert model.tokenizer.get_vocab() == toy.toy_tokenizer().get_vocab()
    assert (toy.ASSET_DIR / "model.safetensors").stat().st_size < 30e6
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = toy.load_toy()
    state, other = model._module.state_dict(), again._module.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)
    with pytest.raises(UnknownModelError, match="no toy model"):
        toy.load_toy(path=toy.ASSET_DIR / "missing")


def _letter_probs(model, ex):
    vocab = model.tokenizer.get_vocab()
    with torch.no_grad(), model.trace(ex):
        logits = model.logits[0, -1].save()
    probs = logits.float().softmax(-1)
    letters = toy.LETTERS[:len(toy.ENTITY_NAMES)]
    return torch.stack([torch.maximum(probs[vocab[x]], probs[vocab["Ġ" + x]]) for x in letters])


def test_toy_omni_answers_held_out_multiple_choice(model):
    records = toy.make_dataset(16, seed=HELD_OUT_SEED)
    ex = records[0].prepare(model)
    assert ex.spans.summary()["video"] == 64 and ex.spans.summary()["audio"] == 100
    correct = [int(_letter_probs(model, r.prepare(model)).argmax()) == r.label for r in records]
    assert sum(correct) >= 15, f"{sum(correct)}/16 correct"


def test_toy_omni_generates_the_letter_and_a_caption(model):
    record = toy.make_dataset(3, seed=HELD_OUT_SEED + 1)[0]
    with model.generate(record.prepare(model), max_new_tokens=3, do_sample=False) as tracer:
        ids = tracer.result.save()
    text = model.tokenizer.decode(ids[0, -3:], skip_special_tokens=True).strip()
    assert text == record.answer
    heard = 0
    captions = toy.make_dataset(4, seed=HELD_OUT_SEED + 2, task="caption")
    for r in captions:
        ex = r.prepare(model)
        with model.generate(ex, max_new_tokens=24, do_sample=False) as tracer:
            ids = tracer.result.save()
        caption = model.tokenizer.decode(ids[0, len(ex):], skip_special_tokens=True)
        heard += toy.parse_caption(caption)["heard"] == [r.entity]
    assert heard >= 3  # chance is 1 in 10 per clip


def test_dominance_rule_finds_audio_and_video_dominant_clips(model):
    """METHOD.md section 4 on the shipped model: av / a (video black) / v (audio silent) answers."""
    letters = torch.tensor([model.tokenizer.get_vocab()[x] for x in toy.LETTERS[:len(toy.ENTITY_NAMES)]])

    def answers(record):
        av, a, v = (record.prepare(model, ablate=ablate) for ablate in (None, "video", "audio"))
        with torch.no_grad(), model.trace() as tracer:  # the three runs batched in one forward
            with tracer.invoke(av):
                l_av = model.logits[0, -1].save()
            with tracer.invoke(a):
                l_a = model.logits[0, -1].save()
            with tracer.invoke(v):
                l_v = model.logits[0, -1].save()
        return [int(logits[letters].argmax()) for logits in (l_av, l_a, l_v)]

    kinds = Counter()
    for group, names in (("audio", ["bell", "horn", "bird", "frog"]), ("video", ["drum", "box", "car", "fan"])):
        for record in toy.make_dataset(4, seed=HELD_OUT_SEED + 3, entities=names):
            av, a, v = answers(record)
            assert av == record.label  # the clean answer is right
            if av == a != v:
                kinds[(group, "audio-dominant")] += 1
            if av == v != a:
                kinds[(group, "video-dominant")] += 1
    assert kinds[("audio", "audio-dominant")] >= 1 and kinds[("video", "video-dominant")] >= 1, kinds
    # A clip identified by sound alone is not video-dominant: its look is shared by design.
    assert kinds[("audio", "video-dominant")] == 0, kinds


def test_toy_omni_answers_from_written_files(model, tmp_path):
    """mp4 (H.264 + AAC) and float wav written by write_dataset decode back to inputs the model gets right."""
    records = toy.read_dataset(toy.write_dataset(toy.make_dataset(3, seed=HELD_OUT_SEED + 4), tmp_path))
    for record in records:
        assert record.frames is None and record.video_path.endswith(".mp4")
        assert int(_letter_probs(model, record.prepare(model)).argmax()) == record.label
