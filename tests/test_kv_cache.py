"""The runtime's partial forwards (`interventions.runtime.kv_cache`) and the modality ablation primitives.

- a recorded run resumed from any layer, for a suffix or for scattered positions, equals the
  full forward at those positions, with interventions mapped to the right rows;
- `zero_modalities` on the hook runtime (what `ablate(..., method="encoder")` now runs) equals
  zeroing the encoder's packed output in an nnsight trace (the old way), on every tiny adapter;
- the raw removal (black frames / silence) is one transform for `ablate` and `blank_modality`.
"""

from __future__ import annotations

import nnsight
import pytest
import torch

import interventions as ivs
import nnsight_av as nav
from analyses import ablate, blank_modality, clip_dominance, encoder_edit, option_probs, option_token_ids
from analyses.options import letter_probs
from interventions.modality import blank_inputs, zero_modalities
from interventions.runtime.hooks import applied, gradients_from, observed
from interventions.runtime.kv_cache import PrefixKV, ScatterKV, pad_rows, recording, resume
from nnsight_av.errors import InputError

#: Tiny models run ~10x faster on one intra-op thread when the CPU is shared (conftest `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")




def full_hidden(model, ex, iv=None):
    """The last decoder layer's output of one plain forward (with ``iv`` on the hook runtime)."""
    out = {}
    last = model.num_layers - 1
    with torch.no_grad(), applied(model, ex, iv), \
            observed(model, "resid_post", [last], lambda layer, value: out.setdefault("h", value.clone())):
        model.raw()(**ex.data, use_cache=False)
    return out["h"]


@pytest.mark.parametrize("model_type", ["qwen2_5_omni", "salmonn_style"])
def test_resumed_runs_equal_the_full_forward(model_type):
    model = nav.testing.tiny_model(model_type, seed=0)
    ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
                       text="What is making the sound?")
    total, layers = len(ex), model.raw("layers")
    # an edit at the last position of the last layer, so row mapping is checked in every resumed run
    iv = ivs.Zero(site="mlp_output", layers=model.num_layers - 1, tokens=[total - 1, total - 3])
    full = full_hidden(model, ex, iv)
    with torch.no_grad(), recording(layers) as recorder:
        model.raw()(**ex.data, use_cache=False)
    record = recorder.record(total)
    impl = model.attn_implementation
    with torch.no_grad(), applied(model, ex, iv):
        for start in (0, 2):
            for p0 in (0, int(ex.spans.video[3]), total - 4):
                hidden = resume(layers, record, start, record.resid[start][:, p0:],
                                PrefixKV(record.keys, record.values, p0), attn_impl=impl, p0=p0)
                torch.testing.assert_close(hidden, full[:, p0:], rtol=0, atol=1e-5)
            # scattered rows: every other position's keys/values come from the recorded run itself
            rows = torch.tensor([int(ex.spans.audio[1]), total - 5, total - 3, total - 1])
            cache = ScatterKV(record.keys, record.values, record.keys, record.values, int(rows[0]), rows)
            hidden = resume(layers, record, start, record.resid[start][:, rows], cache, attn_impl=impl, rows=rows)
            torch.testing.assert_close(hidden, full[:, rows], rtol=0, atol=1e-5)
    # several batch rows, each computing its own positions (padded to the widest), each with its own
    # copy of the intervention mapped to its rows
    found = [rows, torch.tensor([int(ex.spans.video[2]), total - 3, total - 1]), torch.tensor([total - 1])]
    padded = pad_rows(found, total)
    for start in (0, 2):
        cache = ScatterKV(record.keys, record.values, record.keys, record.values, [int(r[0]) for r in found], padded)
        with torch.no_grad(), applied(model, [ex] * 3, [iv] * 3):
            hidden = resume(layers, record, start, record.resid[start][0][padded.clamp(max=total - 1)], cache,
                            attn_impl=impl, rows=padded)
        for b, r in enumerate(found):
            torch.testing.assert_close(hidden[b, : len(r)], full[0, r], rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="one per batch row"), torch.no_grad(), applied(model, ex, iv):
        resume(layers, record, 0, record.resid[0][0][padded.clamp(max=total - 1)], cache, attn_impl=impl, rows=padded)
    assert not torch.allclose(full, full_hidden(model, ex), atol=1e-4)   # the edit did something
    with pytest.raises(InputError, match="either p0"):
        resume(layers, record, 0, record.resid[0], None, attn_impl=impl)


