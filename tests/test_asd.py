"""ASD: strength schedule, guided pass and statistics against hand-written eager references, fallbacks."""

import math

import numpy as np
import pytest
import torch

import nnsight_av as nav
from analyses.asd import (ASDConfig, ASDOutput, asd_generate, asd_sink_sets, decode_attention, strength_schedule,
                          strength_target)
from analyses.decoding import boosted_attention, greedy_generate

N_NEW = 6
BOOSTED = dict(boost_start=1, target_start=2, alpha=0.8, lam=0.5)


def plain_schedule(w, m, lam=0.5, cap=0.6, thr=0.4, width=0.2, gate=0.6, momentum=0.5):
    """METHOD.md section 6, written out step by step."""
    s, out = 0.0, []
    for t in range(len(w)):
        if t == 0:
            s = 0.0                                    # s_1 = 0: the first token is never altered
        else:
            target = min(cap, lam * w[t])
            if m[t] > thr:
                r = min(1.0, (m[t] - thr) / width)
                target = target * (1 + math.cos(math.pi * r)) / 2
            if w[t] < gate:
                target = target * (w[t] / gate) ** 2
            s = momentum * s + (1 - momentum) * target
        out.append(s)
    return out


def sink_sets(ex):
    sp = ex.spans
    return {"av": sp.audio[::5], "va": sp.video[::4], "aa": sp.audio[2::5], "vv": sp.video[1::4]}


# ---------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------
def test_schedule_matches_plain_formulas_on_synthetic_statistics():
    # covers: first token, lambda*w above the cap, m in the cosine band and past it, the soft gate
    w = [0.9, 1.0, 0.95, 0.3, 0.7, 0.45, 0.8, 0.65, 0.2]
    m = [0.0, 0.1, 0.5, 0.2, 0.7, 0.45, 0.39, 0.55, 0.9]
    got = strength_schedule(w, m)
    assert np.allclose(got, plain_schedule(w, m), atol=1e-12)
    assert got[0] == 0.0
    # the cosine decay alone: m = thr + width / 2 halves the target; m >= thr + width zeroes it
    assert strength_target(1.0, 0.5) == pytest.approx(0.25)
    assert strength_target(1.0, 0.6) == pytest.approx(0.0, abs=1e-12)
    # the gate alone: w = 0.3 < 0.6 scales lambda * w = 0.15 by (0.5)^2
    assert strength_target(0.3, 0.0) == pytest.approx(0.0375)
    # the cap: lambda * w = 1.0 with lambda = 1 is capped at 0.6
    assert strength_target(1.0, 0.0, ASDConfig(lam=1.0)) == pytest.approx(0.6)
    custom = ASDConfig(lam=0.9, cap=0.5, text_mass_threshold=0.3, text_mass_width=0.1, gate=0.8, momentum=0.25)
    assert np.allclose(strength_schedule(w, m, custom),
                       plain_schedule(w, m, 0.9, 0.5, 0.3, 0.1, 0.8, 0.25), atol=1e-12)


def test_generation_applies_the_schedule_to_its_recorded_statistics(tiny, av_example):
    out = asd_generate(tiny, av_example, N_NEW, ASDConfig(**BOOSTED), sinks=sink_sets(av_example))
    assert not out.fallback.any()
    assert np.allclose(out.s, plain_schedule(out.w, out.m), atol=1e-12)
    assert out.s[0] == 0.0 and (out.s[1:] > 0).all()


# ---------------------------------------------------------------------------------------
# equal to greedy when nothing is mixed in
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [dict(lam=0.0), dict(alpha=0.0)])
def test_lambda_or_alpha_zero_gives_the_greedy_output(tiny, av_example, change):
    greedy = greedy_generate(tiny, av_example, 10)
    out = asd_generate(tiny, av_example, 10, ASDConfig(**{**BOOSTED, **change}), sinks=sink_sets(av_example),
                       keep_logprobs=True)
    assert out.token_ids == greedy.token_ids
    assert out.meta["boost_columns"] > 0                      # the guided branch did run
    if change.get("alpha") == 0.0:
        assert torch.allclose(out.logprobs[:, 0], out.logprobs[:, 1], atol=1e-5)


def test_lambda_zero_with_sinks_found_in_the_prefill(tiny, av_example):
    config = ASDConfig(sink_dims=(0, 5), tau=1.5, boost_start=1, target_start=2, lam=0.0)
    out = asd_generate(tiny, av_example, 8, config)
    assert out.sinks["av"] or out.sinks["va"]
    assert out.token_ids == greedy_generate(tiny, av_example, 8).token_ids


