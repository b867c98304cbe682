"""Causal tracing: the fast exact sweep against a plain nnsight loop, identities, a planted route, errors."""

import math

import nnsight
import numpy as np
import pytest
import torch

import nnsight_av as nav
from analyses import ablate, causal_trace, option_probs, option_token_ids
from analyses.options import letter_probs
from analyses.tracing import (Condition, PatchRunner, TraceResult, object_positions, random_positions,
                              rank_agreement, resolve_token_sets)
from nnsight_av.adapters.base import get_module
from nnsight_av.errors import InputError, LayerIndexError, SpanError, TokenSelectionError

OPTIONS = "ABCD"


#: Tiny models run ~10x faster on one intra-op thread when the CPU is shared (conftest `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")


def sharpen(model, seed=0, std=0.2, head=1.0):
    """Random decoder weights of std ``std`` and an LM head that writes only the answer letters.

    The default tiny model's last position hardly depends on the media (letter probabilities
    ~1/vocab, effects ~1e-7), which would make every comparison below vacuous.
    """
    g = torch.Generator().manual_seed(seed)
    ids = [i for v in option_token_ids(model.tokenizer, OPTIONS) for i in v]
    layers = get_module(model._module, model.adapter.paths["layers"])
    head_w = get_module(model._module, model.adapter.paths["lm_head"]).weight
    with torch.no_grad():
        if std:
            for p in layers.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        head_w.zero_()
        head_w[ids] = torch.randn(len(ids), head_w.shape[1], generator=g) * head
    return model


@pytest.fixture(scope="module")
def sharp():
    return sharpen(nav.testing.tiny_model(seed=0))


@pytest.fixture(scope="module")
def pair(sharp):
    clean = sharp.prepare(video=nav.testing.synthetic_frames(4.0, 2, 64), audio=nav.testing.synthetic_tone(4.0),
                          text="What is making the sound?")
    return clean, ablate(clean, "video", sharp)          # video removed: audio tokens are patched


# ---------------------------------------------------------------------------------------
# an independent reference: one nnsight trace per condition, written plainly
# ---------------------------------------------------------------------------------------
def site_of(model, layer, site):
    view = model.layers[layer]
    return {"input_layernorm": lambda: view.input_layernorm.output, "resid_pre": lambda: view.input,
            "resid_post": lambda: view.output, "attn_output": lambda: view.self_attn.output[0],
            "mlp_output": lambda: view.mlp.output}[site]()


def plain_loop(model, clean, corrupt, sets, windows, site):
    ids = option_token_ids(model.tokenizer, OPTIONS)
    every = sorted({l for w in windows for l in w})
    with torch.no_grad(), model.trace(clean):
        cached = nnsight.save([site_of(model, l, site).clone() for l in every])
        p_clean = nnsight.save(model.logits[0, -1])
    cached = dict(zip(every, cached))
    with torch.no_grad(), model.trace(corrupt):
        p_corrupt = nnsight.save(model.logits[0, -1])
    p_clean, p_corrupt = letter_probs(p_clean, ids), letter_probs(p_corrupt, ids)
    o_clean, o_corrupt = int(p_clean.argmax()), int(p_corrupt.argmax())
    out = {}
    for name, pos in sets.items():
        for w in windows:
            with torch.no_grad(), model.trace(corrupt):
                for l in w:
                    site_of(model, l, site)[:, pos] = cached[l][:, pos]
                logits = nnsight.save(model.logits[0, -1])
            p = letter_probs(logits, ids)
            out[(name, w)] = (float(p[o_clean] - p_corrupt[o_clean]), float(p_corrupt[o_corrupt] - p[o_corrupt]))
    return out, p_clean, p_corrupt


