"""Controls: matched random token sets, the planted-route ground truth, the length control, ASD's costs."""

import warnings

import numpy as np
import pytest
import torch

import nnsight_av as nav
from analyses import ablate, causal_trace, option_probs
from analyses.controls import (MATCHED_TOKEN_SETS, ControlWarning, LengthControlResult, length_control, match_report,
                               matched_random_positions, planted_route, strata)
from analyses.tracing import registered_token_sets, resolve_token_sets
from nnsight_av.errors import InputError, TokenSelectionError

PROMPT = "What is making the sound?\nA. dog\nB. cat\nC. car\nD. bird\nRespond with one letter."


@pytest.fixture(scope="module")
def long_clip(tiny):
    # 6 s at 112 px: 3 chunks of 32 video and 50 audio tokens
    return tiny.prepare(video=nav.testing.synthetic_frames(6.0, 2, 112, seed=3), audio=nav.testing.synthetic_tone(6.0),
                        text=PROMPT)


def _sink_like(ex, seed=0):
    """A skewed 'sink set': 5 video tokens packed early in chunk 0, 2 late in chunk 2, 3 audio tokens of chunk 1."""
    video, audio = ex.spans.video, ex.spans.audio
    return torch.cat([video[[0, 1, 2, 4, 6]], video[[-3, -1]], audio[[52, 60, 70]]])


# -- matched random sets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("match", ["modality", "chunk", "position", "rank"])
def test_matched_set_keeps_strata_and_is_disjoint(long_clip, match):
    ref = _sink_like(long_clip)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ControlWarning)          # the pool is large enough: no relaxing
        control = matched_random_positions(long_clip, ref, match, seed=1, clip="c")
    assert control.numel() == ref.numel()
    assert not set(control.tolist()) & set(ref.tolist())
    labels = long_clip.spans.modality_of()
    kept = {"modality": ["modality"], "chunk": ["modality", "chunk"], "position": ["modality", "position"],
            "rank": ["modality"]}[match]
    for by in kept:
        assert strata(long_clip, control, by) == strata(long_clip, ref, by), by
    if match == "rank":             # nearest rank: every control token is within a few ranks of a reference token
        rank = {p: i for m in ("video", "audio") for i, p in enumerate(getattr(long_clip.spans, m).tolist())}
        gaps = sorted(min(abs(rank[c] - rank[r]) for r in ref.tolist() if labels[r] == labels[c])
                      for c in control.tolist())
        assert max(gaps) <= 3
    report = match_report(long_clip, ref, control, kept[-1])
    assert (report["reference"] == report["control"]).all() and (report["shared"] == 0).all()


def test_matched_set_is_seeded(long_clip):
    ref = _sink_like(long_clip)
    a = matched_random_positions(long_clip, ref, "position", seed=0, clip="x")
    assert torch.equal(a, matched_random_positions(long_clip, ref, "position", seed=0, clip="x"))
    others = {tuple(matched_random_positions(long_clip, ref, "position", seed=s, clip="x").tolist()) for s in range(6)}
    assert len(others) > 1


def test_position_bins_follow_the_reference(long_clip):
    video = long_clip.spans.video
    ref = video[[0, 2, 4, 6, 8, 10, 12]]     # 96 video tokens, deciles of 9.6 ranks: 5 in bin 0, 2 in bin 1
    control = matched_random_positions(long_clip, ref, "position", seed=0)
    assert strata(long_clip, control, "position") == strata(long_clip, ref, "position") == {("video", 0): 5,
                                                                                            ("video", 1): 2}
    # the count-matched draw of today's `random` lands all over the span
    spread = matched_random_positions(long_clip, ref, "count", seed=0)
    assert strata(long_clip, spread, "position") != strata(long_clip, ref, "position")


def test_too_small_pool(tiny, av_example):
    video = av_example.spans.video                       # 16 video tokens, 8 per chunk
    ref = video[:7]                                      # 7 of chunk 0's 8
    with pytest.warns(ControlWarning, match="neighbouring stratum"):
        near = matched_random_positions(av_example, ref, "chunk", seed=0)
    assert near.numel() == 7 and not set(near.tolist()) & set(ref.tolist())
    assert strata(av_example, near, "chunk") == {("video", 0): 1, ("video", 1): 6}
    shrunk = matched_random_positions(av_example, ref, "chunk", seed=0, on_short="shrink")
    assert shrunk.tolist() == [int(video[7])]
    with pytest.raises(TokenSelectionError, match="stratum"):
        matched_random_positions(av_example, ref, "chunk", on_short="error")
    everything = video[:12]                              # 12 of 16: only 4 non-reference video tokens exist
    with pytest.warns(ControlWarning, match="overlaps"):
        full = matched_random_positions(av_example, everything, "modality", seed=0)
    assert full.numel() == 12 and len(set(full.tolist()) - set(everything.tolist())) == 4


