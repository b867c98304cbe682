"""The CUDA code paths, on a tiny model moved to the GPU (float32): the same identities as on the CPU.

On the GPU, SDPA dispatches to other kernels (flash / memory-efficient), the exact sweep's
bottom-right causal mask and the boolean mask of the position-skipping runs take CUDA paths, and the
sink-column and ASD decode kernels run in Triton. Each check compares against a reference that does
not share the code under test. Skipped where no CUDA device exists (CI has none; run on a lent GPU).
"""

from __future__ import annotations

import pytest
import torch

import analyses
import interventions as ivs
import nnsight_av as nav
from analyses import ablate, causal_trace

from test_tracing import OPTIONS, sharpen  # noqa: E402  (the tracing tests' sharpened tiny model)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_gpu(model):
    model._module.to("cuda")
    return model


@pytest.fixture(scope="module")
def sharp():
    return on_gpu(sharpen(nav.testing.tiny_model(seed=0)))


@pytest.fixture(scope="module")
def pair(sharp):
    clean = sharp.prepare(video=nav.testing.synthetic_frames(4.0, 2, 64), audio=nav.testing.synthetic_tone(4.0),
                          text="What is making the sound?")
    return clean.to("cuda"), ablate(clean, "video", sharp).to("cuda")


def _effects(result):
    return result.effects[["ie_clean", "ie_corrupt"]]


def test_exact_sweep_equals_naive_on_gpu(sharp, pair):
    clean, corrupt = pair
    audio = clean.spans.audio
    sets = {"all": audio, "late": audio[len(audio) // 2:], "with_last": torch.cat([audio[::7], audio[-1:]])}
    kw = dict(token_sets=sets, window=2, progress=False)
    exact = causal_trace(sharp, clean, corrupt, OPTIONS, batch_size=3, **kw)
    no_skip = causal_trace(sharp, clean, corrupt, OPTIONS, skip_overwritten=False, **kw)
    naive = causal_trace(sharp, clean, corrupt, OPTIONS, method="naive", **kw)
    assert float(_effects(naive).abs().max().max()) > 1e-2                 # the comparison is not vacuous
    assert float((_effects(exact) - _effects(naive)).abs().max().max()) < 1e-4
    assert float((_effects(no_skip) - _effects(naive)).abs().max().max()) < 1e-4


def test_all_media_at_all_layers_restores_clean_on_gpu(sharp, pair):
    clean, corrupt = pair
    res = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets={"media": clean.spans.media}, progress=False)
    info = res.clips["clip"]
    oc = OPTIONS.index(info["o_clean"])
    expected = info["P_clean"][oc] - info["P_corrupt"][oc]
    assert abs(expected) > 1e-2
    assert res.effects.iloc[0].ie_clean == pytest.approx(expected, abs=1e-4)


def test_attention_boost_sdpa_equals_eager_on_gpu():
    sdpa = on_gpu(nav.testing.tiny_model(seed=0, attn_implementation="sdpa"))
    eager = on_gpu(nav.testing.tiny_model(seed=0, attn_implementation="eager"))
    ex = sdpa.prepare(video=nav.testing.synthetic_frames(4.0, 2, 56), audio=nav.testing.synthetic_tone(4.0),
                      text="What is making the sound?").to("cuda")
    for mode, alpha in (("pre_softmax", 0.8), ("multiplicative", 1.5)):
        iv = ivs.AttentionBoost(queries="text", keys="audio", alpha=alpha, mode=mode, layers=[1, 3])
        got, ref = ivs.run(sdpa, ex, iv), ivs.run(eager, ex, iv)
        assert torch.allclose(got, ref, atol=1e-4), mode
        assert not torch.allclose(got, ivs.run(sdpa, ex), atol=1e-3), mode


def test_sink_columns_and_mds_equal_eager_maps_on_gpu():
    sdpa = on_gpu(nav.testing.tiny_model(seed=0, attn_implementation="sdpa"))
    eager = on_gpu(nav.testing.tiny_model(seed=0, attn_implementation="eager"))
    ex = sdpa.prepare(video=nav.testing.synthetic_frames(4.0, 2, 56), audio=nav.testing.synthetic_tone(4.0),
                      text="What is making the sound?").to("cuda")
    with torch.no_grad():
        maps = torch.stack([a[0] for a in eager._module(**ex.data, output_attentions=True).attentions]).cpu()
    cols = [0, int(ex.spans.video[3]), int(ex.spans.audio[0]), len(ex) - 1]
    got = analyses.column_attention(sdpa, ex, cols).cpu()
    assert torch.allclose(got, maps[..., cols], atol=1e-4)
    labels = ex.spans.modality_of()
    for defer in (True, False):          # sinks' columns after the last layer / every media column on the fly
        found, mds = analyses.sink_analysis(sdpa, ex, dims=[0, 1], tau=0.0, defer=defer, progress=False)
        for j, s in enumerate(mds.positions.tolist()[:6]):
            for values, modality in ((mds.V, "video"), (mds.A, "audio")):
                rows = [q for q in range(s + 1, len(ex)) if labels[q] == modality]
                want = maps[:, :, rows, s].mean((1, 2)) if rows else torch.zeros(maps.shape[0])
                assert torch.allclose(values[:, j].cpu().float(), want, atol=1e-4), (s, modality, defer)


def test_asd_triton_decode_equals_torch_path_on_gpu():
    from analyses.asd import ASDConfig, asd_generate

    model = on_gpu(nav.testing.tiny_model(seed=0))
    ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
                       text="Describe it.").to("cuda")
    config = ASDConfig(tau=0.0, sink_dims=(0,), boost_start=1, target_start=1, alpha=1.0)
    fast = asd_generate(model, ex, 8, config, keep_logprobs=True)
    plain = asd_generate(model, ex, 8, config, backend="torch", keep_logprobs=True)
    assert fast.num_new_tokens == 8 and not all(fast.steps["fallback"])
    assert fast.token_ids == plain.token_ids
    assert torch.allclose(torch.as_tensor(fast.s), torch.as_tensor(plain.s), atol=1e-5)
    assert torch.allclose(fast.logprobs, plain.logprobs, atol=1e-4)