@pytest.mark.parametrize("site, windows, names", [
    ("input_layernorm", [(0,), (2,), (1, 2, 3)], ("late", "sparse")),
    ("resid_pre", [(0,), (2, 3)], ("sparse",)),
    ("attn_output", [(1,), (2, 3)], ("late",)),
    ("mlp_output", [(0,), (3,)], ("sparse",)),
])
def test_fast_sweep_equals_plain_loop(sharp, pair, site, windows, names):
    clean, corrupt = pair
    audio = clean.spans.audio
    sets = {name: {"late": audio[60:], "sparse": audio[5::17]}[name] for name in names}
    expected, _, _ = plain_loop(sharp, clean, corrupt, sets, windows, site)
    singles = [w for w in windows if len(w) == 1]
    fast = [causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=sets, site=site, window=1,
                         layers=[w[0] for w in singles], progress=False, batch_size=2)]
    fast += [causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=sets, site=site, layers=w, progress=False)
             for w in windows if len(w) > 1]
    fast = TraceResult.concat(fast)
    assert len(fast.effects) == len(expected)
    biggest = max(abs(v) for pair_ in expected.values() for v in pair_)
    assert biggest > 5e-3, "the model must react to the patch for this comparison to mean anything"
    for row in fast.effects.itertuples():
        want = expected[(row.token_set, tuple(range(row.layer_start, row.layer_end)))]
        assert row.ie_clean == pytest.approx(want[0], abs=1e-5)
        assert row.ie_corrupt == pytest.approx(want[1], abs=1e-5)


def test_exact_sweep_equals_interventions_patch(sharp, pair):
    """Cross-check with the intervention primitives (issue 3): Patch from a cached clean run."""
    import interventions as ivs

    clean, corrupt = pair
    ids = option_token_ids(sharp.tokenizer, OPTIONS)
    audio = clean.spans.audio
    sets = {"late": audio[60:], "sparse": audio[5::17]}
    for site, layers in (("input_layernorm", [1, 2, 3]),):
        ours = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=sets, site=site, layers=layers, progress=False)
        info = ours.clips["clip"]
        p_corrupt = torch.tensor(info["P_corrupt"])
        oc, ox = OPTIONS.index(info["o_clean"]), OPTIONS.index(info["o_corrupt"])
        cache = ivs.cache_activations(sharp, clean, sites=site, layers=layers)
        for row in ours.effects.itertuples():
            patch = ivs.Patch(source=cache, site=site, layers=layers, tokens=sets[row.token_set].tolist())
            p = letter_probs(ivs.run(sharp, corrupt, patch)[0, -1], ids)
            assert row.ie_clean == pytest.approx(float(p[oc] - p_corrupt[oc]), abs=1e-5)
            assert row.ie_corrupt == pytest.approx(float(p_corrupt[ox] - p[ox]), abs=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_omni_moe", "salmonn_style"])
def test_exact_sweep_on_other_adapters(model_type):
    """Qwen3-Omni (MoE, DeepStack adds visual features between layers) and a SALMONN-style Llama decoder."""
    model = sharpen(nav.testing.tiny_model(model_type, seed=0))
    clean = model.prepare(video=nav.testing.synthetic_frames(4.0, 2, 64), audio=nav.testing.synthetic_tone(4.0),
                          text="What is making the sound?")
    corrupt = ablate(clean, "video", model)
    sets = {"all": clean.spans.audio}
    # window 0-1: a suffix run from layer 0 (DeepStack's addition after layer 0 comes from the cache);
    # window 2-3 reaches the last layer: the patched positions are skipped
    exact = causal_trace(model, clean, corrupt, OPTIONS, token_sets=sets, layers=[0, 2], window=2, progress=False)
    naive = causal_trace(model, clean, corrupt, OPTIONS, token_sets=sets, layers=[0, 2], window=2, method="naive",
                         progress=False)
    diff = (exact.effects[["ie_clean", "ie_corrupt"]] - naive.effects[["ie_clean", "ie_corrupt"]]).abs()
    assert float(diff.max().max()) < 1e-5
    assert float(naive.effects[["ie_clean", "ie_corrupt"]].abs().max().max()) > 1e-3


def test_naive_method_matches_exact(sharp, pair):
    clean, corrupt = pair
    sets = {"late": clean.spans.audio[40:]}
    exact = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=sets, layers=[1, 2], progress=False)
    naive = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=sets, layers=[1, 2], method="naive",
                         progress=False)
    diff = (exact.effects[["ie_clean", "ie_corrupt"]] - naive.effects[["ie_clean", "ie_corrupt"]]).abs().max().max()
    assert diff < 1e-5