def test_gradients_from_a_layer_input_under_no_grad(tiny, av_example):
    acts = {}
    with observed(tiny, "resid_pre", [0, 2], lambda layer, value: acts.setdefault(layer, value)), \
            gradients_from(tiny, 0), torch.no_grad():
        logits = tiny.raw()(**av_example.data, use_cache=False).logits
    assert torch.is_grad_enabled()                       # grad mode restored when the block ended
    (grad0, grad2) = torch.autograd.grad(logits[0, -1].sum(), [acts[0], acts[2]])
    assert grad0.abs().sum() > 0 and grad2.abs().sum() > 0
    with pytest.raises(InputError, match="cannot observe"):
        with observed(tiny, "attn_call", [0], print):
            pass


def zero_encoder_output(model, ex, modalities):
    """The old encoder ablation, written plainly: zero the packed encoder output in an nnsight trace."""
    role = {"audio": "audio_encoder", "video": "vision_encoder"}
    with torch.no_grad(), model.trace(ex, use_cache=False):
        for name in sorted(modalities):
            tokens = model.adapter.encoder_tokens(role[name], getattr(model, role[name]).output)
            tokens[:] = 0
        logits = nnsight.save(model.logits[0, -1])
    return logits


def zero_embeddings(model, ex, modalities):
    """The modality's tokens enter the decoder as zeros, written plainly as an nnsight edit of layer 0's input."""
    positions = torch.cat([getattr(ex.spans, name) for name in modalities])
    with torch.no_grad(), model.trace(ex, use_cache=False):
        model.layers[0].input[:, positions] = 0
        logits = nnsight.save(model.logits[0, -1])
    return logits


@pytest.mark.parametrize("model_type", ["qwen2_5_omni", "qwen3_omni_moe", "salmonn_style"])
def test_zero_modalities_equals_zeroing_the_encoder_output(model_type):
    """Qwen-Omni merges its encoders' outputs as they are: the new ablation equals the old one. A
    SALMONN-style model projects them after its encoder (the old way left ``projector(0)`` there):
    the new ablation zeroes the embeddings themselves on every adapter."""
    model = nav.testing.tiny_model(model_type, seed=0)
    ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
                       text="What is making the sound?")
    plain = ivs.run(model, ex, runtime="hooks")[0, -1]
    for names in (["audio"], ["video"], ["audio", "video"]):
        new = ivs.run(model, ex, zero_modalities(names), runtime="hooks")[0, -1]
        traced = ivs.run(model, ex, zero_modalities(names))[0, -1]
        reference = zero_embeddings(model, ex, names)
        torch.testing.assert_close(new, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(traced, reference, rtol=0, atol=1e-5)
        assert not torch.allclose(new, plain, atol=1e-4), names
        old = zero_encoder_output(model, ex, names)
        assert torch.allclose(new, old, atol=1e-5) == (model_type != "salmonn_style"), names
        # encoder_edit in a trace of one's own is the same primitive
        marked = ablate(ex, names, method="encoder")
        with torch.no_grad(), model.trace(marked):
            encoder_edit(model, marked)
            mine = nnsight.save(model.logits[0, -1])
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)


def test_dominance_runs_are_the_primitives(tiny, av_example):
    options = "ABCD"
    for method in ("raw", "encoder"):
        record = clip_dominance(tiny, av_example, options, method=method)
        if method == "raw":
            runs = [av_example, blank_inputs(tiny, av_example, "video"), blank_inputs(tiny, av_example, "audio")]
            expected = [option_probs(tiny, run, options) for run in runs]
        else:
            token_ids = option_token_ids(tiny.tokenizer, options)
            expected = [option_probs(tiny, av_example, options)]
            for name in ("video", "audio"):
                logits = ivs.run(tiny, av_example, zero_modalities(name), runtime="hooks")[0, -1]
                expected.append(letter_probs(logits, token_ids))
        for run, probs in zip(("av", "a", "v"), expected):
            assert record["probs"][run] == pytest.approx(probs.tolist(), abs=1e-6), (method, run)


def test_raw_removal_is_one_transform(tiny, av_example):
    for name in ("audio", "video"):
        a, b, c = blank_modality(tiny, av_example, name), ablate(av_example, name, tiny), \
            blank_inputs(tiny, av_example, name)
        for key, value in a.data.items():
            if torch.is_tensor(value):
                assert torch.equal(value, b.data[key]) and torch.equal(value, c.data[key]), key
    with pytest.raises(InputError, match="'audio' or 'video'"):
        zero_modalities("text")
    with pytest.raises(InputError, match="AVInputs"):
        blank_inputs(tiny, av_example.data, "audio")
