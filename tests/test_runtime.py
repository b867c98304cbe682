"""One runtime: every intervention primitive gives the same outputs in an nnsight trace and on the hook runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interventions as ivs
import nnsight_av as nav
from interventions.runtime import AttentionHook, Decoder, applied


@pytest.fixture(scope="module")
def silent(tiny, av_example):
    req = av_example.request
    return tiny.prepare_request(req.with_media(audio=np.zeros_like(req.audio)))


def every_primitive(tiny, av_example, silent):
    """One instance or more of each registered intervention type (Compose included), sites varied."""
    clean = ivs.cache_activations(tiny, av_example, ["input_layernorm", ivs.Site("attn_output", heads=[0, 2])],
                                  layers=[1, 2])
    means = ivs.compute_means(tiny, [av_example, silent], "resid_post", layers=[0, 3], by="modality")
    cases = [
        ivs.Zero(layers=[0, 2], tokens="audio", site="resid_pre"),
        ivs.Zero(layers=1, tokens="text", site="attn_output", heads=[1]),
        ivs.Zero(layers=2, tokens="video", site="mlp_output"),
        ivs.MeanPatch(means, layers=[0, 3], tokens="audio", site="resid_post"),
        ivs.Patch(clean, layers=[1, 2], tokens="audio", site="input_layernorm"),
        ivs.Patch(clean, layers=2, tokens="text", site="attn_output", heads=[0, 2]),
        ivs.Noise(tokens="video", scale=2.0, seed=3),
        ivs.AttentionKnockout(queries="text", keys="video", layers=range(1, 3)),
        ivs.AttentionKnockout(queries="audio", keys="video", heads=[0]),
        ivs.AttentionBoost(queries="text", keys="audio", alpha=0.5),
        ivs.AttentionBoost(queries="text", keys="video", alpha=1.0, mode="multiplicative", layers=[3]),
        ivs.Zero(layers=1, tokens="audio") + ivs.AttentionBoost(queries="text", keys="audio", alpha=0.3, layers=2),
    ]
    kinds = {type(iv).__name__ for iv in cases}
    missing = set(ivs.registered_interventions()) - kinds
    assert not missing, f"add a case for {missing}"
    return cases


def test_every_primitive_runs_the_same_on_both_runtimes(tiny, av_example, silent):
    plain = ivs.run(tiny, silent)
    for iv in every_primitive(tiny, av_example, silent):
        traced = ivs.run(tiny, silent, iv)
        hooked = ivs.run(tiny, silent, iv, runtime="hooks")
        torch.testing.assert_close(hooked, traced, rtol=0, atol=1e-5, msg=lambda m: f"{iv!r}: {m}")
        assert not torch.allclose(traced, plain, atol=1e-4), f"{iv!r} changed nothing: a vacuous comparison"


def test_every_primitive_generates_the_same_on_both_runtimes(tiny, av_example, silent):
    for iv in every_primitive(tiny, av_example, silent):
        ids, logits = ivs.generate(tiny, silent, iv, max_new_tokens=3, steps=[0, 2], return_logits=True)
        ids_h, logits_h = ivs.generate(tiny, silent, iv, max_new_tokens=3, steps=[0, 2], return_logits=True,
                                       runtime="hooks")
        assert torch.equal(ids_h, ids), repr(iv)
        torch.testing.assert_close(logits_h, logits, rtol=0, atol=1e-5, msg=lambda m: f"{iv!r}: {m}")


def test_live_patch_between_rows_of_one_batch(tiny, av_example, silent):
    both = ivs.run(tiny, [av_example, silent], ivs.Patch(source=0, site="resid_pre"), runtime="hooks")
    torch.testing.assert_close(both[1], both[0], rtol=0, atol=1e-6)


def test_runtime_hooks_nest_with_another_attention_hook(tiny, av_example):
    """A user's interventions compose with a routed hook that computes the attention itself (as ASD's does)."""
    seen = []

    class Recorder(AttentionHook):
        def attend(self, layer, module, query, key, value, mask, scale):
            seen.append(layer)
            return None                                          # SDPA as usual

    iv = ivs.AttentionKnockout(queries="text", keys="audio", layers=[1])
    decoder = Decoder(tiny)
    with torch.no_grad(), decoder.hooked(Recorder(decoder.attention)), applied(tiny, av_example, iv):
        logits = decoder.module(**av_example.data).logits
    assert seen == list(range(tiny.num_layers))
    torch.testing.assert_close(logits, ivs.run(tiny, av_example, iv), rtol=0, atol=1e-5)


def test_hook_runtime_leaves_nothing_behind(tiny, av_example):
    attn = tiny.raw("self_attn", layer=1)
    before = (len(attn._forward_hooks), tiny.attn_implementation)
    ivs.run(tiny, av_example, ivs.AttentionBoost(queries="text", keys="audio", layers=1), runtime="hooks")
    assert (len(attn._forward_hooks), tiny.attn_implementation) == before
    with pytest.raises(nav.InputError, match="runtime must be"):
        ivs.run(tiny, av_example, None, runtime="fast")


def test_decoding_methods_take_a_users_interventions(tiny, av_example):
    """greedy/VCD/FMD/ASD apply the same intervention objects; greedy equals the nnsight runtime's generation."""
    from analyses.asd import ASDConfig, asd_generate
    from analyses.decoding import fmd_generate, greedy_generate, vcd_generate

    iv = ivs.AttentionBoost(queries="text", keys="audio", alpha=3.0) + ivs.Zero(tokens="video", layers=[0, 1])
    out = greedy_generate(tiny, av_example, max_new_tokens=5, interventions=iv)
    ref = ivs.generate(tiny, av_example, iv, max_new_tokens=5)             # an nnsight trace per step
    assert out.token_ids == ref[0, len(av_example):].tolist()[:len(out.token_ids)]
    assert out.token_ids != greedy_generate(tiny, av_example, max_new_tokens=5).token_ids
    sets = {"av": av_example.spans.audio[:2], "va": av_example.spans.video[:2],
            "aa": av_example.spans.audio[2:4], "vv": av_example.spans.video[2:4]}
    for run in (lambda **kw: vcd_generate(tiny, av_example, max_new_tokens=3, **kw),
                lambda **kw: fmd_generate(tiny, av_example, max_new_tokens=3, **kw),
                lambda **kw: asd_generate(tiny, av_example, max_new_tokens=3, config=ASDConfig(boost_start=1),
                                          sinks=sets, backend="torch", **kw)):
        assert run(interventions=iv).token_ids != run().token_ids


@pytest.mark.parametrize("mode", ["pre_softmax", "multiplicative"])
def test_asd_guided_pass_is_the_attention_boost_primitive(tiny, av_example, mode):
    """ASD's fused guided branch (first token) = `ASDConfig.guided_pass` run as a plain intervention, both runtimes."""
    from analyses.asd import ASDConfig, asd_generate

    sets = {"av": av_example.spans.audio[:3], "va": av_example.spans.video[:3],
            "aa": av_example.spans.audio[3:6], "vv": av_example.spans.video[3:6]}
    config = ASDConfig(boost_start=1, alpha=2.0, boost_mode=mode)
    out = asd_generate(tiny, av_example, max_new_tokens=1, config=config, sinks=sets, keep_logprobs=True,
                       backend="torch")
    unguided, guided = out.logprobs[0]
    iv = config.guided_pass(sets, tiny.num_layers)
    for runtime in ("nnsight", "hooks"):
        ref = torch.log_softmax(ivs.run(tiny, av_example, iv, runtime=runtime)[0, -1].float(), -1)
        torch.testing.assert_close(guided, ref, rtol=0, atol=1e-4)
    assert not torch.allclose(guided, unguided, atol=1e-4)