def test_continuation_from_cache_equals_full_forward(sharp, pair):
    """Starting at any layer and position from the cached corrupted run, with clean values equal to
    the corrupted ones, reproduces the corrupted forward's logits."""
    _, corrupt = pair
    runner = PatchRunner(sharp, "input_layernorm", OPTIONS)
    record = runner.record_corrupt(corrupt)
    with torch.no_grad(), sharp.trace(corrupt):
        same = nnsight.save([sharp.layers[l].input_layernorm.output[0].clone() for l in range(sharp.num_layers)])
        full = nnsight.save(sharp.logits[0, -1])
    everything = torch.arange(len(corrupt))
    from analyses.tracing import CleanRecord

    as_clean = CleanRecord(record.probs, everything, dict(enumerate(same)))
    for start in (0, 2, 3):
        for first in (0, int(corrupt.spans.video[0]), len(corrupt) - 5):
            cond = Condition("x", torch.arange(first, len(corrupt)), tuple(range(start, sharp.num_layers)))
            with torch.no_grad():
                logits = runner._run_batch(as_clean, record, [cond])
            assert torch.allclose(logits[0], full, atol=1e-5), (start, first)


def test_skipping_overwritten_positions_is_exact(sharp, pair, monkeypatch):
    clean, corrupt = pair
    calls = []
    real = PatchRunner._run_skipping
    monkeypatch.setattr(PatchRunner, "_run_skipping",
                        lambda self, *a: (calls.append([c.window for c in a[-1]]), real(self, *a))[1])
    audio = clean.spans.audio
    # sets of different sizes (rows of different widths in one batch), one patching the last position
    sets = {"all": audio, "with_last": torch.cat([audio[::20], torch.tensor([len(clean) - 1])]),
            "late": audio[-7:], "video": clean.spans.video[::3]}
    cols = ["ie_clean", "ie_corrupt"]
    for site in ("input_layernorm",):      # resid_pre's skipping run is in test_fast_sweep_equals_plain_loop
        kw = dict(token_sets=sets, site=site, layers=[1, 2], window=2, progress=False)
        fast = causal_trace(sharp, clean, corrupt, OPTIONS, batch_size=4, **kw)
        assert sorted(w for batch in calls for w in batch) == ["2-3"] * 4     # the windows reaching the last layer
        assert max(len(batch) for batch in calls) > 1                          # some ran together
        calls.clear()
        alone = causal_trace(sharp, clean, corrupt, OPTIONS, batch_size=1, **kw)
        assert [len(batch) for batch in calls] == [1] * 4
        full = causal_trace(sharp, clean, corrupt, OPTIONS, skip_overwritten=False, **kw)
        diff = (fast.effects[cols] - full.effects[cols]).abs().max().max()
        assert diff < 1e-5 and full.effects.ie_clean.abs().max() > 1e-2
        assert float((alone.effects[cols] - full.effects[cols]).abs().max().max()) < 1e-5