def test_bad_arguments(av_example):
    with pytest.raises(InputError, match="match must be"):
        matched_random_positions(av_example, av_example.spans.video[:2], "chunks")
    with pytest.raises(InputError, match="on_short"):
        matched_random_positions(av_example, av_example.spans.video[:2], on_short="drop")
    with pytest.raises(TokenSelectionError, match="outside"):
        matched_random_positions(av_example, [10_000])
    assert matched_random_positions(av_example, []).numel() == 0


def test_chunk_matching_needs_chunks(tiny):
    video_only = tiny.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), text="hi", use_audio_in_video=False)
    assert not video_only.spans.chunks
    with pytest.raises(InputError, match="no interleaved"):
        matched_random_positions(video_only, video_only.spans.video[:2], "chunk")
    assert matched_random_positions(video_only, video_only.spans.video[:2], "position", bins=2).numel() == 2


def test_registered_as_token_sets(tiny, long_clip):
    assert {"random_chunk", "random_position", "random_rank_cross_modal_sink"} <= set(registered_token_sets())
    assert registered_token_sets()["random_position_unimodal_sink"] == "unimodal_sink"
    sinks = {"video": long_clip.spans.video[[0, 1, 2, 40, 90]], "audio": []}
    sets = resolve_token_sets(long_clip, "video", ["sink", "random_chunk", "random_position"], sinks=sinks, seed=3,
                              clip="c")
    for name in ("random_chunk", "random_position"):
        match = MATCHED_TOKEN_SETS[name][0]
        assert strata(long_clip, sets[name], match) == strata(long_clip, sets["sink"], match)
        assert not set(sets[name].tolist()) & set(sets["sink"].tolist())
    # inside causal_trace the sinks are found when a matched set needs them
    res = causal_trace(tiny, long_clip, ablate(long_clip, "audio", tiny), "ABCD",
                       token_sets=["sink", "random_chunk"], sink_options={"dims": [0, 1], "tau": 2.0}, progress=False)
    n = res.effects.set_index("token_set")["n_tokens"]
    assert n["sink"] == n["random_chunk"] > 0


# -- the planted route: a ground truth ---------------------------------------------------------------------------
def _full_effect(model, clean, corrupt, options="ABCD"):
    p_clean = option_probs(model, [clean], options)[0]
    p_corrupt = option_probs(model, [corrupt], options)[0]
    k = int(p_clean.argmax())
    return float(p_clean[k] - p_corrupt[k])


def _planted_gaps(tiny, clean, corrupt, planted: bool, draws: int):
    video = clean.spans.video
    gaps = []
    for seed in range(draws):
        rows = torch.randperm(video.numel(), generator=torch.Generator().manual_seed(seed))[:3].sort().values
        sink = video[rows]
        route = sink if planted else video
        # the sign of the planted direction is chosen so that the clean run gains on its answer
        gain = 30.0
        with planted_route(tiny, clean, route, gain=gain):
            if _full_effect(tiny, clean, corrupt) < 0:
                gain = -gain
        with planted_route(tiny, clean, route, gain=gain), warnings.catch_warnings():
            warnings.simplefilter("ignore", ControlWarning)
            full = _full_effect(tiny, clean, corrupt)
            res = causal_trace(tiny, clean, corrupt, "ABCD", token_sets=["sink", "random_chunk", "random_position"],
                               sinks={"video": sink}, dominant="audio", seed=seed, progress=False)
            first = causal_trace(tiny, clean, corrupt, "ABCD", token_sets=["sink", "random_chunk"],
                                 sinks={"video": sink}, dominant="audio", seed=seed, site="resid_pre", layers=[0],
                                 progress=False)
        ie = res.effects.set_index("token_set")["ie_clean"]
        ie0 = first.effects.set_index("token_set")["ie_clean"]
        assert full > 0
        if planted:
            # ground truth: the route is the only difference, so patching it restores the clean run exactly,
            # and a disjoint set at the embedding changes nothing
            assert ie["sink"] == pytest.approx(full, rel=1e-4, abs=1e-9)
            assert ie0["sink"] == pytest.approx(full, rel=1e-4, abs=1e-9)
            assert ie0["random_chunk"] == pytest.approx(0.0, abs=1e-8)      # float rounding of the partial run
        gaps.append([ie["sink"] - ie["random_chunk"], ie["sink"] - ie["random_position"], full])
    return np.asarray(gaps)