def test_fused_sink_sets_equal_the_sink_analysis(tiny, av_example):
    config = ASDConfig(sink_dims=(0, 5), tau=1.5)
    out = asd_generate(tiny, av_example, 2, config)
    ref = asd_sink_sets(tiny, av_example, config)
    assert out.sinks == {k: v.tolist() for k, v in ref.items()}
    assert sum(len(v) for v in out.sinks.values()) > 0


# ---------------------------------------------------------------------------------------
# the guided pass and the statistics against hand-written eager attention (no KV cache)
# ---------------------------------------------------------------------------------------
class EagerReference:
    """Full-sequence forwards through a plain eager attention registered for the test.

    At ``boost_layers``, logits of query rows ``rows`` to key columns ``cols`` become
    ``a + alpha * |a|`` before the causal mask and the softmax; ``probs[layer]`` keeps the maps.
    """

    name = "test_asd_eager_reference"

    def __init__(self, model):
        from transformers.modeling_utils import AttentionInterface

        self.model = model
        self.boost_layers, self.rows, self.cols, self.alpha = set(), [], [], 0.0
        self.probs = {}
        AttentionInterface.register(self.name, self.attention)

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        b, h, n, d = query.shape
        group = h // key.shape[1]
        k = key.repeat_interleave(group, dim=1).float()
        v = value.repeat_interleave(group, dim=1).float()
        a = query.float() @ k.transpose(-1, -2) * scaling                 # [b, h, n, n]
        if layer in self.boost_layers:
            for r in self.rows:
                for c in self.cols:
                    a[:, :, r, c] = a[:, :, r, c] + self.alpha * a[:, :, r, c].abs()
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        a = a.masked_fill(~causal, float("-inf"))
        p = torch.softmax(a, dim=-1)
        self.probs[layer] = p[0]
        return (p @ v).transpose(1, 2).to(query.dtype), None

    def logprobs(self, ex, new_ids):
        """Log-probabilities at the prompt's last position and after each of ``new_ids``."""
        data = dict(ex.data)
        data.pop("position_ids", None)      # cached for the prompt only: the model computes the extended ones
        extra = torch.tensor([new_ids], dtype=torch.long)
        data["input_ids"] = torch.cat([data["input_ids"], extra], 1)
        data["attention_mask"] = torch.cat([data["attention_mask"], torch.ones_like(extra)], 1)
        config = self.model._module.config.get_text_config()
        previous = config._attn_implementation
        config._attn_implementation = self.name
        try:
            with torch.no_grad():
                logits = self.model._module(**data, use_cache=False).logits[0].float()
        finally:
            config._attn_implementation = previous
        n = len(ex)
        return torch.log_softmax(logits[n - 1:n + len(new_ids)], -1)


def test_guided_pass_equals_boosted_eager_attention(tiny, av_example):
    ex = av_example
    sets = sink_sets(ex)
    config = ASDConfig(**{**BOOSTED, "alpha": 4.0})
    out = asd_generate(tiny, ex, N_NEW, config, sinks=sets, keep_logprobs=True, backend="torch")
    ref = EagerReference(tiny)
    ids = out.token_ids[:-1]
    unguided = ref.logprobs(ex, ids)
    assert torch.allclose(out.logprobs[:, 0], unguided, atol=2e-5)
    labels = ex.spans.modality_of()
    ref.boost_layers = set(config.boost_layers(tiny.num_layers))
    ref.cols = sorted(set(sets["av"].tolist()) | set(sets["va"].tolist()))
    ref.rows = [p for p in range(len(ex) + len(ids)) if p >= len(ex) or labels[p] == "text"]   # text + generated
    ref.alpha = config.alpha
    guided = ref.logprobs(ex, ids)
    assert torch.allclose(out.logprobs[:, 1], guided, atol=2e-5)
    assert (guided - unguided).abs().max() > 1e-3                     # the boost changes far more than the tolerance