def test_skipping_batches_cut_where_padding_and_forwards_cost_least(sharp, pair):
    clean, corrupt = pair
    runner = PatchRunner(sharp, "input_layernorm", OPTIONS)
    record = runner.record_corrupt(corrupt, [0, 2])
    total, layers = len(corrupt), tuple(range(2, sharp.num_layers))
    wide = [Condition(str(k), torch.tensor([5 + k]), layers) for k in range(3)]            # ~total rows each
    narrow = [Condition("n", torch.arange(5, total - 1), layers)]                          # one row
    other_start = [Condition("o", torch.tensor([5]), tuple(range(0, sharp.num_layers)))]
    conds = wide + narrow + other_start
    batches = runner._skipping_batches(record, conds, range(len(conds)), batch_size=4)
    assert sorted(map(sorted, batches)) == [[0, 1, 2], [3], [4]]   # the one-row condition is not padded to ~total
    pairs = runner._skipping_batches(record, conds, range(len(conds)), batch_size=2)
    assert max(map(len, pairs)) == 2 and [3] in pairs and sorted(i for b in pairs for i in b) == list(range(5))


def test_clean_record_riding_on_the_sink_prefill(sharp, pair):
    """The pipeline takes the clean run from the sink analysis' prefill (which stops inside the
    last layer) and finishes the last layer for the last position: same record as a clean forward."""
    from analyses.runner import PipelineConfig, pipeline_sinks

    clean, _ = pair
    media = clean.spans.media
    runner = PatchRunner(sharp, "input_layernorm", OPTIONS)
    alone = runner.record_clean(clean, media, range(sharp.num_layers))
    fused, (sinks, split) = runner.record_clean_during(
        lambda: pipeline_sinks(sharp, clean, PipelineConfig(sink_dims=[0, 1], tau=2.0)), clean, media, range(sharp.num_layers))
    assert torch.allclose(fused.probs, alone.probs, atol=1e-6)
    for layer in range(sharp.num_layers):
        assert torch.equal(fused.values[layer], alone.values[layer])
    assert all(torch.equal(fused.keys[k], alone.keys[k]) for k in alone.keys)
    assert sinks.length == len(clean) and split is not None


def test_all_media_at_all_layers_restores_the_clean_run(sharp, pair):
    clean, corrupt = pair
    for site in ("input_layernorm", "resid_pre"):
        res = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets={"media": clean.spans.media}, site=site,
                           progress=False)
        info = res.clips["clip"]
        p_clean, p_corrupt = torch.tensor(info["P_clean"]), torch.tensor(info["P_corrupt"])
        oc, ox = OPTIONS.index(info["o_clean"]), OPTIONS.index(info["o_corrupt"])
        row = res.effects.iloc[0]
        assert abs(float(p_clean[oc] - p_corrupt[oc])) > 1e-2
        assert row.ie_clean == pytest.approx(float(p_clean[oc] - p_corrupt[oc]), abs=1e-5)
        assert row.ie_corrupt == pytest.approx(float(p_corrupt[ox] - p_clean[ox]), abs=1e-5)


def test_empty_token_set_has_zero_effect(sharp, pair):
    clean, corrupt = pair
    res = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets={"none": [], "all": clean.spans.audio},
                       layers=[0, 3], window=1, progress=False)
    empty = res.effects[res.effects.token_set == "none"]
    assert len(empty) == 2 and (empty.n_tokens == 0).all()
    assert (empty.ie_clean == 0).all() and (empty.ie_corrupt == 0).all()
    # a sink set that comes out empty (no token crosses tau) behaves the same, and so does its random control
    res = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=["sink", "random"],
                       sink_options={"dims": [0], "tau": 1e9}, progress=False)
    assert (res.effects.n_tokens == 0).all() and (res.effects.ie_clean == 0).all()