@pytest.mark.parametrize("new_tokens", [2, 3, 24])
@pytest.mark.parametrize("method", ["greedy", "vcd", "fmd", "asd"])
def test_static_graph_replay_equals_eager_steps_on_gpu(method, new_tokens):
    """CUDA graph replays of the static decode step give the same tokens as the same step run eagerly,
    and as the DynamicCache loop (float32 tiny model; ASD through the Triton decode kernel)."""
    from analyses.asd import ASDConfig, asd_generate
    from analyses.decoding import fmd_generate, greedy_generate, vcd_generate

    model = on_gpu(nav.testing.tiny_model(seed=0))
    ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
                       text="Describe it.").to("cuda")
    sets = {"av": ex.spans.audio[:2], "va": ex.spans.video[:2], "aa": ex.spans.audio[2:4], "vv": ex.spans.video[2:4]}
    config = ASDConfig(boost_start=1, target_start=1, alpha=5.0, lam=10.0, cap=10.0, gate=1e-3,
                       boost_mode="multiplicative")
    run = {"greedy": lambda **kw: greedy_generate(model, ex, new_tokens, **kw),
           "vcd": lambda **kw: vcd_generate(model, ex, new_tokens, **kw),
           "fmd": lambda **kw: fmd_generate(model, ex, new_tokens, **kw),
           "asd": lambda **kw: asd_generate(model, ex, new_tokens, config, sinks=sets, **kw)}[method]
    graph, eager, dynamic = run(), run(graph=False), run(static=False)
    assert (graph.meta["decode"], eager.meta["decode"], dynamic.meta["decode"]) == ("graph", "static", "dynamic")
    assert graph.num_new_tokens == new_tokens
    assert graph.token_ids == eager.token_ids
    assert graph.token_ids == dynamic.token_ids
    if method == "asd":
        assert graph.steps["changed"] == eager.steps["changed"] and max(graph.s) > 0
        assert torch.allclose(torch.as_tensor(graph.s), torch.as_tensor(eager.s), atol=1e-6)
        assert torch.allclose(torch.as_tensor(graph.s), torch.as_tensor(dynamic.s), atol=1e-4)