def test_statistics_equal_eager_attention_maps(tiny, av_example):
    ex = av_example
    sets = sink_sets(ex)
    config = ASDConfig(**BOOSTED)
    out = asd_generate(tiny, ex, N_NEW, config, sinks=sets, backend="torch")
    ref = EagerReference(tiny)
    ref.logprobs(ex, out.token_ids[:-1])                 # unguided: records every layer's maps
    last_media = int(ex.spans.media.max())
    targets = config.target_layers(tiny.num_layers)
    for t in range(out.num_new_tokens):
        row = len(ex) - 1 + t
        c = u = mass = 0.0
        for layer in targets:
            p = ref.probs[layer][:, row]                  # [heads, keys]
            mean_on = lambda name: p[:, sets[name]].mean().item()   # noqa: E731  mean over heads and columns
            c += mean_on("av") + mean_on("va")
            u += mean_on("aa") + mean_on("vv")
            mass += p[:, last_media + 1:].sum(-1).mean().item() / len(targets)
        assert out.steps["C"][t] == pytest.approx(c, abs=1e-5)
        assert out.steps["U"][t] == pytest.approx(u, abs=1e-5)
        assert out.w[t] == pytest.approx(c / (c + u + 1e-8), abs=1e-5)
        assert out.m[t] == pytest.approx(mass, abs=1e-5)


def test_boosted_attention_equals_a_plain_loop():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    rows, cols, alpha, scale = torch.tensor([1, 3, 4]), torch.tensor([0, 2, 6]), 0.3, 0.35
    out, probs = boosted_attention(q, k, v, scale, batch=[1], rows=rows, columns=cols, alpha=alpha)
    for b in range(2):
        for h in range(4):
            kv = h // 2
            for i in range(5):
                pos = 4 + i                                  # queries are the last 5 of 9 keys
                logits = []
                for j in range(9):
                    a = float(q[b, h, i] @ k[b, kv, j]) * scale
                    if b == 1 and i in rows.tolist() and j in cols.tolist():
                        a = a + alpha * abs(a)
                    logits.append(a if j <= pos else -math.inf)
                p = torch.softmax(torch.tensor(logits), 0)
                assert torch.allclose(probs[b, h, i], p, atol=1e-6)
                assert torch.allclose(out[b, i, h], p @ v[b, kv], atol=1e-5)
    mult, probs_m = boosted_attention(q, k, v, scale, batch=[0], columns=cols, alpha=alpha, mode="multiplicative")
    base = boosted_attention(q, k, v, scale)[1]
    # multiplicative: chosen columns' probabilities times (1 + alpha), renormalised
    scaled = base[0].clone()
    scaled[..., cols] *= 1 + alpha                           # every row of batch entry 0
    assert torch.allclose(probs_m[0], scaled / scaled.sum(-1, keepdim=True), atol=1e-6)


