"""interventions/: each primitive against an independent computation on the tiny model.

References are written plainly here: torch forward hooks on the Hugging Face modules
(the model run without nnsight), hand-computed means, and an eager attention function
registered with transformers that boosts / knocks out by hand on probabilities.

Every test runs on both runtimes (`RUNTIME`): ``ivs.run`` / ``ivs.generate`` are switched to
``runtime="hooks"`` for the second pass, so each reference checks the hook runtime too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import interventions as ivs
import nnsight_av as nav

# --------------------------------------------------------------------------- fixtures / helpers
RUN, GENERATE = ivs.run, ivs.generate


@pytest.fixture(autouse=True, params=["nnsight", "hooks"])
def runtime(request, monkeypatch):
    """Every test once per runtime: ``ivs.run`` / ``ivs.generate`` default to it."""
    def run(*args, **kwargs):
        kwargs.setdefault("runtime", request.param)
        return RUN(*args, **kwargs)

    def generate(*args, **kwargs):
        kwargs.setdefault("runtime", request.param)
        return GENERATE(*args, **kwargs)

    monkeypatch.setattr(ivs, "run", run)
    monkeypatch.setattr(ivs, "generate", generate)
    return request.param



@pytest.fixture(scope="module")
def silent(tiny, av_example):
    """The av_example clip with digital silence: same layout (the corrupted run of patching)."""
    req = av_example.request
    return tiny.prepare_request(req.with_media(audio=np.zeros_like(req.audio)))


@pytest.fixture(scope="module")
def quiet(tiny, av_example):
    """Same layout again, a quieter tone: a third input for means."""
    req = av_example.request
    return tiny.prepare_request(req.with_media(audio=(0.3 * req.audio).astype(np.float32)))


def hf_module(model, path=""):
    root = model.envoy_at(model.adapter.paths["layers"])._module
    module = root
    for part in path.split(".") if path else []:
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def hf_logits(model, ex, hooks=()):
    """Logits of a plain HF forward (no nnsight) with ``hooks``: (path, kind, fn) triples."""
    handles = []
    try:
        for path, kind, fn in hooks:
            module = hf_module(model, path)
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            else:
                handles.append(module.register_forward_hook(fn))
        with torch.no_grad():
            return model._module(**ex.data).logits
    finally:
        for handle in handles:
            handle.remove()


def replace_rows(positions, values=None):
    """A forward hook that writes ``values`` (default zeros) into rows ``positions`` of the output."""
    def hook(module, args, out):
        first = out[0] if isinstance(out, tuple) else out
        first = first.clone()
        first[:, positions] = 0 if values is None else values.to(first.dtype)
        return (first, *out[1:]) if isinstance(out, tuple) else first
    return hook


def hf_hidden(model, ex):
    """HF hidden states: [l] is the input of layer l; [L] the final-norm output."""
    with torch.no_grad():
        return model._module(**ex.data, output_hidden_states=True).hidden_states


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


# --------------------------------------------------------------------------- Site / selectors


def test_site_roles_aliases_and_layers(tiny):
    assert ivs.Site("mlp").role == "mlp_output"
    assert ivs.Site("layer_input").role == "resid_pre"
    assert ivs.Site(layers=ivs.window(1, 2)).layer_indices(tiny) == [1, 2]
    assert ivs.Site(layers=-1).layer_indices(tiny) == [3]
    assert ivs.Site(layers=slice(2, None)).layer_indices(tiny) == [2, 3]
    assert ivs.Site().layer_indices(tiny) == [0, 1, 2, 3]


def test_selectors_resolve_against_spans(av_example):
    spans, n = av_example.spans, len(av_example)
    torch.testing.assert_close(ivs.resolve_tokens("video", spans, n), spans.video)
    union = ivs.resolve_tokens(["audio", 0, "sinks"], spans, n, sets={"sinks": [5, 7]})
    assert union.tolist() == sorted({0, 5, 7, *spans.audio.tolist()})
    assert ivs.resolve_tokens(-1, spans, n, total=n + 3).tolist() == [n + 2]
    assert ivs.resolve_tokens(None, spans, n).tolist() == list(range(n))
    assert ivs.resolve_tokens("chunk1.video", spans, n).tolist() == spans.chunks[1].video.tolist()


# --------------------------------------------------------------------------- Zero


@pytest.mark.parametrize("role,path,kind", [
    ("resid_post", "1", "out"), ("resid_pre", "2", "pre"), ("input_layernorm", "1.input_layernorm", "out"),
    ("attn_output", "2.self_attn", "out"), ("mlp_output", "0.mlp", "out"),
])
def test_zero_matches_a_hook(tiny, av_example, role, path, kind):
    video = av_example.spans.video
    layer = int(path.split(".")[0])
    if kind == "pre":
        def hook(module, args):
            x = args[0].clone()
            x[:, video] = 0
            return (x, *args[1:])
    else:
        hook = replace_rows(video)
    expected = hf_logits(tiny, av_example, [(path, kind, hook)])
    got = ivs.run(tiny, av_example, ivs.Zero(layers=layer, tokens="video", site=role))
    close(got, expected)
    assert not torch.allclose(got, hf_logits(tiny, av_example), atol=1e-4)


def test_zero_heads_matches_a_hook_on_o_proj(tiny, av_example):
    text, head, d = av_example.spans.text, 1, tiny.adapter.head_dim

    def hook(module, args):
        x = args[0].clone()
        x.view(*x.shape[:2], -1, d)[:, text, head] = 0
        return (x,)

    expected = hf_logits(tiny, av_example, [("2.self_attn.o_proj", "pre", hook)])
    got = ivs.run(tiny, av_example, ivs.Zero(layers=2, tokens="text", site="attn_output", heads=[head]))
    close(got, expected)


# --------------------------------------------------------------------------- MeanPatch


def test_compute_means_by_position_and_modality_match_hand_means(tiny, av_example, silent, quiet):
    refs = [av_example, silent]
    by_pos = ivs.compute_means(tiny, refs, sites="resid_post", layers=[1], progress=False)
    hand = (hf_hidden(tiny, av_example)[2][0] + hf_hidden(tiny, silent)[2][0]) / 2
    close(by_pos["resid_post@1"], hand)
    by_mod = ivs.compute_means(tiny, [av_example, quiet], sites="mlp_output", layers=[0], by="modality",
                               progress=False)
    outs = []
    for ex in (av_example, quiet):
        store = {}
        handle = hf_module(tiny, "0.mlp").register_forward_hook(lambda m, a, o: store.setdefault("x", o[0]))
        hf_logits(tiny, ex)
        handle.remove()
        outs.append((ex, store["x"]))
    for m, index in (("audio", 0), ("video", 1), ("text", 3)):
        rows = torch.cat([x[getattr(ex.spans, m)] for ex, x in outs])
        close(by_mod["mlp_output@0"][index], rows.mean(0))
    assert torch.isnan(by_mod["mlp_output@0"][2]).all()  # no image tokens


def test_mean_patch_matches_a_hook(tiny, av_example, silent, quiet, tmp_path):
    means = ivs.compute_means(tiny, [av_example, silent], sites="resid_post", layers=[1], progress=False)
    video = quiet.spans.video
    expected = hf_logits(tiny, quiet, [("1", "out", replace_rows(video, means["resid_post@1"][video][None]))])
    got = ivs.run(tiny, quiet, ivs.MeanPatch(means, layers=1, tokens="video"))
    close(got, expected)

    by_mod = ivs.compute_means(tiny, [av_example, silent], sites="resid_post", layers=[1], by="modality",
                               progress=False)
    audio = quiet.spans.audio
    expected = hf_logits(tiny, quiet, [("1", "out", replace_rows(audio, by_mod["resid_post@1"][0]))])
    close(ivs.run(tiny, quiet, ivs.MeanPatch(by_mod, layers=1, tokens="audio")), expected)

    # saved means rebuild the same intervention from JSON
    by_mod.save(str(tmp_path / "means.safetensors"))
    iv = ivs.MeanPatch(by_mod, layers=1, tokens="audio")
    again = ivs.from_dict(json.loads(json.dumps(iv.to_dict())))
    close(ivs.run(tiny, quiet, again), expected)


# --------------------------------------------------------------------------- Patch


def test_patch_from_cache_matches_a_hook(tiny, av_example, silent):
    clean = ivs.cache_activations(tiny, av_example, "input_layernorm", layers=[1, 2])
    video = silent.spans.video
    store = {}
    for layer in (1, 2):
        h = hf_module(tiny, f"{layer}.input_layernorm").register_forward_hook(
            lambda m, a, o, layer=layer: store.setdefault(layer, o.clone()))
        hf_logits(tiny, av_example)
        h.remove()
    close(clean["input_layernorm@1"], store[1][0], atol=0)
    hooks = [(f"{layer}.input_layernorm", "out", replace_rows(video, store[layer][:, video])) for layer in (1, 2)]
    expected = hf_logits(tiny, silent, hooks)
    got = ivs.run(tiny, silent, ivs.Patch(clean, layers=[1, 2], tokens="video", site="input_layernorm"))
    close(got, expected)


@pytest.mark.parametrize("site", ["resid_post", "resid_pre"])
def test_patching_everything_restores_clean_logits_exactly(tiny, av_example, silent, site):
    clean_logits = ivs.run(tiny, av_example)
    cache = ivs.cache_activations(tiny, av_example, site)
    patched = ivs.run(tiny, silent, ivs.Patch(cache, site=site))
    torch.testing.assert_close(patched, clean_logits, rtol=0, atol=0)
    # the same through a second invoke of one trace
    both = ivs.run(tiny, [av_example, silent], ivs.Patch(source=0, site=site))
    torch.testing.assert_close(both[1], clean_logits, rtol=0, atol=0)
    assert not torch.allclose(ivs.run(tiny, silent), clean_logits, atol=1e-4)


def test_patching_nothing_changes_nothing(tiny, av_example, silent):
    corrupt = ivs.run(tiny, silent)
    cache = ivs.cache_activations(tiny, av_example, "resid_post")
    nothing = ivs.Patch(cache, tokens=[], allow_empty=True)
    torch.testing.assert_close(ivs.run(tiny, silent, nothing), corrupt, rtol=0, atol=0)
    # patching a run with its own activations is also a no-op
    own = ivs.cache_activations(tiny, silent, "resid_post")
    torch.testing.assert_close(ivs.run(tiny, silent, ivs.Patch(own)), corrupt, rtol=0, atol=0)


def test_patch_between_invokes_matches_a_hook(tiny, av_example, silent):
    store = {}
    h = hf_module(tiny, "1.mlp").register_forward_hook(lambda m, a, o: store.setdefault("x", o.clone()))
    hf_logits(tiny, av_example)
    h.remove()
    video = silent.spans.video
    expected = hf_logits(tiny, silent, [("1.mlp", "out", replace_rows(video, store["x"][:, video]))])
    iv = ivs.Patch(source=0, layers=1, tokens="video", site="mlp_output")
    clean, patched = ivs.run(tiny, [av_example, silent], iv)
    close(patched, expected)
    close(clean, hf_logits(tiny, av_example))  # the source invoke only records


# --------------------------------------------------------------------------- Noise


def noised_embeddings(model, ex, iv):
    with torch.no_grad(), model.trace(ex):
        iv.apply(model)
        value = model.layers[0].input.save()
    return value[0]


def test_noise_statistics_selection_and_seed(tiny, av_example):
    clean = hf_hidden(tiny, av_example)[0][0]
    audio = av_example.spans.audio
    others = torch.ones(len(av_example), dtype=torch.bool)
    others[audio] = False
    noisy = noised_embeddings(tiny, av_example, ivs.Noise(scale=3.0, tokens="audio", seed=1))
    delta = noisy - clean
    assert torch.equal(delta[others], torch.zeros_like(delta[others]))
    target = 3.0 * clean[audio].std(unbiased=False)
    assert abs(delta[audio].std() / target - 1) < 0.05
    assert abs(delta[audio].mean()) < 0.05 * target
    again = noised_embeddings(tiny, av_example, ivs.Noise(scale=3.0, tokens="audio", seed=1))
    other_seed = noised_embeddings(tiny, av_example, ivs.Noise(scale=3.0, tokens="audio", seed=2))
    assert torch.equal(noisy, again) and not torch.allclose(noisy, other_seed)
    # a given std per modality; the per-modality helper pools over inputs
    stds = ivs.modality_stds(tiny, av_example)
    assert stds["audio"] == pytest.approx(float(clean[audio].double().std(unbiased=False)), rel=1e-4)
    fixed = noised_embeddings(tiny, av_example, ivs.Noise(scale=2.0, std={"audio": 0.5}, tokens="audio"))
    assert abs((fixed - clean)[audio].std() / 1.0 - 1) < 0.05


# --------------------------------------------------------------------------- attention: reference


def ref_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention, then the edit done by hand on the probabilities (or logits)."""
    spec = REF_SPEC
    groups = module.num_key_value_groups
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    logits = (query @ k.transpose(-1, -2)).float() * scaling
    n, kv = query.shape[2], k.shape[2]
    past = kv - n
    if attention_mask is None:
        allowed = torch.arange(kv)[None, :] <= (torch.arange(n) + past)[:, None]
        attention_mask = torch.zeros(n, kv).masked_fill(~allowed, float("-inf"))[None, None]
    active = spec is not None and module.layer_idx in spec["layers"]
    if active:
        rows = [r for r in range(n) if spec["query"](past + r)]
        cols = [c for c in spec["keys"] if c < kv]
        heads = spec.get("heads") or list(range(query.shape[1]))
        pick = (slice(None), torch.tensor(heads)[:, None, None], torch.tensor(rows)[None, :, None],
                torch.tensor(cols)[None, None, :])
    if active and rows and spec["mode"] == "pre_softmax":
        a = logits[pick]
        logits[pick] = a + spec["alpha"] * a.abs()
    if active and rows and spec["mode"] == "knockout":
        manual = attention_mask.float().expand(logits.shape).clone()
        manual[pick] = float("-inf")
        attention_mask = manual
    probs = torch.softmax(logits + attention_mask.float(), dim=-1)
    if active and rows and spec["mode"] == "multiplicative":
        probs[pick] = probs[pick] * (1 + spec["alpha"])
        probs = probs / probs.sum(-1, keepdim=True)
    out = (probs.to(value.dtype) @ v).transpose(1, 2).contiguous()
    return out, probs