def test_random_sets_reproducible_and_seeded(sharp, pair):
    clean, corrupt = pair
    pool = clean.spans.audio
    a = random_positions(pool, 12, seed=3, clip="c", name="random")
    assert a.tolist() == random_positions(pool, 12, seed=3, clip="c", name="random").tolist()
    assert a.tolist() != random_positions(pool, 12, seed=4, clip="c", name="random").tolist()
    assert a.tolist() != random_positions(pool, 12, seed=3, clip="d", name="random").tolist()
    assert len(set(a.tolist())) == 12 and set(a.tolist()) <= set(pool.tolist())
    sinks = {"audio": pool[::9].tolist()}
    draw = lambda seed: resolve_token_sets(clean, "audio", ["sink", "random"], sinks=sinks, seed=seed)  # noqa: E731
    assert draw(1)["random"].tolist() == draw(1)["random"].tolist() != draw(2)["random"].tolist()
    r1 = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=["sink", "random"], sinks=sinks, seed=1,
                      clips="clip", progress=False)
    sets1 = r1.clips["clip"]["token_sets"]
    assert sets1["random"] == random_positions(pool, len(sinks["audio"]), 1, "clip", "random").tolist()
    assert len(sets1["random"]) == len(sets1["sink"]) == len(sinks["audio"])


class PlantedRoute:
    """Information about the audio written into chosen video tokens, read from there by the answer.

    The write (on the vision encoder's output): route tokens get ``alpha * (audio mean - silence
    mean)``. The read (at layer ``m``): the last position's attention output gets ``beta`` times
    the mean of the route tokens' normalised states, a hand-made attention head. It keeps the
    states of positions it does not see in a call (a suffix-only run) from the last full run,
    as a KV cache would, so it is causal like the model itself.
    """

    def __init__(self, model, clean, route_index, layer, alpha=20.0, beta=30.0):
        self.model, self.length, self.hidden = model, len(clean), model.hidden_size
        self.index = route_index
        self.positions = clean.spans.video[route_index]
        self.alpha, self.beta, self.layer = alpha, beta, layer
        self.center, self.audio, self.store, self.read = 0.0, None, None, None

    def install(self):
        root, paths = self.model._module, self.model.adapter.paths
        layer = get_module(root, paths["layers"])[self.layer]
        self.handles = [get_module(root, paths["audio_encoder"]).register_forward_hook(self.on_audio),
                        get_module(root, paths["vision_encoder"]).register_forward_hook(self.on_video),
                        layer.input_layernorm.register_forward_hook(self.on_norm),
                        layer.self_attn.register_forward_hook(self.on_attention)]
        return self

    def remove(self):
        for h in self.handles:
            h.remove()

    def on_audio(self, module, args, out):
        self.audio = self.model.adapter.encoder_tokens("audio_encoder", out).mean(0)

    def on_video(self, module, args, out):
        tokens = self.model.adapter.encoder_tokens("vision_encoder", out)
        tokens[self.index] += self.alpha * (self.audio - self.center)

    def on_norm(self, module, args, out):
        n = out.shape[1]
        if n == self.length:
            if out.shape[0] == 1:
                self.store = out.detach()[0].clone()
            full = out
        else:
            full = self.store.expand(out.shape[0], self.length, self.hidden).clone()
            full[:, self.length - n:] = out
        self.read = full[:, self.positions].mean(1)

    def on_attention(self, module, args, out):
        delta = torch.zeros_like(out[0])
        delta[:, -1] = self.beta * self.read
        return (out[0] + delta,) + tuple(out[1:])


