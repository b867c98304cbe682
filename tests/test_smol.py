"""smol-omni end to end: the language model is SmolLM2 untouched, its sink channel is found from data, and
the measured sink facts (the massive activation stays on the first token) hold; tracing and ASD run.

Skipped, with the reason, only when SmolLM2's GGUF cannot be had (see the `smol_gguf` fixture).
The model is loaded once per session.
"""

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.requires_smol


@pytest.fixture(scope="session")
def smol(smol_model):
    return smol_model


@pytest.fixture(scope="session")
def smol_clips(smol):
    """Two toy-world multiple-choice clips, prepared for smol-omni, with their records."""
    from nnsight_av.demo import _clip_records

    _, records = _clip_records(2, seed=0)
    return records, [r.prepare(smol) for r in records]


def test_text_logits_equal_llama_from_the_same_gguf(smol, smol_gguf):
    from nnsight_av.smol.model import smol_language_model

    reference = smol_language_model(smol_gguf)
    tokenizer = smol.tokenizer
    prompts = ["What is the capital of France?", "The quick brown fox jumps over the lazy dog.",
               "<|im_start|>user\nName three animals.<|im_end|>\n<|im_start|>assistant\n"]
    thinker = smol._module                                       # the HF thinker under the envoy
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert int(ids.max()) < reference.config.vocab_size  # text tokens only: no new rows involved
        with torch.no_grad():
            ours = thinker(input_ids=ids).logits[..., : reference.config.vocab_size].float()
            theirs = reference(input_ids=ids).logits.float()
        err = float((ours - theirs).abs().max())
        assert err <= 1e-4, f"{prompt!r}: max |logit difference| {err:.2e}"


def test_find_sink_dims_finds_the_massive_channel(smol, smol_clips):
    import analyses

    _, clips = smol_clips
    assert analyses.find_sink_dims(smol, clips, progress=False) == [507]
    assert smol.adapter.known_sink_dims() == [507]


def test_first_token_is_the_only_sink(smol, smol_clips):
    """The measured fact on smol-omni: the massive activation stays on the first token; no media token is a sink."""
    import analyses

    _, clips = smol_clips
    res = analyses.find_sinks(smol, clips[0], criterion="magnitude", progress=False)
    assert res.criterion == "magnitude" and res.dims == [507]
    scores = res.scores.numpy()
    ratio = scores / np.median(scores, axis=1, keepdims=True)
    late = [i for i, layer in enumerate(res.layers) if layer >= 12]
    first_is_sink = res.mask[late, 0].float().mean().item()
    media = np.array([m in ("video", "audio") for m in res.modality_of()])
    media_peak = float(ratio[:, media].max())
    first_median = float(np.median(ratio[late, 0]))
    assert first_is_sink >= 0.8, f"first token a sink at only {first_is_sink:.0%} of layers >= 12 (x{first_median:.0f})"
    assert not res.mask[:, media].any(), f"a media token became a sink: max media ratio x{media_peak:.1f}"
    assert first_median > 10 * media_peak, f"first token x{first_median:.0f} vs media tokens at most x{media_peak:.1f}"
    assert res.video.numel() == 0 and res.audio.numel() == 0


def test_causal_trace_runs_end_to_end(smol, smol_clips):
    import analyses

    records, clips = smol_clips
    corrupt = analyses.ablate(clips[0], "audio", smol)          # remove audio: patch video into the video-only run
    result = analyses.causal_trace(smol, clips[0], corrupt, records[0].options, token_sets=["all", "sink", "random"],
                                   dominant="audio", progress=False)
    table = result.table()
    assert set(table.index) == {"all", "sink", "random"}
    assert np.isfinite(table[["IE_clean", "IE_corrupt"]].values).all()
    assert table.loc["all", "tokens"] == clips[0].spans.video.numel()
    # no media sinks on smol-omni: the sink set (and its count-matched random control) patch nothing
    assert table.loc["sink", "tokens"] == 0 and table.loc["sink", "IE_clean"] == 0.0


def test_asd_generation_falls_back_and_says_why(smol):
    import analyses
    from nnsight_av import toy

    clip = toy.make_dataset(1, seed=3, task="caption")[0]
    ex = smol.prepare(video=clip.frames, audio=clip.audio, text=clip.prompt)
    out = analyses.asd_generate(smol, ex, max_new_tokens=4)
    greedy = analyses.greedy_generate(smol, ex, 4)
    assert 1 <= out.num_new_tokens <= 4 and out.text.strip()
    assert all(math.isfinite(v) for v in out.s) and all(math.isfinite(v) for v in out.w)
    assert out.fallback.all(), "smol-omni has no cross-modal sinks, so ASD must fall back on every step"
    assert any(r and r != "first token" for r in out.steps["reason"]), out.steps["reason"]
    assert out.token_ids == greedy.token_ids
