"""Causal tracing speed: the exact sweep, attribution patching and the whole per-clip pipeline vs baselines.

    python benchmarks/bench_tracing.py                         # H200: full-size Qwen2.5-Omni-7B thinker, bf16
    python benchmarks/bench_tracing.py --small --device cpu    # smoke test

Goals (issue 5), each against a baseline measured in the same run, one clip of ~1.7k tokens:

1. exact layer sweep (one-layer windows at every layer x 6 token sets) vs the naive loop (one full
   nnsight forward per condition): >= 1.8x, identical effects (max |diff| <= 1e-3);
2. attribution patching over the same grid vs the naive loop: >= 20x; its Spearman rank
   correlation with the exact effects is reported;
3. the whole per-clip pipeline (sinks + MDS, av / a / v letter probabilities, the 6 token sets
   patched at all layers: `analyses.runner.analyze_clip`) vs the authors' way: a model with eager
   attention, one forward with attention maps and hidden states for sinks + MDS, one ``generate``
   per run (av, a, v; and for each token set a clean ``generate`` that caches the patched states
   plus the patched ``generate``, as in their ``trace_with_patch_memory_optimized``): >= 4x.

The clip is audio-dominant by construction (video tokens are patched, as in the paper's Table 1).
Random weights have no massive activations, so the sink threshold is set to the 80th percentile
of the sink scores on the known sink dimensions (channels 0, 1 for ``--small``), which gives a
realistic number of sinks. ``generate`` makes exactly ``--new-tokens`` tokens (EOS switched off).
With random weights every letter has probability ~1/vocab and every effect is ~0, which would
make the agreement checks vacuous: the LM head's rows of the 20 answer letters get random
weights that give letter logits of standard deviation ~8 and every other row is zeroed (the
same matrix, so the same compute), so the letters take most of the probability and the
effects are of order 0.01-0.1 (``--no-letter-head`` keeps the random head).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import av_input, full_size_model, parser, report, top_kernels  # noqa: E402

from analyses import ablate, causal_trace, option_token_ids, rank_agreement  # noqa: E402
from analyses.datasets import ClipRecord  # noqa: E402
from analyses.mds import modality_dominance, sink_analysis  # noqa: E402
from analyses.options import letter_probs  # noqa: E402
from analyses.runner import PipelineConfig, analyze_clip  # noqa: E402
from analyses.sinks import phi, select_global_sinks  # noqa: E402
from analyses.tracing import resolve_token_sets  # noqa: E402

OPTIONS = list("ABCDEFGHIJKLMNOPQRST")
TOKEN_SETS = ("all", "sink", "random", "cross_modal_sink", "unimodal_sink", "random_cross_modal_sink")


def letter_head(model, scale: float = 8.0, seed: int = 0) -> None:
    """Answer letters get random LM-head rows (logit std ~``scale``), every other row zero."""
    from nnsight_av.adapters.base import get_module

    ids = sorted({i for v in option_token_ids(model.tokenizer, OPTIONS) for i in v})
    weight = get_module(model._module, model.adapter.paths["lm_head"]).weight
    rows = torch.randn(len(ids), weight.shape[1], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        weight.zero_()
        weight[ids] = (rows * scale / weight.shape[1] ** 0.5).to(weight.device, weight.dtype)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Median wall time in ms of ``repeat`` calls (after the caller's warm-up) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times)), out


# ---------------------------------------------------------------------------------------
# the authors' way (written here from the paper's description and their released pipeline)
# ---------------------------------------------------------------------------------------
def authors_pipeline(model, clean, no_audio, no_video, dims, tau, k_divide, new_tokens, seed=0) -> dict:
    """Eager maps + hidden states for sinks / MDS, then one HF ``generate`` per run, patches by forward hooks."""
    from nnsight_av.adapters.base import get_module

    module = model._module
    ids = option_token_ids(model.tokenizer, OPTIONS)
    spans = clean.spans
    with torch.no_grad():
        out = module(**clean.data, output_attentions=True, output_hidden_states=True, use_cache=False)
    hidden = torch.stack(out.hidden_states[:-1])[:, 0]                     # [L, T, H]
    scores = phi(hidden)[..., dims].amax(-1)                               # [L, T]
    kept = select_global_sinks((scores > tau).cpu(), int(len(clean) / k_divide))
    modality = spans.modality_of()
    sinks = torch.tensor(sorted(int(p) for p in kept.tolist() if modality[int(p)] in ("video", "audio")))
    video_rows = torch.zeros(len(clean), dtype=torch.bool, device=hidden.device)
    audio_rows = torch.zeros_like(video_rows)
    video_rows[spans.video.to(hidden.device)] = True
    audio_rows[spans.audio.to(hidden.device)] = True
    mds = []
    for attn in out.attentions:                                            # [1, heads, T, T]
        mean = attn[0].float().mean(0)[:, sinks.to(hidden.device)]         # [T, sinks]
        after = torch.arange(len(clean), device=hidden.device)[:, None] > sinks.to(hidden.device)[None]
        v = (mean * (after & video_rows[:, None])).sum(0) / (after & video_rows[:, None]).sum(0).clamp(min=1)
        a = (mean * (after & audio_rows[:, None])).sum(0) / (after & audio_rows[:, None]).sum(0).clamp(min=1)
        mds.append((v - a) / (v + a + 1e-9))
    mds = torch.stack(mds).nanmean(0).cpu()
    del out
    video_sinks = [(int(s), float(m)) for s, m in zip(sinks.tolist(), mds.tolist()) if modality[s] == "video"]
    ranked = [s for s, _ in sorted(video_sinks, key=lambda x: (x[1], x[0]))]
    half = len(ranked) // 2
    rng = np.random.default_rng(seed)
    video = spans.video.tolist()
    sink_list = sorted(s for s, _ in video_sinks)
    sets = {"all": video, "sink": sink_list,
            "random": sorted(rng.choice(video, min(len(sink_list), len(video)), replace=False).tolist()),
            "cross_modal_sink": sorted(ranked[:half]), "unimodal_sink": sorted(ranked[half:]),
            "random_cross_modal_sink": sorted(rng.choice(video, half, replace=False).tolist())}

    def generate(item):
        with torch.no_grad():
            result = module.generate(**item.data, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, output_scores=True, return_dict_in_generate=True)
        return letter_probs(result.scores[0][0], ids)

    probs = {name: generate(item) for name, item in (("av", clean), ("a", no_video), ("v", no_audio))}
    norms = [get_module(module, model.adapter.paths["layers"])[l].input_layernorm for l in range(model.num_layers)]
    effects = {}
    for name, positions in sets.items():
        cached: dict[int, torch.Tensor] = {}

        def save(layer):
            def hook(mod, args, output):
                if output.shape[1] > 1:
                    cached[layer] = output[0, positions].detach().clone()
            return hook

        def patch(layer):
            def hook(mod, args, output):
                if output.shape[1] > 1:
                    output[0, positions] = cached[layer]
            return hook

        handles = [n.register_forward_hook(save(l)) for l, n in enumerate(norms)]
        generate(clean)
        for h in handles:
            h.remove()
        handles = [n.register_forward_hook(patch(l)) for l, n in enumerate(norms)]
        effects[name] = generate(no_audio)
        for h in handles:
            h.remove()
    return {"probs": probs, "patched": effects}


def pipeline_stages(model, record, config) -> dict:
    """ms of each step of `analyze_clip`, run one after the other (the ablated inputs not on a thread)."""
    from analyses.runner import _Clip, _clean_stage, _corrupt_stage, _finish, ablated_inputs, clean_input

    times, clock = {}, [time.perf_counter()]

    def mark(name: str) -> None:
        sync()
        now = time.perf_counter()
        times[name] = (now - clock[0]) * 1000
        clock[0] = now
    clean = clean_input(model, record)
    mark("prepare_clean")
    clip = _Clip(record, clean)
    clip.only_audio, clip.only_video = ablated_inputs(model, clean, config)
    mark("prepare_ablated")
    _clean_stage(model, [clip], config)
    mark("clean_stage")
    _corrupt_stage(model, [clip], config)
    mark("corrupt_stage")
    _finish(model, clip, config)
    mark("finish")
    times["sum"] = sum(times.values())
    return times


def float32_check(args, ex, sets: dict) -> dict:
    """Exact vs naive on a float32 copy of the model (same seed, same letter head), two token sets.

    In bf16 the two methods round differently (other kernels, other reduction orders), and a
    28-layer random model amplifies that; float32 shows whether they compute the same thing.
    """
    model = full_size_model(args.device, torch.float32, small=args.small)
    if not args.no_letter_head:
        letter_head(model)
    try:
        item = model.prepare(video=ex.request.video, audio=ex.request.audio, text=ex.request.text).to(args.device)
        no_audio = ablate(item, "audio", model).to(args.device)
        kw = dict(token_sets={k: sets[k] for k in ("all", "sink")}, window=1, dominant="audio", progress=False)
        exact = causal_trace(model, item, no_audio, OPTIONS, batch_size=6, **kw)
        naive = causal_trace(model, item, no_audio, OPTIONS, method="naive", **kw)
        cols = ["ie_clean", "ie_corrupt"]
        return {"conditions": len(exact.effects),
                "max_abs_diff_vs_naive": float((exact.effects[cols] - naive.effects[cols]).abs().max().max()),
                "max_abs_effect": float(naive.effects[cols].abs().max().max())}
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=2, help="tokens per generate in the authors' way "
                                                             "(a letter and the end token)")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 6], help="conditions per forward (exact sweep)")
    p.add_argument("--sweep-repeat", type=int, default=1)
    p.add_argument("--skip-naive", action="store_true", help="skip the (slow) naive sweep")
    p.add_argument("--no-letter-head", action="store_true", help="keep the random LM head (effects ~0)")
    p.add_argument("--no-float32-check", action="store_true",
                   help="skip the exact-vs-naive identity check on a float32 copy of the model (GPU)")
    args = p.parse_args()
    if args.small:
        args.tokens = [t if t != 1700 else 300 for t in args.tokens]
        args.repeat = min(args.repeat, 2)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = full_size_model(args.device, dtype, small=args.small)
    eager = full_size_model(args.device, dtype, attn="eager", small=args.small)
    for m in (model, eager):
        m._module.generation_config.eos_token_id = []
        if not args.no_letter_head:
            letter_head(m)
    dims = model.adapter.known_sink_dims() or [0, 1]
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
               "layers": model.num_layers, "new_tokens": args.new_tokens, "letter_head": not args.no_letter_head,
               "runs": []}
    for tokens in args.tokens:
        ex = av_input(model, tokens).to(args.device)
        no_audio = ablate(ex, "audio", model).to(args.device)               # the corrupted run (audio-dominant)
        no_video = ablate(ex, "video", model).to(args.device)
        # sinks: random weights have no massive activations, so threshold at a score quantile
        found, _ = sink_analysis(model, ex, dims=dims, tau=0.0, progress=False)
        tau = float(torch.quantile(found.scores.flatten(), 0.8))
        sinks = found.with_params(tau=tau)
        split = modality_dominance(model, ex, sinks, progress=False).split()
        sets = resolve_token_sets(ex, "video", TOKEN_SETS, sinks=sinks, split=split, seed=0, clip="bench")
        run = {"tokens": len(ex), "video_tokens": int(ex.spans.video.numel()), "tau": tau,
               "token_sets": {k: int(v.numel()) for k, v in sets.items()}}
        kw = dict(token_sets=sets, window=1, dominant="audio", progress=False)
        # warm-up (kernels, allocator) on a short sweep of each kind
        for method in ("exact", "naive", "attribution"):
            causal_trace(model, ex, no_audio, OPTIONS, **{**kw, "token_sets": {"all": sets["all"]}},
                         layers=[model.num_layers - 1], method=method)
        conditions = len(sets) * model.num_layers
        sweep: dict = {"conditions": conditions}
        exact_ms = {}
        exact = None
        for b in args.batch_sizes:
            exact_ms[b], exact = timed(lambda: causal_trace(model, ex, no_audio, OPTIONS, batch_size=b, **kw),
                                       args.sweep_repeat)
        best = min(exact_ms, key=exact_ms.get)
        if len(exact_ms) > 1:   # the same method with another batch composition: the bf16 rounding floor
            other = causal_trace(model, ex, no_audio, OPTIONS, batch_size=min(exact_ms), **kw)
            cols = ["ie_clean", "ie_corrupt"]
            sweep["bf16_floor_batch1_vs_batch%d" % max(exact_ms)] = float(
                (other.effects[cols] - exact.effects[cols]).abs().max().max())
        sweep["exact_ms"] = {str(b): v for b, v in exact_ms.items()}
        attr_ms, attr = timed(lambda: causal_trace(model, ex, no_audio, OPTIONS, method="attribution", **kw),
                              args.sweep_repeat)
        if not args.skip_naive:
            naive_ms, naive = timed(lambda: causal_trace(model, ex, no_audio, OPTIONS, method="naive", **kw))
            diff = (exact.effects[["ie_clean", "ie_corrupt"]] - naive.effects[["ie_clean", "ie_corrupt"]]).abs()
            sweep.update({"naive_ms": naive_ms, "exact_speedup": naive_ms / exact_ms[best], "best_batch_size": best,
                          "max_abs_diff_vs_naive": float(diff.max().max()),
                          "max_abs_effect": float(naive.effects[["ie_clean", "ie_corrupt"]].abs().max().max()),
                          "attribution_ms": attr_ms, "attribution_speedup": naive_ms / attr_ms})
        if not args.no_float32_check:
            sweep["float32_check"] = float32_check(args, ex, sets)
        agreement = rank_agreement(exact, attr)
        sweep["attribution_spearman"] = {k: agreement[k] for k in ("ie_clean", "ie_corrupt")}
        sweep["max_abs_effect_exact"] = float(exact.effects[["ie_clean", "ie_corrupt"]].abs().max().max())
        # The other direction too (video removed, audio tokens patched): in a random model the audio
        # tokens, which follow each chunk's video tokens, carry more of the removed modality.
        audio_sets = resolve_token_sets(ex, "audio", TOKEN_SETS, sinks=sinks, split=split, seed=0, clip="bench")
        kw_v = dict(token_sets=audio_sets, window=1, dominant="video", progress=False)
        exact_v = causal_trace(model, ex, no_video, OPTIONS, batch_size=best, **kw_v)
        attr_v = causal_trace(model, ex, no_video, OPTIONS, method="attribution", **kw_v)
        agreement = rank_agreement(exact_v, attr_v)
        sweep["video_dominant_direction"] = {
            "attribution_spearman": {k: agreement[k] for k in ("ie_clean", "ie_corrupt")},
            "max_abs_effect_exact": float(exact_v.effects[["ie_clean", "ie_corrupt"]].abs().max().max())}
        run["sweep"] = sweep

        record = ClipRecord(id="bench", prompt=ex.request.text, options=OPTIONS, frames=ex.request.video,
                            wave=ex.request.audio, dominant="audio")
        # the pipeline's patched runs are the 6 all-layer windows: batched whatever the sweep's best batch was
        config = PipelineConfig(token_sets=TOKEN_SETS, sink_dims=dims, tau=tau, batch_size=max(args.batch_sizes))

        def ours():
            return analyze_clip(model, record, config)

        def theirs():
            clean = eager.prepare(video=ex.request.video, audio=ex.request.audio, text=ex.request.text)
            a_in, v_in = ablate(clean, "video", eager), ablate(clean, "audio", eager)
            return authors_pipeline(eager, clean.to(args.device), v_in.to(args.device), a_in.to(args.device), dims,
                                    tau, 2, args.new_tokens)

        ours()
        theirs()
        ours_ms, ours_out = timed(ours, args.repeat)
        theirs_ms, theirs_out = timed(theirs, args.repeat)
        peak = {}
        if cuda:
            for name, fn in (("ours", ours), ("authors", theirs)):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        # where our per-clip time goes (same steps as analyze_clip, timed one by one)
        from analyses.runner import pipeline_sinks
        from analyses.tracing import PatchRunner, Condition

        runner = PatchRunner(model, "input_layernorm", OPTIONS)
        media = torch.sort(torch.cat([ex.spans.video, ex.spans.audio])).values
        parts = {}
        parts["prepare_and_ablate"], _ = timed(lambda: (record.prepare(model), ablate(ex, "audio", model),
                                                        ablate(ex, "video", model)))
        parts["sinks_mds"], _ = timed(lambda: pipeline_sinks(model, ex, config))
        parts["clean_run_alone"], clean_rec = timed(lambda: runner.record_clean(ex, media, range(model.num_layers)))
        parts["sinks_mds_with_clean_run"], _ = timed(lambda: runner.record_clean_during(
            lambda: pipeline_sinks(model, ex, config), ex, media, range(model.num_layers)))
        parts["corrupt_runs_x2"], rec = timed(lambda: (runner.record_corrupt(no_video, [0]),
                                                      runner.record_corrupt(no_audio, [0]))[1])
        parts["corrupt_runs_x2_one_forward"], _ = timed(lambda: runner.record_corrupt_batch([no_video, no_audio], [0]))
        conds = [Condition(k, v, tuple(range(model.num_layers))) for k, v in sets.items()]
        most = max(args.batch_sizes)
        parts["patched_runs_x6"], _ = timed(lambda: runner.run(clean_rec, rec, conds, batch_size=most))
        parts["patched_runs_x6_one_by_one"], _ = timed(lambda: runner.run(clean_rec, rec, conds, batch_size=1))
        parts["patched_batches"] = [len(b) for b in runner._skipping_batches(rec, conds, range(len(conds)), most)]
        parts["patched_rows"] = [int(runner._skipping_rows(rec, c).numel()) for c in conds]
        parts["one_forward"], _ = timed(lambda: runner.corrupt_probs(no_audio))
        if cuda:   # where the GPU time of the batched patched runs goes, next to one plain forward
            run["profile"] = {"patched_runs_x6_batched": top_kernels(lambda: runner.run(
                clean_rec, rec, conds, batch_size=max(args.batch_sizes))),
                "one_forward": top_kernels(lambda: runner.corrupt_probs(no_audio)),
                "sweep_batch_at_layer_0": top_kernels(lambda: runner._run_batch(
                    clean_rec, rec, [Condition(k, v, (0,)) for k, v in sets.items()]))}
        run["pipeline_breakdown_ms"] = parts
        stages = [pipeline_stages(model, record, config) for _ in range(args.repeat)]
        run["pipeline_stages_ms"] = {k: float(np.median([s[k] for s in stages])) for k in stages[0]}
        gen = lambda: eager._module.generate(**ex.data, max_new_tokens=args.new_tokens,  # noqa: E731
                                             min_new_tokens=args.new_tokens, do_sample=False)
        with torch.no_grad():
            gen()
            run["authors_breakdown_ms"] = {"one_generate": timed(lambda: gen())[0]}
        ours_av = torch.tensor(ours_out["probs"]["av"])
        run["pipeline"] = {"ours_ms": ours_ms, "authors_ms": theirs_ms, "speedup": theirs_ms / ours_ms,
                           "peak_extra_gib": peak, "batch_size": best,
                           "av_probs_max_abs_diff": float((ours_av - theirs_out["probs"]["av"].cpu()).abs().max()),
                           "traced_sets": len(ours_out["trace"]["rows"]) if ours_out.get("trace") else 0}
        run["goals"] = {"exact_speedup>=1.8": run["sweep"].get("exact_speedup", 0) >= 1.8,
                        "exact_identical<=1e-3 (float32)": run["sweep"].get("float32_check", {}).get("max_abs_diff_vs_naive", 1) <= 1e-3,
                        "attribution_speedup>=20": run["sweep"].get("attribution_speedup", 0) >= 20,
                        "pipeline_speedup>=4": run["pipeline"]["speedup"] >= 4}
        results["runs"].append(run)
    report(results, args.out)


if __name__ == "__main__":
    main()