def test_planted_cross_modal_route_gets_the_largest_effect():
    model = sharpen(nav.testing.tiny_model(seed=0), std=0.0)       # random decoder, letter-only head
    clean = model.prepare(video=nav.testing.synthetic_frames(4.0, 2, 64), audio=nav.testing.synthetic_tone(4.0),
                          text="What is making the sound?")
    corrupt = ablate(clean, "audio", model)                        # audio-dominant: video tokens patched
    route = PlantedRoute(model, clean, torch.tensor([9, 10, 11]), layer=2).install()
    try:
        option_probs(model, corrupt, OPTIONS)                      # the silence's audio mean is the reference
        route.center = route.audio.clone()
        video = clean.spans.video
        others = [p for p in video.tolist() if p not in set(route.positions.tolist())]
        rng = np.random.default_rng(0)
        sets = {"route": route.positions, "first": video[:3], "last": video[-3:],
                "random": sorted(rng.choice(others, 3, replace=False).tolist()), "all": video}
        # the hand-made head reads positions by offset, so every position must be computed
        res = causal_trace(model, clean, corrupt, OPTIONS, token_sets=sets, skip_overwritten=False, progress=False)
        info = res.clips["clip"]
        assert info["o_clean"] != info["o_corrupt"]                # the route decides the answer
        ie = res.effects.set_index("token_set").ie_clean
        total = info["P_clean"][OPTIONS.index(info["o_clean"])] - info["P_corrupt"][OPTIONS.index(info["o_clean"])]
        assert ie["route"] > 0.8 * total and ie["all"] > 0.8 * total
        for name in ("first", "last", "random"):
            assert ie["route"] > ie[name] + 0.5 * total
        assert ie.idxmax() in ("route", "all")
        # layer by layer: only windows holding the read layer restore the answer; fast == plain loop
        sweep = causal_trace(model, clean, corrupt, OPTIONS, token_sets={"route": route.positions}, window=1,
                             progress=False)
        by_layer = sweep.effects[sweep.effects.token_set == "route"].set_index("layer_start").ie_clean
        assert by_layer.idxmax() == 2 and by_layer[2] > 0.8 * total
        expected, _, _ = plain_loop(model, clean, corrupt, {"route": route.positions}, [(2,)], "input_layernorm")
        assert by_layer[2] == pytest.approx(expected[("route", (2,))][0], abs=1e-5)
    finally:
        route.remove()


@pytest.mark.parametrize("site", ["input_layernorm", "resid_pre"])   # resid_pre of layer 0: the graph's own root
def test_attribution_is_first_order_exact(sharp, site):
    """Nearly identical clean and corrupt inputs: the first-order estimate matches exact patching."""
    clean = sharp.prepare(video=nav.testing.synthetic_frames(4.0, 2, 64), audio=nav.testing.synthetic_tone(4.0),
                          text="What is making the sound?")
    wave = clean.request.audio * 0.999 + 1e-4 * np.random.default_rng(0).standard_normal(len(clean.request.audio))
    corrupt = sharp.prepare_request(clean.request.with_media(audio=wave.astype(np.float32)))
    audio = clean.spans.audio
    # the audio differs, so audio tokens are patched (the "dominant" modality named here is video)
    kw = dict(token_sets={"all": audio, "half": audio[50:], "few": audio[::10]}, layers=[0, 2], window=1,
              dominant="video", progress=False, site=site)
    exact = causal_trace(sharp, clean, corrupt, OPTIONS, **kw)
    approx = causal_trace(sharp, clean, corrupt, OPTIONS, method="attribution", **kw)
    for name in ("ie_clean", "ie_corrupt"):
        scale = exact.effects[name].abs().max()
        assert scale > 1e-5
        assert (exact.effects[name] - approx.effects[name]).abs().max() < 0.05 * scale
    agreement = exact.agreement(approx)
    assert agreement["ie_clean"] > 0.9 and agreement["rows"] == len(exact.effects)


def test_attribution_on_a_real_pair_reports_agreement(sharp, pair):
    clean, corrupt = pair
    sets = {"all": clean.spans.audio, "half": clean.spans.audio[50:], "few": clean.spans.audio[::10]}
    exact = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=sets, layers=[0, 2], window=1, progress=False)
    approx = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=sets, layers=[0, 2], window=1,
                          method="attribution", progress=False)
    agreement = rank_agreement(exact, approx)
    assert agreement["rows"] == 6 and -1 <= agreement["ie_clean"] <= 1
    assert approx.clips["clip"]["P_corrupt"] == pytest.approx(exact.clips["clip"]["P_corrupt"], abs=1e-6)


