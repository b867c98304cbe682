"""Sink dimensions and sink tokens against planted ground truth and a plain re-implementation."""

from __future__ import annotations

import io
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import analyses
import nnsight_av as nav
from analyses.sinks import SinkResult, select_global_sinks
from nnsight_av.errors import InputError, LayerIndexError, TokenSelectionError

CHANNEL = 7
TAU = 5.0          # phi is at most sqrt(hidden) = 8 in the tiny model; a planted channel reaches ~8


@pytest.fixture(scope="module")
def model(tiny):
    return tiny


@pytest.fixture(scope="module")
def ex(av_example):
    return av_example


@pytest.fixture(scope="module")
def ex_short(model):
    return model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
                         text="Describe what you hear")


@contextmanager
def planted(model, plan: dict[int, list[int]], channel: int = CHANNEL, value: float = 100.0):
    """Make ``channel`` of every decoder layer's input 0, except ``value`` at ``plan[layer]`` positions."""
    def hook(index):
        def pre(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h[..., channel] = 0.0
            positions = [p for p in plan.get(index, []) if p < h.shape[1]]   # shorter inputs: what fits
            if positions:
                h[:, positions, channel] = value
        return pre

    handles = [model.layers[l]._module.register_forward_pre_hook(hook(l), with_kwargs=True)
               for l in range(model.num_layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def naive_hidden_states(model, ex):
    with torch.no_grad():
        out = model._module(**ex.data, output_hidden_states=True, use_cache=False)
    return [out.hidden_states[l][0] for l in range(model.num_layers)]


def naive_mask(hidden, dims, tau):
    """The RMS sink test written out with Python floats."""
    mask = []
    for h in hidden:
        row = []
        for t in range(h.shape[0]):
            values = h[t].tolist()
            rms = math.sqrt(sum(x * x for x in values) / len(values) + 1e-6)
            row.append(max(abs(values[d]) / rms for d in dims) > tau)
        mask.append(row)
    return torch.tensor(mask)


def naive_top_k(mask, k):
    """Global sinks by sorting (count desc, first sink layer, position)."""
    layers, length = mask.shape
    rows = []
    for p in range(length):
        hits = [l for l in range(layers) if mask[l, p]]
        if hits:
            rows.append((-len(hits), hits[0], p))
    return [p for _, _, p in sorted(rows)[:k]]


def plan_for(ex):
    """Layer -> planted positions, with known counts and ties (see the ranking in the test)."""
    v0, v1 = int(ex.spans.video[2]), int(ex.spans.video[5])
    a0, a1 = int(ex.spans.audio[5]), int(ex.spans.audio[7])
    t1 = int(ex.spans.prompt[1])
    plan = {0: [v0, v1], 1: [0, v0, a0], 2: [0, v0, a0, a1], 3: [0, v0, a0, a1, v1, t1]}
    # counts: v0 4 (first 0); 0 3 (1); a0 3 (1); v1 2 (0); a1 2 (2); t1 1 (3)
    return plan, [v0, 0, a0, v1, a1, t1]


def test_phi_and_sink_scores_match_plain_formula():
    h = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    got = analyses.phi(h)
    for i in range(3):
        for t in range(5):
            values = h[i, t].float().tolist()
            rms = math.sqrt(sum(x * x for x in values) / 16 + 1e-6)
            assert got[i, t].tolist() == pytest.approx([abs(x) / rms for x in values], rel=1e-5)
    scores = analyses.sink_scores(h, [2, 9])
    assert torch.allclose(scores, got[..., [2, 9]].amax(-1), rtol=1e-5)
    assert scores.dtype == torch.float32


def test_planted_channel_is_found_and_marks_exactly_the_planted_positions(model, ex, ex_short):
    plan, _ = plan_for(ex)
    with planted(model, plan):
        dims = analyses.find_sink_dims(model, [ex, ex_short], progress=False)
        res = analyses.find_sinks(model, ex, dims=dims, tau=TAU)
        hidden = naive_hidden_states(model, ex)
    assert dims == [CHANNEL]
    expected = torch.zeros(model.num_layers, len(ex), dtype=torch.bool)
    for layer, positions in plan.items():
        expected[layer, positions] = True
    assert torch.equal(res.mask, expected)
    assert torch.equal(naive_mask(hidden, dims, TAU), expected)
    assert res.layers == list(range(model.num_layers)) and res.dims == [CHANNEL]
    # the library's scores are phi itself, not just a thresholded flag
    for layer in range(model.num_layers):
        values = hidden[layer][plan[3][0]].tolist()
        rms = math.sqrt(sum(x * x for x in values) / len(values) + 1e-6)
        assert float(res.scores[layer, plan[3][0]]) == pytest.approx(abs(values[CHANNEL]) / rms, rel=1e-5)


def test_unplanted_random_model_has_no_sink_dims(model, ex):
    assert analyses.find_sink_dims(model, ex, progress=False) == []


def test_global_sinks_rank_ties_and_modality_split(model, ex):
    plan, ranking = plan_for(ex)
    v0, zero, a0, v1, a1, t1 = ranking
    with planted(model, plan):
        res = analyses.find_sinks(model, ex, dims=[CHANNEL], tau=TAU, k=3)
    assert res.ranked.tolist() == [v0, zero, a0]
    assert res.video.tolist() == [v0] and res.audio.tolist() == [a0]
    assert res.dropped_text.tolist() == [0]          # kept text is dropped but used up one of K
    assert res.positions.tolist() == sorted([v0, a0])
    five = res.with_params(k=5)
    assert five.ranked.tolist() == [v0, zero, a0, v1, a1]
    assert five.video.tolist() == sorted([v0, v1]) and five.audio.tolist() == sorted([a0, a1])
    # K larger than the sequence: every position that is a sink somewhere, nothing more
    everything = res.with_params(k=10 * len(ex))
    assert everything.ranked.tolist() == ranking
    assert everything.dropped_text.tolist() == [0, t1]
    # K = int(T / N)
    for n in (2, 3, 4):
        assert res.with_params(k_divide=n, k=None).K == int(len(ex) / n)
    assert res.counts[v0] == 4 and res.first_layer[a1] == 2 and res.first_layer[1] == -1


@pytest.mark.parametrize("seed", range(5))
def test_top_k_aggregation_matches_naive_sort(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(6, 40, generator=gen) < torch.rand(1, 40, generator=gen) * 0.6
    for k in (0, 1, 5, 17, 40, 100):
        assert select_global_sinks(mask, k).tolist() == naive_top_k(mask, k)


def test_nothing_crosses_tau_gives_an_empty_result(model, ex):
    res = analyses.find_sinks(model, ex, dims=[CHANNEL], tau=1e6)
    assert res.ranked.numel() == 0 and res.positions.numel() == 0
    assert res.video.numel() == 0 and res.audio.numel() == 0
    assert not torch.isnan(res.scores).any()
    assert len(res.to_frame()) == 0
    mds = analyses.modality_dominance(model, ex, res)
    assert mds.positions.numel() == 0 and mds.mds.numel() == 0
    assert not mds.summary()["n"].any()


def test_batched_and_list_inputs_equal_single_runs(model, ex, ex_short):
    single = [analyses.find_sinks(model, item, dims=[1, CHANNEL], tau=2.0) for item in (ex, ex_short)]
    batched = analyses.find_sinks(model, [ex, ex_short], dims=[1, CHANNEL], tau=2.0, batch_size=2, progress=False)
    assert isinstance(batched, list) and len(batched) == 2
    for a, b in zip(single, batched):
        assert a.length == b.length
        assert torch.allclose(a.scores, b.scores, atol=1e-5)


def test_json_roundtrip_views_and_plot(model, ex, tmp_path):
    plan, _ = plan_for(ex)
    with planted(model, plan):
        res = analyses.find_sinks(model, ex, dims=[CHANNEL], tau=TAU, k_divide=3)
    back = SinkResult.from_json(res.to_json())
    assert torch.equal(back.mask, res.mask) and back.ranked.tolist() == res.ranked.tolist()
    assert back.dims == res.dims and back.tau == res.tau and back.k_divide == 3
    path = tmp_path / "sinks.json"
    res.to_json(path)
    assert SinkResult.from_json(path).positions.tolist() == res.positions.tolist()
    frame = res.to_frame()
    assert list(frame["position"]) == res.ranked.tolist()
    assert set(frame["modality"]) <= {"video", "audio", "text"}
    assert "SinkResult" in res._repr_html_() and "video=" in repr(res)
    fig = res.plot()
    fig.savefig(io.BytesIO(), format="png")
    assert fig.axes[1].get_ylabel() == "layer"


def test_default_dims_tau_and_clear_errors(model, ex):
    class Known(type(model.adapter)):
        sink_dims = {model.hidden_size: [CHANNEL, 3]}
        sink_tau = {model.hidden_size: 4.0}

    original = model.adapter.__class__
    model.adapter.__class__ = Known
    try:
        assert analyses.resolve_sink_dims(model) == [3, CHANNEL]
        res = analyses.find_sinks(model, ex)
        assert res.dims == [3, CHANNEL] and res.tau == 4.0
        assert analyses.resolve_sink_dims(model, [5]) == [5]      # an explicit override wins
    finally:
        model.adapter.__class__ = original
    with pytest.raises(InputError, match="k_divide"):
        analyses.find_sinks(model, ex, dims=[1], k_divide=0)
    with pytest.raises(InputError, match="out of range"):
        analyses.find_sinks(model, ex, dims=[model.hidden_size])
    with pytest.raises(InputError, match="AVInputs"):
        analyses.find_sinks(model, "a prompt", dims=[1])
    with pytest.raises(LayerIndexError):
        analyses.find_sinks(model, ex, dims=[1], layers=[model.num_layers])
    with pytest.raises(nav.AdapterError, match="sink dims"):
        analyses.resolve_sink_dims(model)
    with pytest.raises(TokenSelectionError):
        analyses.column_attention(model, ex, [len(ex)], layers=[0])


def test_layer_subset_counts_only_those_layers(model, ex):
    plan, _ = plan_for(ex)
    with planted(model, plan):
        res = analyses.find_sinks(model, ex, dims=[CHANNEL], tau=TAU, layers=[3, 1])
    assert res.layers == [1, 3]
    assert sorted(np.nonzero(res.mask[0].numpy())[0].tolist()) == sorted(plan[1])
    assert int(res.counts.max()) == 2