def test_planted_route_sink_beats_matched_random_only_when_planted(tiny):
    clean = tiny.prepare(video=nav.testing.synthetic_frames(4.0, 2, 56), audio=nav.testing.synthetic_tone(4.0),
                         text=PROMPT)
    corrupt = ablate(clean, "audio", tiny)
    planted = _planted_gaps(tiny, clean, corrupt, True, draws=4)
    null = _planted_gaps(tiny, clean, corrupt, False, draws=10)
    # planted: the sink set carries (nearly) the whole effect and its matched controls (nearly) none, in every draw
    assert (planted[:, :2] > 0.9 * planted[:, 2:3]).all()
    # not planted (the signal is spread over every video token, the 'sinks' are arbitrary): no systematic gap,
    # neither relative to the whole effect nor to the planted gap
    assert abs(null[:, :2].mean()) < 0.1 * null[:, 2].mean()
    assert abs(null[:, :2].mean()) < 0.25 * np.abs(planted[:, :2]).mean()


def test_planted_route_checks(tiny, av_example):
    with pytest.raises(TokenSelectionError, match="video token positions"):
        with planted_route(tiny, av_example, av_example.spans.audio[:2]):
            pass
    with pytest.raises(InputError, match="source"):
        with planted_route(tiny, av_example, av_example.spans.video[:2], source="text"):
            pass
    with planted_route(tiny, av_example, av_example.spans.video[:2]):
        with pytest.raises(InputError, match="one input per forward"):
            option_probs(tiny, [av_example, av_example], "AB")
    # the other way round: video's presence carried by audio tokens (the audio encoder runs first)
    route, other = av_example.spans.audio[[55, 60, 70]], av_example.spans.audio[[56, 61, 71]]
    no_video = ablate(av_example, "video", tiny)
    with planted_route(tiny, av_example, route, source="video", gain=-30.0):
        full = _full_effect(tiny, av_example, no_video)
        res = causal_trace(tiny, av_example, no_video, "ABCD", token_sets={"route": route, "other": other},
                           site="resid_pre", layers=[0], progress=False)
    ie = res.effects.set_index("token_set")["ie_clean"]
    assert full != 0 and ie["route"] == pytest.approx(full, rel=1e-4) and ie["other"] == pytest.approx(0, abs=1e-8)
    # the hooks are gone afterwards
    assert not tiny._module.get_submodule(tiny.adapter.paths["vision_encoder"])._forward_hooks


# -- length control --------------------------------------------------------------------------------------------
def test_length_control_table(tiny, tmp_path):
    res = length_control(tiny, lengths=[2.0, 4.0], clips=2, token_sets=["all", "sink", "random", "random_chunk"],
                         sink_options={"dims": [0, 1], "tau": 2.0}, progress=False)
    table = res.table()
    assert list(table.index.get_level_values(0).unique()) == [2.0, 4.0]
    assert (table["clips"] == 2).all()
    seq = table["sequence"].groupby(level=0).first()
    assert seq[4.0] > seq[2.0]
    # a 2 s clip is one chunk: its video tokens come before every audio token and cannot carry audio
    assert abs(table.loc[(2.0, "all"), "IE_clean"]) < 1e-6       # zero up to the rounding of a batched run
    gaps = res.gaps()
    assert set(gaps["control"]) == {"random", "random_chunk"} and set(gaps["seconds"]) == {2.0, 4.0}
    assert "2 s" in res.report() and "4 s" in res.report() and res.summary().equals(table)
    path = res.save(tmp_path / "length.json")
    again = LengthControlResult.load(path)
    assert again.table().equals(table)
    fig = res.plot()
    assert fig.axes[0].get_xlabel() == "clip length (s)"
    with pytest.raises(InputError, match="lengths"):
        length_control(tiny, lengths=[0.0], progress=False)
    with pytest.raises(InputError, match="options"):
        length_control(tiny, lengths=[2.0], pairs=lambda m, s, n, seed: [], progress=False)