def test_object_tokens_from_masks_and_times(sharp):
    clean = sharp.prepare(video=nav.testing.synthetic_frames(4.0, 2, 112), audio=nav.testing.synthetic_tone(4.0),
                          text="What is making the sound?")
    t, h, w = (int(v) for v in clean.data["video_grid_thw"][0])
    rows, cols = h // 2, w // 2
    frames = clean.request.video.shape[0]
    masks = np.zeros((frames, 112, 112), dtype=bool)
    masks[:, :, :56] = True                                        # the left half, in every frame
    masks[2:4] = False                                             # ... but not in temporal patch 1
    found = object_positions(clean, "video", {"video_masks": masks})
    video = clean.spans.video.tolist()
    expected = [video[k] for k in range(len(video)) if (k // (rows * cols)) != 1 and (k % cols) < cols // 2]
    assert found.tolist() == expected
    one_frame = object_positions(clean, "video", {"video_masks": masks[3] | masks[0]})   # a single [H, W] mask
    assert len(one_frame) == len(video) // 2
    audio = object_positions(clean, "audio", {"audio_times": [[2.5, 3.0]]})
    assert audio.tolist() == clean.spans.chunks[1].audio.tolist()
    both = object_positions(clean, "audio", {"audio_times": [[0.0, 0.1]], "positions": [int(clean.spans.video[0])]})
    assert both.tolist() == clean.spans.chunks[0].audio.tolist()    # positions of the other modality are dropped
    sets = resolve_token_sets(clean, "video", ["object"], objects={"video_masks": masks})
    assert sets["object"].tolist() == expected


def test_token_sets_from_sinks_and_split(sharp, pair):
    clean, corrupt = pair
    res = causal_trace(sharp, clean, corrupt, OPTIONS, progress=False, sink_options={"dims": [0, 1], "tau": 2.0})
    sets = res.clips["clip"]["token_sets"]
    audio = set(clean.spans.audio.tolist())
    assert set(res.effects.token_set) == {"all", "sink", "random", "cross_modal_sink", "unimodal_sink",
                                          "random_cross_modal_sink"}
    assert sets["sink"] and set(sets["sink"]) <= audio
    assert sorted(sets["cross_modal_sink"] + sets["unimodal_sink"]) == sets["sink"]
    assert len(sets["random"]) == len(sets["sink"])
    assert len(sets["random_cross_modal_sink"]) == len(sets["cross_modal_sink"])
    assert set(sets["random"]) <= audio and sets["all"] == sorted(audio)


def test_bad_inputs(sharp, pair):
    clean, corrupt = pair
    with pytest.raises(TokenSelectionError, match="single token"):
        causal_trace(sharp, clean, corrupt, ["A", "dog"], token_sets=["all"], progress=False)
    other = sharp.prepare(video=nav.testing.synthetic_frames(2.0, 2, 64), audio=nav.testing.synthetic_tone(2.0),
                          text="What is making the sound?")
    with pytest.raises(SpanError, match="token layouts"):
        causal_trace(sharp, clean, other, OPTIONS, token_sets=["all"], dominant="audio", progress=False)
    with pytest.raises(InputError, match="site"):
        causal_trace(sharp, clean, corrupt, OPTIONS, site="q_proj", progress=False)
    with pytest.raises(InputError, match="token set"):
        causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=["sinks"], progress=False)
    with pytest.raises(LayerIndexError):
        causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=["all"], layers=[7], progress=False)
    with pytest.raises(InputError, match="window"):
        causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=["all"], window=0, progress=False)
    with pytest.raises(InputError, match="which modality"):
        causal_trace(sharp, clean, clean, OPTIONS, token_sets=["all"], progress=False)
    with pytest.raises(TokenSelectionError, match="outside"):
        causal_trace(sharp, clean, corrupt, OPTIONS, token_sets={"x": [len(clean) + 3]}, progress=False)
    with pytest.raises(InputError, match="objects"):
        causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=["object"], progress=False)
    with pytest.raises(InputError, match="method"):
        causal_trace(sharp, clean, corrupt, OPTIONS, method="fast", progress=False)


