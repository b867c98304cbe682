"""Ablation, answer-letter probabilities and the av / a / v dominance test."""

import json

import nnsight
import numpy as np
import pytest
import torch

import nnsight_av as nav
from analyses import (EncoderAblatedInputs, ablate, causal_trace, clip_dominance, dominance, dominance_label,
                      option_probs, option_token_ids, read_dataset)
from analyses.ablation import check_same_layout
from nnsight_av.errors import InputError, SpanError, TokenSelectionError
from nnsight_av.inputs import MediaRequest

from test_tracing import OPTIONS, sharpen


#: Tiny models run ~10x faster on one intra-op thread when the CPU is shared (conftest `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp():
    return sharpen(nav.testing.tiny_model(seed=0))


@pytest.fixture(scope="module")
def clip(sharp):
    return sharp.prepare(video=nav.testing.synthetic_frames(4.0, 2, 64), audio=nav.testing.synthetic_tone(4.0),
                         text="What is making the sound?")


def manual_probs(model, ex, edit=None):
    """Letter probabilities from a plain trace: softmax at the last position, max over "X" / " X"."""
    with torch.no_grad(), model.trace(ex):
        if edit is not None:
            edit(model)
        logits = nnsight.save(model.logits[0, -1])
    probs = torch.softmax(logits.float(), -1)
    tok = model.tokenizer
    return torch.tensor([max(float(probs[tok.encode(o, add_special_tokens=False)[0]]),
                             float(probs[tok.encode(" " + o, add_special_tokens=False)[0]])) for o in OPTIONS])


def test_raw_ablation_keeps_the_layout_and_zeroes_the_media(sharp, clip):
    no_audio, no_video = ablate(clip, "audio", sharp), ablate(clip, "video", sharp)
    for out in (no_audio, no_video):
        assert torch.equal(out.input_ids, clip.input_ids)
        assert out.prompt_text == clip.prompt_text                     # same prompt text in every run
        assert out.spans.video.tolist() == clip.spans.video.tolist()
    assert not no_audio.request.audio.any() and no_audio.request.audio.shape == clip.request.audio.shape
    assert not no_video.request.video.any() and no_video.request.video.dtype == np.uint8
    assert np.array_equal(no_audio.request.video, clip.request.video)
    assert not torch.allclose(no_audio.data["input_features"], clip.data["input_features"])
    both = ablate(clip, ["audio", "video"], sharp)
    assert not both.request.audio.any() and not both.request.video.any()
    media = ablate({"video": clip.request.video, "audio": clip.request.audio}, "video")
    assert not media["video"].any() and media["audio"] is not None and media["audio"].any()
    request = ablate(clip.request, "audio")
    assert isinstance(request, MediaRequest) and not request.audio.any()


def test_encoder_ablation_zeroes_the_modality_embeddings(sharp, clip):
    for name in ("audio", "video"):
        zeroed = ablate(clip, name, method="encoder")
        assert isinstance(zeroed, EncoderAblatedInputs) and zeroed.zeroed == (name,)
        positions = getattr(clip.spans, name)

        def zero_inputs(model, positions=positions):
            model.layers[0].input[:, positions] = 0

        assert torch.allclose(option_probs(sharp, zeroed, OPTIONS), manual_probs(sharp, clip, zero_inputs),
                              atol=1e-6)
    # in a batch, each input's share of the packed encoder output is zeroed, not the others'
    batch = [clip, ablate(clip, "video", method="encoder"), ablate(clip, "audio", method="encoder")]
    assert torch.allclose(option_probs(sharp, batch, OPTIONS),
                          torch.stack([option_probs(sharp, x, OPTIONS) for x in batch]), atol=1e-6)


def test_encoder_ablated_corrupt_in_causal_tracing(sharp, clip):
    corrupt = ablate(clip, "video", method="encoder")
    sets = {"late": clip.spans.audio[50:]}
    exact = causal_trace(sharp, clip, corrupt, OPTIONS, token_sets=sets, layers=[1, 2], progress=False)
    naive = causal_trace(sharp, clip, corrupt, OPTIONS, token_sets=sets, layers=[1, 2], method="naive",
                         progress=False)
    assert exact.clips["clip"]["dominant"] == "video"
    assert exact.effects.ie_clean.iloc[0] == pytest.approx(naive.effects.ie_clean.iloc[0], abs=1e-5)
    assert exact.clips["clip"]["P_corrupt"] == pytest.approx(option_probs(sharp, corrupt, OPTIONS).tolist(), abs=1e-6)


def test_ablation_errors(sharp, clip):
    with pytest.raises(InputError, match="model="):
        ablate(clip, "audio")
    with pytest.raises(InputError, match="modality"):
        ablate(clip, "text", sharp)
    with pytest.raises(InputError, match="method"):
        ablate(clip, "audio", sharp, method="noise")
    silent = sharp.prepare(video=nav.testing.synthetic_frames(2.0, 2, 64), use_audio_in_video=False,
                           text="What is making the sound?")
    with pytest.raises(InputError, match="no audio"):
        ablate(silent, "audio", sharp)
    with pytest.raises(InputError, match="no 'audio'"):
        ablate({"video": clip.request.video}, "audio")
    other = sharp.prepare(video=nav.testing.synthetic_frames(2.0, 2, 64), audio=nav.testing.synthetic_tone(2.0),
                          text="What is making the sound?")
    with pytest.raises(SpanError, match="token layouts"):
        check_same_layout(clip, other)