def test_toy_clip_length_keeps_default_clips():
    from nnsight_av import toy

    default = toy.make_dataset(3, seed=5)
    longer = toy.make_dataset(3, seed=5, seconds=8.0)
    assert [r.entity for r in default] == [r.entity for r in longer]
    assert longer[0].frames.shape[0] == 16 and longer[0].audio.shape[0] == 8 * toy.SAMPLE_RATE
    # the picture is a function of time: the longer clip starts with the default clip's frames
    assert np.array_equal(longer[0].frames[:8], default[0].frames)
    assert np.array_equal(toy.make_dataset(3, seed=5)[1].audio, default[1].audio)
    with pytest.raises(InputError, match="seconds"):
        toy.make_dataset(1, seconds=-1.0)


# -- ASD: what it costs besides hallucinations -------------------------------------------------------------------
from analyses import ASDConfig, ASDCostResult, asd_cost, mixed_letter_probs  # noqa: E402

TINY_ASD = dict(sink_dims=(0, 5), tau=1.5, boost_start=1, target_start=2)


@pytest.fixture(scope="module")
def toy_mc():
    from nnsight_av import toy

    return toy.make_dataset(3, seed=0, task="mc", seconds=2.0)


def test_mixed_letter_probs_modes(tiny, toy_mc):
    from nnsight_av import toy

    letters = list(toy.LETTERS[:10])
    ex = toy_mc[0].prepare(tiny)
    out = mixed_letter_probs(tiny, ex, letters, ASDConfig(**TINY_ASD, alpha=5.0))
    probs = out["probs"]
    # greedy: the letter probabilities of one plain forward
    assert torch.allclose(probs["greedy"], option_probs(tiny, [ex], letters)[0], atol=1e-5)
    # ASD never alters the first token (s_1 = 0): the same distribution as greedy
    assert out["strength"]["asd"] == 0.0 and torch.equal(probs["asd"], probs["greedy"])
    assert out["strength"]["guided"] == 1.0 and not torch.allclose(probs["guided"], probs["greedy"])
    assert 0.0 <= out["strength"]["asd_target"] <= 0.6
    # with s_1 = 1 the ASD letter is the guided pass's
    first = mixed_letter_probs(tiny, ex, letters, ASDConfig(**TINY_ASD, alpha=5.0, first_strength=1.0))
    assert torch.allclose(first["probs"]["asd"], probs["guided"], atol=1e-6)
    # no sink to boost: every mode is greedy, and it says why
    none = mixed_letter_probs(tiny, ex, letters, sinks={})
    assert none["fallback"] and all(torch.equal(p, none["probs"]["greedy"]) for p in none["probs"].values())


def test_asd_cost_end_to_end(tiny, toy_mc, tmp_path):
    from nnsight_av import toy

    captions = toy.make_dataset(2, seed=0, task="caption", seconds=2.0)
    res = asd_cost(tiny, mc=toy_mc, captions=captions, methods=["greedy", "asd", "vcd"],
                   config=ASDConfig(**TINY_ASD, alpha=5.0), vocabulary=sorted(toy.OBJECT_WORDS), max_new_tokens=6,
                   progress=False)
    assert set(res.mc["method"]) == {"greedy", "asd", "asd_target", "guided", "vcd"}
    assert len(res.mc) == 3 * 5 and len(res.captions) == 2 * 3
    greedy = res.mc[res.mc["method"] == "greedy"].set_index("clip")
    asd = res.mc[res.mc["method"] == "asd"].set_index("clip")
    assert (greedy["predicted"] == asd["predicted"]).all()
    table = res.table().set_index("method")
    assert table.loc["greedy", "mc_accuracy"] == greedy["correct"].mean()
    assert np.isnan(table.loc["guided", "coverage"]) and table.loc["asd", "caption_clips"] == 2
    for row in res.captions.itertuples():
        assert set(row.covered) | set(row.missed) == set(row.ground_truth)
        assert row.coverage == pytest.approx(len(row.covered) / len(row.ground_truth))
    # errors and fixes are exactly the differences from greedy
    changes = res.changes()
    guided = res.mc[res.mc["method"] == "guided"].set_index("clip")
    flips = int((greedy["correct"] & ~guided["correct"]).sum())
    assert int(((changes["method"] == "guided") & (changes["kind"] == "wrong_letter")
                & (changes["direction"] == "introduced")).sum()) == flips
    assert table.loc["guided", "answers_broken"] == flips
    assert "note: ASD's first-token strength s_1 is 0" in res.report() and res.summary().equals(res.table())
    again = ASDCostResult.load(res.save(tmp_path / "cost.json"))
    assert again.table().equals(res.table()) and again.captions["covered"].tolist() == res.captions["covered"].tolist()
    fig = res.plot()
    assert [ax.get_title() for ax in fig.axes] == ["answers", "captions"]