def test_several_clips_and_result_round_trip(sharp, pair, tmp_path):
    clean, corrupt = pair
    other = sharp.prepare(video=nav.testing.synthetic_frames(4.0, 2, 64, seed=5),
                          audio=nav.testing.synthetic_tone(4.0, freq=250.0), text="What is making the sound?")
    res = causal_trace(sharp, [clean, other], [corrupt, ablate(other, "video", sharp)], OPTIONS,
                       token_sets={"all": "all", "early": lambda ex: ex.spans.audio[:20]}, layers=[0, 2],
                       window=2, clips=["x", "y"], progress=False)
    assert list(res.frame.index.names) == ["clip", "token_set", "window"]
    assert res.frame.loc[("y", "early", "0-1")].n_tokens == 20
    table = res.table()
    assert list(table.index) == ["all", "early"]
    assert table.loc["all", "IE_clean"] == pytest.approx(100 * res.effects[res.effects.token_set == "all"]
                                                         .ie_clean.mean())
    assert res.table(by=["token_set", "window"]).shape[0] == 4      # windows 0-1 and 2-3
    for path in (tmp_path / "r.json", tmp_path / "r.jsonl"):
        res.save(path)
        back = TraceResult.load(path)
        assert back.effects.equals(res.effects) and back.clips == res.clips
    import matplotlib

    assert isinstance(res.plot_bars(), matplotlib.figure.Figure)
    assert isinstance(res.plot_heatmap("ie_corrupt"), matplotlib.figure.Figure)
    assert math.isfinite(res.agreement(res)["ie_clean"])


# ---------------------------------------------------------------------------------------
# a user's own interventions in every forward of the trace
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "naive"])
def test_trace_with_extra_interventions_equals_composed_primitives(sharp, pair, method):
    """``causal_trace(..., interventions=iv)`` = the trace of the model with ``iv`` applied, written with primitives."""
    import interventions as ivs

    clean, corrupt = pair
    audio = clean.spans.audio
    sets = {"first": audio[:5], "late": audio[-7:]}
    iv = [ivs.AttentionKnockout(queries="text", keys="video", heads=[0], layers=[1, 2]),
          ivs.Zero(site="mlp_output", layers=3, tokens="audio")]
    res = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=sets, window=2, method=method, progress=False,
                       interventions=iv)
    plain = causal_trace(sharp, clean, corrupt, OPTIONS, token_sets=sets, window=2, method=method, progress=False)
    ids = option_token_ids(sharp.tokenizer, OPTIONS)
    probs = lambda logits: letter_probs(logits[0, -1], ids)  # noqa: E731
    p_clean = probs(ivs.run(sharp, clean, iv))
    p_corrupt = probs(ivs.run(sharp, corrupt, iv))
    k_clean, k_corrupt = int(p_clean.argmax()), int(p_corrupt.argmax())
    for row in res.effects.itertuples():
        window = range(row.layer_start, row.layer_end)
        patch = ivs.Patch(source=0, site="input_layernorm", layers=window, tokens=sets[row.token_set])
        p_patched = probs(ivs.run(sharp, [clean, corrupt], iv + [patch])[1])
        assert row.ie_clean == pytest.approx(float(p_patched[k_clean] - p_corrupt[k_clean]), abs=1e-5)
        assert row.ie_corrupt == pytest.approx(float(p_corrupt[k_corrupt] - p_patched[k_corrupt]), abs=1e-5)
    assert not np.allclose(res.effects["ie_clean"], plain.effects["ie_clean"], atol=1e-4)


def test_extra_interventions_may_not_edit_the_patched_site(sharp, pair):
    import interventions as ivs

    with pytest.raises(InputError, match="patched site 'input_layernorm'"):
        causal_trace(sharp, *pair, OPTIONS, token_sets={"a": pair[0].spans.audio[:3]}, progress=False,
                     interventions=ivs.Zero(site="input_layernorm", layers=0, tokens="video"))