REF_SPEC = None


@pytest.fixture(scope="module")
def ref_model():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("nav_test_ref", ref_attention)
    AttentionMaskInterface.register("nav_test_ref", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model = nav.testing.tiny_model("qwen2_5_omni", seed=0, attn_implementation="eager")
    text_model = model.envoy_at(model.adapter.paths["layers"].rsplit(".", 1)[0])._module
    text_model.config._attn_implementation = "nav_test_ref"
    assert hf_module(model, "0.self_attn").config._attn_implementation == "nav_test_ref"
    return model


def reference(ref_model, ex, spec, **kwargs):
    global REF_SPEC
    REF_SPEC = spec
    try:
        with torch.no_grad():
            return ref_model._module(**ex.data, **kwargs)
    finally:
        REF_SPEC = None


def spec_for(ex, queries, keys, layers, mode, alpha=0.0, heads=None):
    q = set(queries.tolist())
    return {"query": lambda p: p in q, "keys": keys.tolist(), "layers": set(layers), "mode": mode,
            "alpha": alpha, "heads": heads}


def test_reference_model_without_edits_equals_sdpa(tiny, ref_model, av_example):
    close(reference(ref_model, av_example, None).logits, ivs.run(tiny, av_example))


# --------------------------------------------------------------------------- attention: boost / knockout


@pytest.mark.parametrize("mode,alpha", [("pre_softmax", 0.8), ("multiplicative", 1.5)])
def test_attention_boost_equals_hand_renormalised_eager(tiny, tiny_eager, ref_model, av_example, mode, alpha):
    spans = av_example.spans
    iv = ivs.AttentionBoost(queries="text", keys="audio", alpha=alpha, mode=mode, layers=[1, 3])
    expected = reference(ref_model, av_example, spec_for(av_example, spans.text, spans.audio, [1, 3], mode, alpha))
    got_sdpa = ivs.run(tiny, av_example, iv)
    got_eager = ivs.run(tiny_eager, av_example, iv)
    close(got_sdpa, expected.logits)
    close(got_eager, expected.logits)
    assert not torch.allclose(got_sdpa, ivs.run(tiny, av_example), atol=1e-4)


def test_attention_boost_updates_eager_probabilities(tiny_eager, ref_model, av_example):
    spans = av_example.spans
    iv = ivs.AttentionBoost(queries="prompt", keys="video", alpha=2.0, mode="multiplicative", layers=2,
                            heads=[0, 3])
    expected = reference(ref_model, av_example, spec_for(av_example, spans.prompt, spans.video, [2],
                                                          "multiplicative", 2.0, heads=[0, 3]),
                         output_attentions=True)
    with torch.no_grad(), tiny_eager.trace(av_example, output_attentions=True):
        iv.apply(tiny_eager)
        out = tiny_eager.output.save()
    close(out.attentions[2], expected.attentions[2])
    close(out.logits, expected.logits)
    rows = out.attentions[2][0][:, spans.prompt].sum(-1)
    close(rows, torch.ones_like(rows))


def test_attention_knockout_equals_a_manual_mask(tiny, ref_model, av_example):
    spans = av_example.spans
    iv = ivs.AttentionKnockout(queries=["prompt", "assistant"], keys=["video", "chunk0.audio"], layers=range(4),
                               heads=[2])
    keys = torch.cat([spans.video, spans.chunks[0].audio])
    queries = torch.cat([spans.prompt, spans.assistant])
    expected = reference(ref_model, av_example, spec_for(av_example, queries, keys, range(4), "knockout",
                                                          heads=[2]))
    close(ivs.run(tiny, av_example, iv), expected.logits)


def test_alpha_zero_changes_nothing(tiny, av_example):
    base = ivs.run(tiny, av_example)
    for mode in ("pre_softmax", "multiplicative"):
        iv = ivs.AttentionBoost(queries=None, keys="media", alpha=0.0, mode=mode)
        close(ivs.run(tiny, av_example, iv), base, atol=1e-6)


# --------------------------------------------------------------------------- batching


BATCH_CASES = [
    ivs.Zero(layers=[0, 2], tokens="video", site="mlp_output"),
    ivs.Zero(layers=1, tokens=["prompt", -1], site="attn_output", heads=[0, 3]),
    ivs.Noise(tokens="audio", scale=3.0),
    ivs.AttentionKnockout(queries="text", keys="chunk0", layers=[1, 2]),
    ivs.AttentionBoost(queries="text", keys="sinks", alpha=0.5, sets={"sinks": [0, 40, 60]}),
    ivs.AttentionBoost(queries=None, keys="audio", alpha=1.0, mode="multiplicative", heads=[1]),
]


@pytest.mark.parametrize("iv", BATCH_CASES, ids=lambda iv: type(iv).__name__)
def test_batch_of_different_lengths_equals_each_alone(tiny, av_example, av_example_long, iv):
    assert len(av_example) != len(av_example_long)
    both = ivs.run(tiny, [av_example, av_example_long], iv)
    close(both[0], ivs.run(tiny, av_example, iv))
    close(both[1], ivs.run(tiny, av_example_long, iv))


def test_mean_patch_by_modality_batches(tiny, av_example, av_example_long, silent):
    means = ivs.compute_means(tiny, [av_example, silent], sites="resid_pre", layers=[1], by="modality",
                              progress=False)
    iv = ivs.MeanPatch(means, layers=1, tokens="audio", site="resid_pre")
    both = ivs.run(tiny, [av_example, av_example_long], iv)
    close(both[1], ivs.run(tiny, av_example_long, iv))


def test_per_input_sets_and_targets(tiny, av_example, av_example_long):
    iv = ivs.AttentionBoost(queries="text", keys="sinks", alpha=1.0)
    sets = [{"sinks": [1, 2]}, {"sinks": [3]}]
    both = ivs.run(tiny, [av_example, av_example_long], iv, sets=sets)
    close(both[1], ivs.run(tiny, av_example_long, iv, sets=sets[1]))
    only_second = ivs.run(tiny, [av_example, av_example_long], iv, sets=sets, targets=[1])
    close(only_second[0], ivs.run(tiny, av_example))


# --------------------------------------------------------------------------- generation


def test_generation_with_attention_boost_every_step_equals_reference(tiny, ref_model, av_example):
    n, spans = len(av_example), av_example.spans
    iv = ivs.AttentionBoost(queries=["text", "generated"], keys="audio", alpha=1.0, layers=[1, 2, 3])
    text = set(spans.text.tolist())
    spec = {"query": lambda p: p in text or p >= n, "keys": spans.audio.tolist(), "layers": {1, 2, 3},
            "mode": "pre_softmax", "alpha": 1.0}
    global REF_SPEC
    REF_SPEC = spec
    try:
        with torch.no_grad():
            ref = ref_model._module.generate(**av_example.data, max_new_tokens=4, do_sample=False,
                                             output_logits=True, return_dict_in_generate=True)
    finally:
        REF_SPEC = None
    ids, logits = ivs.generate(tiny, av_example, iv, max_new_tokens=4, return_logits=True)
    torch.testing.assert_close(ids, ref.sequences)
    close(logits, torch.cat(ref.logits))
    plain_ids, plain_logits = ivs.generate(tiny, av_example, None, max_new_tokens=4, return_logits=True)
    assert not torch.allclose(plain_logits, logits, atol=1e-4)


def test_generation_with_zero_every_step_equals_a_hook(tiny, av_example):
    audio = set(av_example.spans.audio.tolist())

    def hook(module, args, kwargs, out):
        cache = kwargs["past_key_values"]
        end = cache.get_seq_length(2)  # already updated with this forward's tokens
        start = end - out.shape[1]
        rows = [p - start for p in range(start, end) if p in audio or p == end - 1]
        out = out.clone()
        out[:, rows] = 0
        return out

    handle = hf_module(tiny, "2").register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = tiny._module.generate(**av_example.data, max_new_tokens=4, do_sample=False,
                                        output_logits=True, return_dict_in_generate=True)
    finally:
        handle.remove()
    iv = ivs.Zero(layers=2, tokens=["audio", -1])
    ids, logits = ivs.generate(tiny, av_example, iv, max_new_tokens=4, return_logits=True)
    torch.testing.assert_close(ids, ref.sequences)
    close(logits, torch.cat(ref.logits))


def test_generation_at_chosen_steps_and_batched(tiny, av_example, av_example_long):
    iv = ivs.AttentionBoost(queries=-1, keys="video", alpha=2.0)
    _, every = ivs.generate(tiny, av_example, iv, max_new_tokens=3, return_logits=True)
    _, prefill_only = ivs.generate(tiny, av_example, iv, steps=[0], max_new_tokens=3, return_logits=True)
    _, plain = ivs.generate(tiny, av_example, None, max_new_tokens=3, return_logits=True)
    close(prefill_only[0], every[0])
    assert not torch.allclose(prefill_only[1:], every[1:], atol=1e-5)
    # batched generation (left padding) equals each alone
    ids, both = ivs.generate(tiny, [av_example, av_example_long], iv, max_new_tokens=3, return_logits=True)
    close(both[0], every, atol=1e-4)
    _, alone = ivs.generate(tiny, av_example_long, iv, max_new_tokens=3, return_logits=True)
    close(both[1], alone, atol=1e-4)


# --------------------------------------------------------------------------- composition, apply, JSON


def test_composition_order(tiny, av_example, silent):
    cache = ivs.cache_activations(tiny, av_example, "resid_post", layers=[1])
    patch = ivs.Patch(cache, layers=1)
    zero = ivs.Zero(layers=1, tokens="video")
    video = silent.spans.video
    clean_out = cache["resid_post@1"][None].clone()
    clean_out[:, video] = 0
    expected = hf_logits(tiny, silent, [("1", "out", replace_rows(slice(None), clean_out))])
    close(ivs.run(tiny, silent, patch + zero), expected)            # zero runs after the patch
    close(ivs.run(tiny, silent, zero + patch), ivs.run(tiny, silent, patch))  # the patch overwrites
    # ops are sorted into execution order whatever the list order
    late_first = ivs.Compose([ivs.Zero(layers=3, tokens="audio"), ivs.Zero(layers=0, tokens="video")])
    expected = hf_logits(tiny, silent, [("3", "out", replace_rows(silent.spans.audio)),
                                        ("0", "out", replace_rows(video))])
    close(ivs.run(tiny, silent, late_first), expected)


def test_apply_inside_a_trace_and_model_run(tiny, av_example, av_example_long):
    iv = ivs.Zero(layers=1, tokens="audio") + ivs.AttentionBoost(queries="text", keys="video", alpha=0.5)
    expected = ivs.run(tiny, [av_example, av_example_long], iv)
    with torch.no_grad(), tiny.trace() as tracer:
        with tracer.invoke(av_example):
            iv.apply(tiny, av_example)
            a = tiny.logits.save()
        with tracer.invoke(av_example_long):
            iv.apply(tiny)  # the invoke's inputs are found without passing them
            b = tiny.logits.save()
    close(a[:, :len(av_example)], expected[0])
    close(b[:, :len(av_example_long)], expected[1])
    close(tiny.run(av_example, iv), ivs.run(tiny, av_example, iv), atol=0)


def test_json_round_trip_of_every_primitive(tiny, av_example, silent, tmp_path):
    cache = ivs.cache_activations(tiny, av_example, "resid_post", layers=[1], name="clean")
    means = ivs.compute_means(tiny, [av_example, silent], "resid_pre", layers=[0], by="modality", progress=False,
                              path=str(tmp_path / "means.safetensors"))
    parts = [
        ivs.Zero(layers=range(1, 3), tokens=["video", 0], site="attn_output", heads=[1]),
        ivs.MeanPatch(means, layers=0, tokens="audio", site="resid_pre"),
        ivs.Patch(cache, layers=1, tokens="sinks", sets={"sinks": [3, 9]}),
        ivs.Noise(scale=3.0, std={"video": 0.2}, seed=4, tokens="video"),
        ivs.AttentionKnockout(queries="text", keys="chunk1.audio", layers=slice(2, None)),
        ivs.AttentionBoost(queries=["text", "generated"], keys=[4, 5], alpha=0.2, mode="multiplicative"),
    ]
    combined = ivs.Compose(parts)
    text = json.dumps(combined.to_dict())
    rebuilt = ivs.from_dict(json.loads(text), sources={"clean": cache})
    assert rebuilt == combined and rebuilt.to_dict() == combined.to_dict()
    torch.testing.assert_close(ivs.run(tiny, silent, rebuilt), ivs.run(tiny, silent, combined), rtol=0, atol=0)
    live = ivs.Patch(source=0, tokens="video")
    assert ivs.from_dict(live.to_dict()).source == 0
    with pytest.raises(nav.InputError, match="not saved to a file"):
        ivs.from_dict(json.loads(text))


def test_activation_cache_save_load_and_frame(tiny, av_example, tmp_path):
    cache = ivs.cache_activations(tiny, av_example, ["resid_pre", "mlp"], layers=[0, 2])
    path = cache.save(str(tmp_path / "c.safetensors"))
    loaded = ivs.ActivationCache.load(path)
    assert loaded.layout == cache.layout and sorted(loaded.keys()) == sorted(cache.keys())
    for key in cache.keys():
        assert torch.equal(loaded[key], cache[key])
    frame = loaded.to_frame()
    assert set(frame["point"]) == {"resid_pre", "mlp_output"} and set(frame["layer"]) == {0, 2}


# --------------------------------------------------------------------------- errors


def test_bad_inputs_are_clear_errors(tiny, av_example, av_example_long, silent):
    ex = av_example
    with pytest.raises(nav.InputError, match="unknown site 'resdi_post'"):
        ivs.Zero(site="resdi_post")
    with pytest.raises(nav.TokenSelectionError, match="selects no tokens"):
        ivs.run(tiny, ex, ivs.Zero(layers=0, tokens=[]))
    with pytest.raises(nav.TokenSelectionError, match="selects no tokens"):
        ivs.run(tiny, ex, ivs.Zero(layers=0, tokens="image"))
    with pytest.raises(nav.TokenSelectionError, match="out of range"):
        ivs.run(tiny, ex, ivs.Zero(layers=0, tokens=[len(ex)]))
    with pytest.raises(nav.TokenSelectionError, match="unknown span 'sink'"):
        ivs.run(tiny, ex, ivs.AttentionBoost(queries="text", keys="sink"))
    with pytest.raises(nav.TokenSelectionError, match="out of range"):
        ivs.run(tiny, ex, ivs.AttentionBoost(keys="s"), sets={"s": [10_000]})
    with pytest.raises(nav.InputError, match="head 4 is out of range.*4 attention heads"):
        ivs.run(tiny, ex, ivs.AttentionKnockout(keys="video", heads=[4]))
    with pytest.raises(nav.InputError, match="heads= applies"):
        ivs.Zero(heads=[0])
    with pytest.raises(nav.LayerIndexError, match="out of range"):
        ivs.run(tiny, ex, ivs.Zero(layers=7))
    cache = ivs.cache_activations(tiny, ex, "resid_post", layers=[1])
    with pytest.raises(nav.InputError, match="layouts differ"):
        ivs.run(tiny, av_example_long, ivs.Patch(cache, layers=1))
    with pytest.raises(nav.InputError, match="layouts differ"):
        ivs.run(tiny, [ex, av_example_long], ivs.Patch(source=0, layers=1))
    with pytest.raises(nav.InputError, match="has no 'resid_post@2'"):
        ivs.run(tiny, silent, ivs.Patch(cache, layers=2))
    with pytest.raises(nav.InputError, match="must come before"):
        ivs.run(tiny, [silent, ex], ivs.Patch(source=1, layers=1))
    with pytest.raises(nav.InputError, match="mode must be"):
        ivs.AttentionBoost(keys="video", mode="additive")
    with pytest.raises(nav.InputError, match="alpha >= -1"):
        ivs.AttentionBoost(keys="video", mode="multiplicative", alpha=-2)
    with pytest.raises(nav.InputError, match="attn_logits"):
        ivs.Zero(site="attn_logits")
    with pytest.raises(nav.InputError, match="inside a trace"):
        ivs.Zero().apply(tiny, ex)
    with pytest.raises(nav.InputError, match="this invoke runs an input of"):
        with torch.no_grad(), tiny.trace(ex):
            ivs.Zero().apply(tiny, av_example_long)
    with pytest.raises(nav.InputError, match="no std given for audio"):
        ivs.run(tiny, ex, ivs.Noise(std={"video": 1.0}, tokens="audio"))
    with pytest.raises(nav.InputError, match="unknown intervention type"):
        ivs.from_dict({"type": "Explode"})


def test_patch_source_must_record_in_the_same_forward(tiny, av_example, silent):
    iv = ivs.Patch(source=0, layers=1)
    ivs.run(tiny, [av_example, silent], iv)  # leaves a recording from that forward behind
    with pytest.raises(nav.InputError, match="recorded nothing"):
        with torch.no_grad(), tiny.trace() as tracer:
            with tracer.invoke(av_example):
                pass
            with tracer.invoke(silent):
                iv.apply(tiny)


def test_live_patch_during_generation_restores_the_clean_run(tiny, av_example, silent):
    ids, logits = ivs.generate(tiny, [av_example, silent], ivs.Patch(source=0), max_new_tokens=3,
                               return_logits=True)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)  # every step, generated tokens too
    torch.testing.assert_close(ids[1], ids[0], rtol=0, atol=0)
    _, silent_logits = ivs.generate(tiny, silent, None, max_new_tokens=3, return_logits=True)
    assert not torch.allclose(silent_logits, logits[1], atol=1e-4)
