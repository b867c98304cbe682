"""The static-cache decode path (issue 17): the same tokens as the DynamicCache loop, for every method.

On the CPU the step runs eagerly (the same code a CUDA graph captures); tests/test_gpu.py checks
the graph replays against it on a GPU.
"""

import numpy as np
import pytest
import torch

import nnsight_av as nav
from analyses.asd import ASDConfig, asd_generate, decode_attention
from analyses.decoding import fmd_generate, greedy_generate, vcd_generate
from interventions.runtime.decoder import Decoder
from interventions.runtime.static_decoder import StaticDecoder, StaticKV
from nnsight_av.errors import InputError

# strong enough that the guided pass changes choices on the tiny model (checked below)
BOOSTED = ASDConfig(boost_start=1, target_start=1, alpha=5.0, lam=10.0, cap=10.0, gate=1e-3,
                    boost_mode="multiplicative")


def sets_of(ex):
    return {"av": ex.spans.audio[:2], "va": ex.spans.video[:2], "aa": ex.spans.audio[2:4], "vv": ex.spans.video[2:4]}


METHODS = {
    "greedy": lambda model, ex, n, **kw: greedy_generate(model, ex, n, **kw),
    "vcd": lambda model, ex, n, **kw: vcd_generate(model, ex, n, alpha=2.0, beta=0.0, noise_step=900,
                                                   schedule="linear", **kw),
    "fmd": lambda model, ex, n, **kw: fmd_generate(model, ex, n, **kw),
    "asd": lambda model, ex, n, **kw: asd_generate(model, ex, n, BOOSTED, sinks=sets_of(ex), **kw),
    "asd_found_sinks": lambda model, ex, n, **kw: asd_generate(model, ex, n, ASDConfig(tau=0.0, sink_dims=(0,)), **kw),
}


def assert_same(dynamic, static):
    assert dynamic.meta["decode"] == "dynamic" and static.meta["decode"] == "static"
    assert static.token_ids == dynamic.token_ids
    assert static.finished == dynamic.finished and static.text == dynamic.text
    if hasattr(dynamic, "steps"):
        assert static.steps["reason"] == dynamic.steps["reason"]
        assert static.steps["fallback"] == dynamic.steps["fallback"]
        assert static.steps["changed"] == dynamic.steps["changed"]
        for key in ("s", "target", "w", "m", "C", "U"):
            np.testing.assert_allclose(static.steps[key], dynamic.steps[key], atol=1e-5, err_msg=key)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("n", [1, 2, 12])
def test_static_path_gives_the_same_tokens(tiny, av_example, method, n):
    dynamic = METHODS[method](tiny, av_example, n, static=False)
    static = METHODS[method](tiny, av_example, n)                 # the default: static where it applies
    assert static.num_new_tokens == n                             # the tiny model's EOS is not reached
    assert_same(dynamic, static)


def test_asd_static_path_mixes_the_guided_pass(tiny, av_example):
    dynamic = METHODS["asd"](tiny, av_example, 12, static=False)
    static = METHODS["asd"](tiny, av_example, 12, static=True)
    assert any(dynamic.steps["changed"]), "the boost must change some choice, else the test is vacuous"
    assert max(static.s) > 0
    assert_same(dynamic, static)


@pytest.mark.parametrize("method", ["greedy", "vcd", "asd"])
def test_static_path_stops_at_eos_like_the_dynamic_one(tiny, av_example, method):
    full = METHODS[method](tiny, av_example, 12, static=False)
    config = tiny._module.generation_config
    previous = config.eos_token_id
    for stop in (1, 6):                            # EOS before and after the first host check of the ids
        config.eos_token_id = full.token_ids[stop]
        try:
            dynamic = METHODS[method](tiny, av_example, 12, static=False)
            static = METHODS[method](tiny, av_example, 12)
        finally:
            config.eos_token_id = previous
        first = full.token_ids.index(full.token_ids[stop])
        assert static.token_ids == full.token_ids[: first + 1] and static.finished
        assert_same(dynamic, static)


def test_static_decoder_checks_eos_every_few_steps(tiny, av_example):
    decoder = Decoder(tiny)
    with torch.inference_mode():
        prefill = decoder.prefill(decoder.data(av_example))
        outs = []
        for every in (1, 3, 100):
            loop = StaticDecoder(decoder, prefill, Decoder.kv(prefill.cache), 9, check_every=every)
            outs.append(loop.generate(prefill.logits[0].argmax(), lambda logits, step: logits[0].argmax()))
            assert not loop.used_graph
    reference = greedy_generate(tiny, av_example, 9, static=False).token_ids
    assert outs == [(reference, False)] * 3
    eos = reference[4]
    decoder.eos = {eos}
    with torch.inference_mode():
        loop = StaticDecoder(decoder, prefill, Decoder.kv(prefill.cache), 9, check_every=3)
        ids, finished = loop.generate(prefill.logits[0].argmax(), lambda logits, step: logits[0].argmax())
    assert finished and ids == reference[: reference.index(eos) + 1]