def test_option_probs_matches_a_plain_softmax(sharp, clip):
    assert torch.allclose(option_probs(sharp, clip, OPTIONS), manual_probs(sharp, clip), atol=1e-6)
    short = sharp.prepare(video=nav.testing.synthetic_frames(2.0, 2, 64), audio=nav.testing.synthetic_tone(2.0),
                          text="What is making the sound?")
    batched = option_probs(sharp, [short, clip, short], OPTIONS, batch_size=3)   # right padding
    assert batched.shape == (3, 4)
    assert torch.allclose(batched[0], manual_probs(sharp, short), atol=1e-5)
    assert torch.allclose(batched[1], manual_probs(sharp, clip), atol=1e-5)
    assert torch.allclose(option_probs(sharp, clip, {"A": "dog", "B": "cat", "C": "car", "D": "bird"}),
                          manual_probs(sharp, clip), atol=1e-6)
    ids = option_token_ids(sharp.tokenizer, OPTIONS)
    assert all(len(v) == 2 for v in ids)                             # "A" and " A" are distinct single tokens


def test_option_probs_errors(sharp, clip):
    with pytest.raises(TokenSelectionError, match="single token"):
        option_probs(sharp, clip, ["A", "B", "dog"])
    with pytest.raises(InputError, match="repeat"):
        option_probs(sharp, clip, ["A", "A"])
    with pytest.raises(InputError):
        option_probs(sharp, "not an input", OPTIONS)


def test_dominance_rule():
    assert dominance_label({"av": "A", "a": "A", "v": "B"}) == "audio"
    assert dominance_label({"av": "A", "a": "B", "v": "A"}) == "video"
    assert dominance_label({"av": "A", "a": "A", "v": "A"}) == "neither"
    assert dominance_label({"av": "A", "a": "B", "v": "C"}) == "neither"
    assert dominance_label({"av": "A", "a": "A", "v": "B"}, label="A", correctness=True) == "audio"
    assert dominance_label({"av": "A", "a": "A", "v": "B"}, label="B", correctness=True) == "neither"
    assert dominance_label({"av": "A", "a": "A", "v": "B"}, label="B") == "audio"     # the switch is off by default
    with pytest.raises(InputError):
        dominance_label({"av": "A", "a": "A"})
    with pytest.raises(InputError, match="label"):
        dominance_label({"av": "A", "a": "A", "v": "B"}, correctness=True)


def test_dominance_over_a_dataset(sharp, tmp_path):
    records = []
    for i in range(2):
        np.save(tmp_path / f"v{i}.npy", nav.testing.synthetic_frames(4.0, 2, 64, seed=i))
        np.save(tmp_path / f"a{i}.npy", nav.testing.synthetic_tone(4.0, freq=220.0 * (i + 1)))
        records.append({"id": f"c{i}", "video": f"v{i}.npy", "audio": f"a{i}.npy", "fps": 2,
                        "question": "What is making the sound?", "options": ["dog", "cat", "car", "bird"],
                        "label": ["dog", "cat"][i]})
    records.append({"id": "broken", "video": "nowhere.mp4", "prompt": "Which?", "options": OPTIONS})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "dominance.jsonl"
    res = dominance(sharp, path, out=out, progress=False)
    assert [r["id"] for r in res.records] == ["c0", "c1", "broken"]
    assert res.records[-1]["status"] == "error" and "nowhere.mp4" in res.records[-1]["error"]
    assert res.counts()["error"] == 1
    clips = read_dataset(path)
    for record, clip in zip(res.records[:2], clips[:2]):
        clean = clip.prepare(sharp)
        expected = option_probs(sharp, [clean, ablate(clean, "video", sharp), ablate(clean, "audio", sharp)], OPTIONS)
        answers = dict(zip(("av", "a", "v"), (OPTIONS[int(p.argmax())] for p in expected)))
        assert record["answers"] == answers
        assert record["dominance"] == dominance_label(answers)
        assert record["probs"]["a"] == pytest.approx(expected[1].tolist(), abs=1e-6)
        assert record["correct"]["av"] == (answers["av"] == clip.label)
    assert {r["dominance"] for r in res.records[:2]} <= {"audio", "video", "neither"}
    assert len([l for l in out.read_text().splitlines() if l]) == 3
    assert res.frame.loc["c0", "answer_av"] == res.records[0]["answers"]["av"]
    strict = dominance(sharp, path, correctness=True, progress=False)
    for loose, tight in zip(res.records[:2], strict.records[:2]):
        assert tight["dominance"] == (loose["dominance"] if loose["answers"]["av"] == loose["label"] else "neither")
    again = dominance(sharp, path, out=out, progress=False)                  # resumes: nothing recomputed
    assert again.records == res.records
    single = clip_dominance(sharp, clips[0].prepare(sharp), OPTIONS)
    assert single["answers"] == res.records[0]["answers"]