def test_asd_cost_error_bookkeeping():
    import pandas as pd

    mc = pd.DataFrame([
        {"clip": "a", "method": "greedy", "answer": "A", "predicted": "A", "correct": True, "p_answer": .9, "strength": 0.},
        {"clip": "a", "method": "asd_target", "answer": "A", "predicted": "B", "correct": False, "p_answer": .3,
         "strength": .4},
        {"clip": "b", "method": "greedy", "answer": "B", "predicted": "A", "correct": False, "p_answer": .2, "strength": 0.},
        {"clip": "b", "method": "asd_target", "answer": "B", "predicted": "B", "correct": True, "p_answer": .6,
         "strength": .4}])
    row = lambda method, caption, covered, missed, hallucinated: {
        "clip": "c", "method": method, "caption": caption, "ground_truth": ["dog", "cat"],
        "mentioned": covered + hallucinated, "covered": covered, "missed": missed, "hallucinated": hallucinated,
        "coverage": len(covered) / 2, "exact": not missed and not hallucinated}
    captions = pd.DataFrame([row("greedy", "a dog and a cat and a cow", ["dog", "cat"], [], ["cow"]),
                             row("asd", "a dog and a pig", ["dog"], ["cat"], ["pig"])])
    res = ASDCostResult(mc, captions)
    errors = res.errors()
    assert sorted(zip(errors["kind"], errors["detail"])) == [("lost_object", "cat"), ("new_hallucination", "pig"),
                                                              ("wrong_letter", "answer A")]
    fixed = res.changes().query("direction == 'fixed'")
    assert sorted(zip(fixed["kind"], fixed["detail"])) == [("new_hallucination", "cow"), ("wrong_letter", "answer B")]
    table = res.table().set_index("method")
    assert table.loc["asd", "objects_lost"] == 1 and table.loc["asd", "hallucinations_added"] == 1
    assert table.loc["asd_target", "answers_broken"] == 1 and table.loc["asd_target", "answers_fixed"] == 1
    # a caption greedy had exact and the method has not: listed with what went wrong
    exact = captions.copy()
    exact.loc[0] = row("greedy", "a dog and a cat", ["dog", "cat"], [], [])
    broken = ASDCostResult(mc, exact).errors().query("kind == 'wrong_caption'")
    assert broken["detail"].tolist() == ["missed cat; hallucinated pig"]
    assert broken["output"].tolist() == ["a dog and a pig"] and broken["baseline_output"].tolist() == ["a dog and a cat"]
    assert ASDCostResult(mc, exact).table().set_index("method").loc["asd", "captions_broken"] == 1
    assert table.loc["greedy", "CHAIR_i"] == pytest.approx(1 / 3) and table.loc["asd", "coverage"] == 0.5


def test_asd_cost_bad_input(tiny, toy_mc):
    with pytest.raises(InputError, match="nothing to evaluate"):
        asd_cost(tiny, progress=False)
    with pytest.raises(InputError, match="methods"):
        asd_cost(tiny, mc=toy_mc, methods=["beam"], progress=False)
    with pytest.raises(InputError, match="mc_modes"):
        asd_cost(tiny, mc=toy_mc, mc_modes=["boosted"], progress=False)
    with pytest.raises(InputError, match="knows none"):
        asd_cost(tiny, captions=[{"inputs": None, "objects": ["triangle"]}], progress=False)
    with pytest.raises(InputError, match="needs options"):
        asd_cost(tiny, mc=[object()], progress=False)


def test_matched_sets_in_the_pipeline(tiny, tmp_path):
    import json

    from analyses import trace_dataset

    np.save(tmp_path / "f.npy", nav.testing.synthetic_frames(4.0, 2, 56))
    np.save(tmp_path / "w.npy", nav.testing.synthetic_tone(4.0))
    record = {"id": "c0", "video": "f.npy", "audio": "w.npy", "fps": 2, "prompt": PROMPT, "options": "ABCD",
              "dominant": "audio"}
    (tmp_path / "clips.jsonl").write_text(json.dumps(record) + "\n")
    run = trace_dataset(tiny, tmp_path / "clips.jsonl", tmp_path / "trace.jsonl", sink_dims=[0, 1], tau=2.0,
                        token_sets=("sink", "random_position", "random_chunk_unimodal_sink"), progress=False)
    sets = run.trace.clips["c0"]["token_sets"]
    assert len(sets["random_position"]) == len(sets["sink"]) and not set(sets["random_position"]) & set(sets["sink"])
    assert "random_chunk_unimodal_sink" in sets
