"""Sink-column attention and the modality dominance score against eager attention maps and plain loops."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import analyses
import nnsight_av as nav
from analyses.attention import attention_lse, attention_with_lse, column_sums
from analyses.mds import MDSResult
from nnsight_av.errors import InputError

from test_sinks import CHANNEL, TAU, planted  # noqa: F401  (shared planting helper)


@pytest.fixture(scope="module")
def model(tiny):
    return tiny


@pytest.fixture(scope="module")
def eager(tiny_eager):
    return tiny_eager


@pytest.fixture(scope="module")
def ex(av_example):
    return av_example


@pytest.fixture(scope="module")
def ex_short(model):
    return model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 84), audio=nav.testing.synthetic_tone(2.0),
                         text="Describe")


def eager_maps(eager, ex) -> torch.Tensor:
    """Full attention maps ``[layer, head, query, key]`` from the eager implementation."""
    with torch.no_grad():
        out = eager._module(**ex.data, output_attentions=True, use_cache=False)
    return torch.stack([a[0] for a in out.attentions])


def naive_va(maps, ex, sinks):
    """V and A written out as loops over layers, sinks, heads and queries."""
    labels = ex.spans.modality_of()
    layers, heads, length, _ = maps.shape
    v = torch.zeros(layers, len(sinks))
    a = torch.zeros(layers, len(sinks))
    for layer in range(layers):
        for j, s in enumerate(sinks):
            for out, modality in ((v, "video"), (a, "audio")):
                values = [float(maps[layer, h, q, s]) for h in range(heads) for q in range(s + 1, length)
                          if labels[q] == modality]
                out[layer, j] = sum(values) / len(values) if values else 0.0
    return v, a


def test_column_attention_equals_eager_maps(model, eager, ex):
    maps = eager_maps(eager, ex)
    cols = [0, int(ex.spans.video[3]), int(ex.spans.audio[0]), int(ex.spans.audio[-1]), len(ex) - 1]
    for fuse in (None, False):    # normaliser from the kernel / recomputed from q and k
        got = analyses.column_attention(model, ex, cols, fuse=fuse)
        assert got.shape == maps[..., cols].shape
        assert torch.allclose(got, maps[..., cols], atol=1e-4)
    rows = [5, len(ex) - 1]
    got = analyses.column_attention(model, ex, cols, layers=[2, 0], query_rows=rows)
    assert torch.allclose(got, maps[[2, 0]][:, :, rows][..., cols], atol=1e-4)


def test_column_attention_batched_inputs_of_different_lengths(model, eager, ex, ex_short):
    assert len(ex) != len(ex_short)
    cols = [[1, int(ex.spans.video[0]), int(ex.spans.audio[4])], [2, int(ex_short.spans.audio[1])]]
    got = analyses.column_attention(model, [ex, ex_short], cols, batch_size=2, progress=False)
    for item, c, result in zip((ex, ex_short), cols, got):
        assert torch.allclose(result, eager_maps(eager, item)[..., c], atol=1e-4)
    sums = analyses.column_attention_sums(model, [ex, ex_short], cols, batch_size=2, progress=False)
    for item, c, result in zip((ex, ex_short), cols, sums):
        v, a = naive_va(eager_maps(eager, item), item, c)
        assert torch.allclose(result.group("video"), v, atol=1e-5)
        assert torch.allclose(result.group("audio"), a, atol=1e-5)


def test_tensor_level_lse_and_column_sums_match_dense_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 30, 8), torch.randn(2, 3, 30, 8), torch.randn(2, 3, 30, 8)
    scale = 8 ** -0.5
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) * scale
    causal = torch.ones(30, 30).triu(1).bool()
    probs = torch.softmax(logits.masked_fill(causal, float("-inf")), -1)
    out, lse = attention_with_lse(q, k, v, scale)
    assert torch.allclose(lse, torch.logsumexp(logits.masked_fill(causal, float("-inf")), -1), atol=1e-5)
    assert torch.allclose(out, probs @ v.repeat_interleave(2, 1), atol=1e-5)
    groups = torch.randint(-1, 3, (2, 30))
    cols = torch.tensor([[0, 4, 17, 29], [3, 3, -1, 10]])
    for strict in (True, False):
        got = column_sums(q, k, lse, cols, groups, 3, scale, strict)
        want = torch.zeros_like(got)
        for b in range(2):
            for j, c in enumerate(cols[b].tolist()):
                if c < 0:
                    continue
                for r in range(30):
                    if groups[b, r] >= 0 and (r > c if strict else r >= c):
                        want[b, :, groups[b, r], j] += probs[b, :, r, c]
        assert torch.allclose(got, want, atol=1e-5)
    mask = ~causal                      # an explicit boolean mask gives the same normaliser
    assert torch.allclose(attention_lse(q, k, scale, mask), lse, atol=1e-5)


def test_mds_matches_the_formula_on_eager_maps(model, eager, ex):
    last_video, last_audio = int(ex.spans.video[-1]), int(ex.spans.audio[-1])
    sinks = [int(ex.spans.video[0]), int(ex.spans.audio[3]), int(ex.spans.chunks[0].audio[-1]), last_video, last_audio]
    res = analyses.modality_dominance(model, ex, sinks)
    v, a = naive_va(eager_maps(eager, ex), ex, sorted(sinks))
    assert res.positions.tolist() == sorted(sinks)
    assert torch.allclose(res.V, v, atol=1e-5) and torch.allclose(res.A, a, atol=1e-5)
    mds_layer = (v - a) / (v + a + 1e-9)
    assert torch.allclose(res.per_layer, mds_layer, atol=1e-4)
    assert torch.allclose(res.mds, mds_layer.mean(0), atol=1e-4)
    j = res.positions.tolist().index(last_video)     # no later video query: V = 0, MDS = -1
    assert torch.all(res.V[:, j] == 0) and torch.all(res.A[:, j] > 0)
    assert torch.allclose(res.per_layer[:, j], torch.full((model.num_layers,), -1.0), atol=1e-6)
    j = res.positions.tolist().index(last_audio)     # no later media query at all: both 0, MDS 0, no nan
    assert torch.all(res.V[:, j] == 0) and torch.all(res.A[:, j] == 0) and torch.all(res.per_layer[:, j] == 0)
    assert res.modality == ["video" if p in ex.spans.video.tolist() else "audio" for p in sorted(sinks)]


def test_one_pass_sink_analysis_equals_two_passes(model, ex):
    plan = {0: [int(ex.spans.video[1])], 1: [0, int(ex.spans.video[1]), int(ex.spans.audio[2])],
            2: [0, int(ex.spans.audio[2]), int(ex.spans.audio[9]), int(ex.spans.video[6])], 3: [0, int(ex.spans.video[9])]}
    with planted(model, plan):
        sinks, mds = analyses.sink_analysis(model, ex, dims=[CHANNEL], tau=TAU, k_divide=2)
        alone = analyses.find_sinks(model, ex, dims=[CHANNEL], tau=TAU)
        two = analyses.modality_dominance(model, ex, alone)
    assert torch.equal(sinks.mask, alone.mask)
    assert mds.positions.tolist() == two.positions.tolist() == sinks.positions.tolist()
    assert len(mds.positions) == 5 and sinks.dropped_text.tolist() == [0]
    assert torch.allclose(mds.V, two.V, atol=1e-6) and torch.allclose(mds.A, two.A, atol=1e-6)
    batch = analyses.sink_analysis(model, [ex, ex], dims=[CHANNEL], tau=0.0, batch_size=2, progress=False)
    assert len(batch) == 2 and torch.allclose(batch[0].mds.V, batch[1].mds.V, atol=1e-6)


@pytest.mark.parametrize("traced", [False, True], ids=["hooked", "traced"])
def test_deferred_columns_equal_streamed_columns(model, ex, ex_short, traced, monkeypatch):
    """Keeping q/k and reducing only the sinks' columns at the end gives what reducing every media
    column on the fly gives, for a batch of two lengths, on the hooked and the traced prefill."""
    from contextlib import contextmanager

    from analyses.decoding import Decoder

    if traced:
        @contextmanager
        def not_routed(self, hook):
            yield

        monkeypatch.setattr(Decoder, "hooked", not_routed)
    plan = {1: [0, int(ex.spans.video[1]), int(ex.spans.audio[2])], 2: [int(ex.spans.audio[9]), int(ex.spans.video[6])],
            3: [0, int(ex.spans.video[9]), int(ex_short.spans.audio[1])]}
    with planted(model, plan):
        runs = {defer: analyses.sink_analysis(model, [ex, ex_short], dims=[CHANNEL], tau=TAU, batch_size=2,
                                              defer=defer, progress=False) for defer in (True, False)}
    for deferred, streamed in zip(runs[True], runs[False]):
        assert torch.equal(deferred.sinks.mask, streamed.sinks.mask)
        assert deferred.mds.positions.tolist() == streamed.mds.positions.tolist() and deferred.mds.positions.numel()
        assert torch.allclose(deferred.mds.V, streamed.mds.V, atol=1e-6)
        assert torch.allclose(deferred.mds.A, streamed.mds.A, atol=1e-6)
        assert float(deferred.mds.V.abs().max()) > 0


def test_defer_by_memory_and_its_estimate(model, ex, monkeypatch):
    """``defer=None`` keeps q/k only when they fit the memory share; the estimate is what is kept."""
    from analyses import mds as mds_mod
    from analyses.attention import run_prefill

    kept: list[int] = []
    run_prefill(model, [ex], attention_layers=list(range(model.num_layers)),
                on_attention=lambda l, q, k, lse, scale: kept.append(sum(t.numel() * t.element_size()
                                                                         for t in (q, k, lse.float()))))
    assert mds_mod._stored_bytes(model, [ex]) == sum(kept)
    assert mds_mod._should_defer(model, [ex], None)
    monkeypatch.setattr(mds_mod, "DEFER_MEMORY_SHARE", 0.0)
    assert not mds_mod._should_defer(model, [ex], None) and mds_mod._should_defer(model, [ex], True)
    # On a GPU short inputs stream (the rule returns before asking the device for its memory).
    from types import SimpleNamespace

    weight = SimpleNamespace(device=torch.device("cuda"))
    on_gpu = SimpleNamespace(raw=lambda role: SimpleNamespace(weight=weight))
    assert len(ex) < mds_mod.DEFER_MIN_TOKENS_CUDA and not mds_mod._should_defer(on_gpu, [ex], None)


def test_single_modality_input_is_a_clear_error(model):
    audio_only = model.prepare(audio=nav.testing.synthetic_tone(1.0), text="What is making the sound?")
    video_only = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), text="What is shown?",
                               use_audio_in_video=False)
    for item in (audio_only, video_only):
        with pytest.raises(InputError, match="needs both"):
            analyses.modality_dominance(model, item, [0])
        with pytest.raises(InputError, match="needs both"):
            analyses.sink_analysis(model, item, dims=[CHANNEL])


def naive_split(result: MDSResult, rule: str) -> dict[str, list[int]]:
    out = {"av": [], "va": [], "aa": [], "vv": []}
    for modality, low, high in (("video", "va", "vv"), ("audio", "aa", "av")):
        pairs = [(float(m), int(p)) for p, m, lab in zip(result.positions, result.mds, result.modality)
                 if lab == modality]
        if rule == "rank":
            pairs.sort()
            half = len(pairs) // 2
            out[low] = sorted(p for _, p in pairs[:half])
            out[high] = sorted(p for _, p in pairs[half:])
        else:
            cross = [p for m, p in pairs if (m < 0 if modality == "video" else m > 0)]
            out["va" if modality == "video" else "av"] = sorted(cross)
            out["vv" if modality == "video" else "aa"] = sorted(p for _, p in pairs if p not in cross)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_split_and_summary_match_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 7 + seed                       # odd and even counts per modality
    labels = ["video" if x else "audio" for x in (torch.rand(n, generator=gen) < 0.5).tolist()]
    res = MDSResult(torch.arange(n) * 3, labels, [0, 1, 2], torch.rand(3, n, generator=gen),
                    torch.rand(3, n, generator=gen))
    for rule in ("rank", "sign"):
        split = res.split(rule)
        assert split.to_dict() == naive_split(res, rule)
        assert sorted(split.cross_modal().tolist()) == sorted(split.va.tolist() + split.av.tolist())
        assert split.halves("video") == (split.va, split.vv) and torch.equal(split.unimodal("audio"), split.aa)
    table = res.summary().set_index("modality")
    for modality in ("video", "audio"):
        values = np.array([float(m) for m, lab in zip(res.mds, labels) if lab == modality])
        if values.size:
            q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
            assert table.loc[modality, "median"] == pytest.approx(float(np.median(values)), abs=1e-6)
            assert table.loc[modality, "iqr"] == pytest.approx(q3 - q1, abs=1e-6)
    with pytest.raises(InputError):
        res.split("median")


def test_mds_result_roundtrip_views_and_plots(model, ex, tmp_path):
    res = analyses.modality_dominance(model, ex, [int(ex.spans.video[0]), int(ex.spans.audio[0]), 0])
    assert res.positions.tolist() == [int(ex.spans.video[0]), int(ex.spans.audio[0])]   # text sink left out
    back = MDSResult.from_json(res.to_json())
    assert torch.equal(back.V, res.V) and back.modality == res.modality and back.layers == res.layers
    res.to_json(tmp_path / "mds.json")
    assert MDSResult.from_json(tmp_path / "mds.json").positions.tolist() == res.positions.tolist()
    frame = res.to_frame()
    assert list(frame.columns) == ["position", "modality", "mds", "V", "A"]
    assert "MDSResult" in res._repr_html_()
    pooled = analyses.mds_summary([res, res])
    assert list(pooled["n"]) == [2, 2]
    for fig in (res.plot_heatmap(), res.plot_distribution(), analyses.plot_mds_distribution([res, res], kind="hist")):
        fig.savefig(io.BytesIO(), format="png")
    assert res.plot_heatmap().axes[0].images[0].get_clim() == (-1, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused Triton kernel needs a CUDA device")
@pytest.mark.parametrize("options", [{}, {"fma_exp": 1, "trans_q": 1}, {"reverse": 1, "heads_first": 1}],
                         ids=["shipped", "fma_exp+trans_q", "reverse+heads_first"])
def test_triton_column_sums_match_torch_on_gpu(options, monkeypatch):
    pytest.importorskip("triton")
    from analyses import column_math

    monkeypatch.setattr(column_math, "TRITON_CONFIG", {**column_math.TRITON_CONFIG, **options})
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-3)):
        q = torch.randn(2, 8, 700, 64, device="cuda", dtype=dtype)
        k = torch.randn(2, 2, 700, 64, device="cuda", dtype=dtype)
        v = torch.randn(2, 2, 700, 64, device="cuda", dtype=dtype)
        _, lse = attention_with_lse(q, k, v, 0.125)
        assert torch.allclose(lse, attention_lse(q, k, 0.125), atol=1e-3)
        cols = torch.stack([torch.arange(0, 700, 3), torch.where(torch.arange(0, 700, 3) < 400, torch.arange(0, 700, 3), -1)])
        groups = torch.randint(-1, 3, (2, 700))
        for strict in (True, False):
            fused = column_sums(q, k, lse, cols.cuda(), groups.cuda(), 3, 0.125, strict, "triton")
            plain = column_sums(q, k, lse, cols.cuda(), groups.cuda(), 3, 0.125, strict, "torch")
            assert torch.allclose(fused, plain, rtol=tol, atol=tol * float(plain.abs().max()))


def test_hooked_prefill_equals_traced_prefill_and_falls_back(model, ex, monkeypatch):
    """The prefill behind the sink analyses runs on plain hooks; it must read what the nnsight trace
    reads, and a model whose attention is not routed through transformers' interface gets the trace."""
    from contextlib import contextmanager

    from analyses.decoding import Decoder
    from interventions.runtime import prefill as prefill_mod
    from analyses.sinks import sink_scores

    cols = torch.tensor([[0, int(ex.spans.video[2]), int(ex.spans.audio[1]), len(ex) - 2]], dtype=torch.int32)
    groups = torch.full((1, len(ex)), -1, dtype=torch.int32)
    groups[0, ex.spans.video] = 0
    groups[0, ex.spans.audio] = 1
    args = (model, [ex], [0, 2, 3], lambda l, h: sink_scores(h, [0, 1]), [1, 3],
            lambda l, q, k, lse, scale: column_sums(q, k, lse, cols, groups, 2, scale), None)
    hooked = prefill_mod._run_prefill_hooked(*args)
    traced = prefill_mod._run_prefill_traced(*args)
    for got, want in zip(hooked, traced):
        assert sorted(got) == sorted(want) and got
        for layer in want:
            assert torch.allclose(got[layer], want[layer], atol=1e-5), layer

    @contextmanager
    def not_routed(self, hook):
        yield                                    # attention runs as the model calls it: the hook never fires

    monkeypatch.setattr(Decoder, "hooked", not_routed)
    res, sums = prefill_mod.run_prefill(model, [ex], residual_layers=[0, 2, 3], on_residual=args[3],
                                        attention_layers=[1, 3], on_attention=args[5])
    assert sorted(res) == [0, 2, 3] and sorted(sums) == [1, 3]
    assert all(torch.allclose(sums[l], traced[1][l], atol=1e-5) for l in sums)