@pytest.mark.parametrize("method", ["greedy", "vcd", "fmd", "asd"])
def test_static_path_on_toy_omni(method):
    model = nav.load("toy-omni")
    ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
                       text="Describe what you see and hear in a single sentence.")
    assert_same(METHODS[method](model, ex, 10, static=False), METHODS[method](model, ex, 10))


@pytest.mark.requires_smol
def test_static_path_on_smol_omni(smol_model):
    ex = smol_model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
                            text="Describe what you see and hear in a single sentence.")
    for method in ("greedy", "asd_found_sinks"):
        assert_same(METHODS[method](smol_model, ex, 8, static=False), METHODS[method](smol_model, ex, 8))


def test_static_choice_and_errors(tiny, av_example):
    from interventions import AttentionBoost

    iv = AttentionBoost(queries="text", keys="audio", alpha=0.5)
    assert greedy_generate(tiny, av_example, 2, interventions=iv).meta["decode"] == "dynamic"
    assert asd_generate(tiny, av_example, 2, BOOSTED, sinks=sets_of(av_example),
                        keep_logprobs=True).meta["decode"] == "dynamic"
    with pytest.raises(InputError, match="interventions"):
        greedy_generate(tiny, av_example, 2, interventions=iv, static=True)
    with pytest.raises(InputError, match="keep_logprobs"):
        asd_generate(tiny, av_example, 2, keep_logprobs=True, static=True)
    with pytest.raises(InputError, match="static must be"):
        vcd_generate(tiny, av_example, 2, static="yes")
    with pytest.raises(InputError, match="CUDA"):
        greedy_generate(tiny, av_example, 2, graph=True)
    with pytest.raises(InputError, match="max_len"):
        StaticKV([(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))], 4)


def test_decode_attention_ignores_keys_past_the_length():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    flag = torch.tensor([0, 1, 1, 0, 0.0])
    weights = torch.rand(5, 8)
    boost = torch.tensor([0.0, 0.7])
    ref, ref_sums = decode_attention(q, k[:, :, :6], v[:, :, :6], 0.3, flag, boost, weights)
    k[:, :, 6:] = 50.0                              # garbage past the fill level must not count
    out, sums = decode_attention(q, k, v, 0.3, flag, boost, weights, length=torch.tensor(6))
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(sums, ref_sums, atol=1e-6)
    unmasked, _ = decode_attention(q, k, v, 0.3, flag, boost, weights)
    assert not torch.allclose(unmasked, ref, atol=1e-3)


def test_grouped_decode_attention_equals_sdpa_with_repeated_heads(tiny, av_example, monkeypatch):
    from interventions.runtime import static_decoder

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = (torch.arange(7) <= 4).view(1, 1, 1, 7).expand(2, 1, 1, 7)
    got = static_decoder.GroupedDecodeAttention([]).attend(0, None, q, k, v, mask, 0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                           attn_mask=mask, scale=0.3).transpose(1, 2)
    assert got.shape == (2, 1, 6, 8) and torch.allclose(got, ref, atol=1e-6)
    calls = []
    original = static_decoder.GroupedDecodeAttention.attend
    monkeypatch.setattr(static_decoder.GroupedDecodeAttention, "attend",
                        lambda self, *a: calls.append(a[0]) or original(self, *a))
    greedy_generate(tiny, av_example, 3)
    assert sorted(set(calls)) == list(range(tiny.num_layers)) and len(calls) == 2 * tiny.num_layers


def _static_logits(decoder, prefill, fuse, steps=4):
    loop = StaticDecoder(decoder, prefill, Decoder.kv(prefill.cache), steps, fuse=fuse)
    seen = []

    def choose(logits, step):
        seen.append(logits.clone())
        return logits[0].argmax()

    ids, _ = loop.generate(prefill.logits[0].argmax(), choose)
    return loop.fused, ids, torch.stack(seen)