def test_decode_attention_torch_path_equals_boosted_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    cols = torch.tensor([1, 4, 5])
    flag = torch.zeros(10)
    flag[cols] = 1.0
    weights = torch.zeros(10, 8)
    weights[cols, 0] = 1 / 3
    weights[8:, 4] = 1.0                                     # prompt tail; keys 10, 11 are past the prompt
    out, sums = decode_attention(q, k, v, 0.25, flag, torch.tensor([0.0, 0.5]), weights, backend="torch")
    ref, probs = boosted_attention(q, k, v, 0.25, batch=[1], columns=cols, alpha=0.5)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(sums[..., 0], probs[:, :, 0, cols].mean(-1), atol=1e-6)
    assert torch.allclose(sums[..., 4], probs[:, :, 0, 8:].sum(-1), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton decode kernel needs a CUDA GPU")
def test_decode_attention_triton_kernel_equals_torch_path():
    torch.manual_seed(2)
    q = torch.randn(2, 8, 1, 64, device="cuda")
    k, v = torch.randn(2, 2, 300, 64, device="cuda"), torch.randn(2, 2, 300, 64, device="cuda")
    flag = (torch.rand(280, device="cuda") < 0.2).float()
    weights = torch.rand(280, 8, device="cuda")
    for mult in (False, True):
        amounts = torch.tensor([0.0, 0.3], device="cuda")
        a = decode_attention(q, k, v, 0.125, flag, amounts, weights, mult, backend="triton")
        b = decode_attention(q, k, v, 0.125, flag, amounts, weights, mult, backend="torch")
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


# ---------------------------------------------------------------------------------------
# fallbacks: no NaN
# ---------------------------------------------------------------------------------------
def test_empty_sink_sets_fall_back_to_greedy_without_nan(tiny, av_example):
    greedy = greedy_generate(tiny, av_example, N_NEW)
    out = asd_generate(tiny, av_example, N_NEW, ASDConfig(**BOOSTED), sinks={})
    assert out.token_ids == greedy.token_ids
    assert out.fallback.all() and all("no cross-modal sink" in r for r in out.steps["reason"])
    assert np.isfinite(out.diagnostics()[["s", "target", "w", "m", "C", "U"]].to_numpy(float)).all()
    assert (out.s == 0).all()


def test_only_unimodal_or_only_cross_modal_sets(tiny, av_example):
    sets = sink_sets(av_example)
    uni = asd_generate(tiny, av_example, N_NEW, ASDConfig(**BOOSTED), sinks={"aa": sets["aa"], "vv": sets["vv"]})
    assert uni.fallback.all() and (uni.s == 0).all()
    cross = asd_generate(tiny, av_example, N_NEW, ASDConfig(**BOOSTED), sinks={"av": sets["av"], "va": sets["va"]})
    assert not cross.fallback.any()
    assert np.allclose(cross.w, 1.0, atol=1e-6) and np.isfinite(cross.s).all()


def test_no_sinks_found_and_single_modality_inputs_fall_back(tiny, av_example):
    none_found = asd_generate(tiny, av_example, 3, ASDConfig(sink_dims=(0,), tau=1e9))
    assert none_found.fallback.all() and none_found.sinks == {"av": [], "va": [], "aa": [], "vv": []}
    audio_only = tiny.prepare(audio=nav.testing.synthetic_tone(2.0), text="What is making the sound?")
    out = asd_generate(tiny, audio_only, 3)
    assert out.fallback.all() and "lacks audio or video" in out.steps["reason"][0]
    assert out.token_ids == greedy_generate(tiny, audio_only, 3).token_ids


# ---------------------------------------------------------------------------------------
# config, output
# ---------------------------------------------------------------------------------------
def test_config_defaults_and_errors():
    c = ASDConfig()
    assert (c.k_divide, c.alpha, c.lam, c.cap, c.text_mass_threshold, c.text_mass_width, c.gate, c.momentum,
            c.first_strength) == (3, 0.2, 0.5, 0.6, 0.4, 0.2, 0.6, 0.5, 0.0)
    assert c.boost_layers(28) == list(range(6, 28)) and c.target_layers(28) == list(range(18, 26))
    assert c.boost_layers(4) == [3] and c.target_layers(4) == [3]
    assert ASDConfig.from_dict(c.to_dict()) == c
    with pytest.raises(nav.InputError, match="boost_sets"):
        ASDConfig(boost_sets=("xx",))
    with pytest.raises(nav.InputError, match="momentum"):
        ASDConfig(momentum=1.5)
    with pytest.raises(nav.InputError, match="unknown ASDConfig fields"):
        ASDConfig.from_dict({"lambda": 0.5})


def test_bad_inputs(tiny, av_example):
    with pytest.raises(nav.InputError, match="max_new_tokens"):
        asd_generate(tiny, av_example, 0)
    with pytest.raises(nav.TokenSelectionError, match="positions must lie"):
        asd_generate(tiny, av_example, 2, sinks={"av": [10_000]})
    with pytest.raises(nav.InputError, match="unknown sink sets"):
        asd_generate(tiny, av_example, 2, sinks={"cross": [1]})
    with pytest.raises(nav.InputError, match="AVInputs"):
        asd_generate(tiny, "a clip", 2)


def test_output_round_trip_and_plot(tiny, av_example, tmp_path):
    out = asd_generate(tiny, av_example, 4, ASDConfig(**BOOSTED), sinks=sink_sets(av_example))
    back = ASDOutput.from_json(out.to_json(tmp_path / "asd.json"))
    assert back.token_ids == out.token_ids and back.steps == out.steps and back.sinks == out.sinks
    frame = out.diagnostics()
    assert list(frame["step"]) == [1, 2, 3, 4] and {"s", "w", "m", "fallback"} <= set(frame.columns)
    fig = out.plot(tokenizer=tiny.tokenizer)
    assert len(fig.axes) == 2


def test_guided_prompt_equals_the_attention_boost_intervention(tiny, av_example):
    import interventions
    ex = av_example
    sets = sink_sets(ex)
    config = ASDConfig(**{**BOOSTED, "alpha": 4.0})
    out = asd_generate(tiny, ex, 1, config, sinks=sets, keep_logprobs=True)
    cols = sorted(set(sets["av"].tolist()) | set(sets["va"].tolist()))
    boost = interventions.AttentionBoost(queries=ex.spans.text.tolist(), keys=cols, alpha=config.alpha,
                                         layers=config.boost_layers(tiny.num_layers))
    with torch.no_grad():
        logits = interventions.run(tiny, ex, boost)[0, -1].float()
    assert torch.allclose(out.logprobs[0, 1], torch.log_softmax(logits, -1), atol=2e-5)
    assert (out.logprobs[0, 1] - out.logprobs[0, 0]).abs().max() > 1e-3