def test_fused_layers_give_bit_identical_logits_on_cpu(tiny, av_example):
    decoder = Decoder(tiny)
    wrappers = [vars(layer).get("forward") for layer in decoder.layers]      # nnsight's, where it set one
    with torch.inference_mode():
        prefill = decoder.prefill(decoder.data(av_example))
        fused, ids, logits = _static_logits(decoder, prefill, True)
        plain, ids_plain, logits_plain = _static_logits(decoder, prefill, False)
    assert fused == tiny.num_layers and plain == 0
    assert ids == ids_plain and torch.equal(logits, logits_plain)
    assert all(vars(layer).get("forward") is was for layer, was in zip(decoder.layers, wrappers))  # swap undone


def test_fused_layers_skip_a_layer_with_submodule_hooks(tiny, av_example):
    from interventions.runtime.fused_layers import fusable

    decoder = Decoder(tiny)
    calls = []
    handle = decoder.layers[1].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        known = tiny.adapter.fused_decode_layers
        assert not fusable(decoder.layers[1], known) and fusable(decoder.layers[0], known)
        with torch.inference_mode():
            prefill = decoder.prefill(decoder.data(av_example))
            calls.clear()
            fused, ids, _ = _static_logits(decoder, prefill, True, steps=3)
    finally:
        handle.remove()
    assert fused == tiny.num_layers - 1 and len(calls) == 2                 # the hook ran at both steps
    assert ids == greedy_generate(tiny, av_example, 3, static=False).token_ids


def test_fused_layers_cut_the_ops_per_step(tiny, av_example, monkeypatch):
    from interventions.runtime import static_decoder
    from interventions.runtime.op_count import ops_per_step

    monkeypatch.setattr(tiny._module.generation_config, "eos_token_id", [])
    with torch.inference_mode():
        fused = ops_per_step(lambda n: greedy_generate(tiny, av_example, n))
        dynamic = ops_per_step(lambda n: greedy_generate(tiny, av_example, n, static=False))
        original = static_decoder.StaticDecoder.__init__
        monkeypatch.setattr(static_decoder.StaticDecoder, "__init__",
                            lambda self, *a, **kw: original(self, *a, **{**kw, "fuse": False}))
        plain = ops_per_step(lambda n: greedy_generate(tiny, av_example, n))
    # the 4-layer tiny model: ~170 ops per step transformers' way, ~80 fused (5 matmuls + ~12 other ops per layer)
    assert fused < 0.6 * plain and fused < 0.6 * dynamic


def test_traces_still_work_after_a_fused_static_decode():
    """The fused layers swap ``forward`` only while the loop runs and put nnsight's own wrapper back
    (dropping it made every later trace of the model fail with OutOfOrderError)."""
    model = nav.testing.tiny_model(seed=0)
    ex = model.prepare(text="Hi there")
    with model.trace(ex):
        before = model.layers[0].output.save()
    out = greedy_generate(model, ex, 3, static=True)
    assert out.meta["decode"] in ("static", "graph")
    with model.trace(ex):
        after = model.layers[0].output.save()
    assert torch.equal(before, after)


def test_transformers_output_capturing_hooks_keep_the_fused_path(tiny, av_example):
    """transformers leaves its output-capturing hooks on the attention modules after a call that asked
    for attentions; they are not user hooks and must not turn the fused decode layers off."""
    from interventions.runtime.fused_layers import fusable

    with torch.inference_mode():
        tiny.raw()(**av_example.data, output_attentions=True)
    attn = tiny.raw("layers")[0].self_attn
    assert attn._forward_hooks, "transformers installed no output-capturing hook (the test needs one)"
    assert fusable(tiny.raw("layers")[0], tiny.adapter.fused_decode_layers)


@pytest.mark.parametrize("model_type, fused_layers", [("salmonn_style", "all"), ("qwen3_omni_moe", "none")])
def test_fused_layers_follow_the_adapters_declaration(model_type, fused_layers):
    """Which layers run fused is the adapter's declaration (`Adapter.fused_decode_layers`), checked
    against each layer's parts: the SALMONN-style Llama decoder fuses, bit-identically on the CPU;
    Qwen3-Omni's MoE layers (q/k norms, experts) do not."""
    model = nav.testing.tiny_model(model_type, seed=0)
    ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
                       text="What is making the sound?")
    decoder = Decoder(model)
    with torch.inference_mode():
        prefill = decoder.prefill(decoder.data(ex))
        fused, ids, logits = _static_logits(decoder, prefill, True)
        plain, ids_plain, logits_plain = _static_logits(decoder, prefill, False)
    assert fused == (model.num_layers if fused_layers == "all" else 0) and plain == 0
    assert ids == ids_plain and torch.equal(logits, logits_plain)
