"""AttentionBoost under SDPA vs a plain SDPA forward, and vs the eager-attention way of boosting.

    python benchmarks/bench_attention_boost.py                       # H200: full-size 7B thinker, bf16
    python benchmarks/bench_attention_boost.py --small --device cpu --tokens 400   # smoke test

Set-up as in ASD (METHOD.md section 6): queries = the text rows, keys = a "cross-modal sink"
set of T/6 media positions (seeded), layers 6..L-1, alpha 0.2; both modes.

- ``plain_trace``: ``model.trace(ex)`` saving the logits, SDPA (the baseline of the ratios);
- ``boost_sdpa_<mode>``: the same trace with ``AttentionBoost(...).apply(model, ex)`` (SDPA runs
  unchanged; the text rows are recomputed with an additive bias);
- ``eager_way_<mode>``: what the authors' code does: eager attention returning every attention
  map (``output_attentions=True``), boosting the logits / probabilities inside the eager
  attention function (registered with transformers, so no nnsight overhead is counted);
- ``hf_sdpa``: a plain HF forward, for reference;
- ``boost_hooks_<mode>``: the same intervention on the hook runtime (``ivs.run(..., runtime="hooks")``:
  PyTorch hooks and the routed attention function, no trace); ``time_hooks_vs_hf`` is its cost
  over the plain HF forward, ``max_abs_logit_diff_hooks_vs_trace`` checks both runtimes agree.

Goals (issue 3): boost_sdpa / plain_trace <= 1.15 in time, peak memory within 10%.
``max_abs_logit_diff`` checks that the SDPA boost and the eager way compute the same thing
(``boost_effect`` is how much the boost moves the logits, for scale).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common import av_input, full_size_model, interleaved, parser, report

import interventions as ivs

EAGER_NAME = "nav_bench_eager_boost"
SPEC: dict = {}


def eager_boost(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with the boost applied to the full attention map (the baseline method)."""
    groups = module.num_key_value_groups
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    logits = torch.matmul(query, k.transpose(2, 3)) * scaling
    active = SPEC and module.layer_idx in SPEC["layers"]
    if active:
        assert query.shape[2] == k.shape[2], "prefill only: query rows are prompt positions"
        index = (slice(None), slice(None), SPEC["rows"][:, None], SPEC["keys"][None, :])
    if active and SPEC["mode"] == "pre_softmax":
        block = logits[index]
        logits[index] = block + SPEC["alpha"] * block.abs()
    if attention_mask is not None:
        logits = logits + attention_mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    if active and SPEC["mode"] == "multiplicative":
        probs[index] = probs[index] * (1 + SPEC["alpha"])
        probs = probs / probs.sum(-1, keepdim=True)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


def register_eager_boost() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(EAGER_NAME, eager_boost)
    AttentionMaskInterface.register(EAGER_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def text_config(model):
    return model.envoy_at(model.adapter.paths["layers"].rsplit(".", 1)[0])._module.config


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--first-layer", type=int, default=6)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = full_size_model(args.device, dtype, attn="sdpa", small=args.small)
    register_eager_boost()
    config = text_config(model)
    layers = list(range(min(args.first_layer, model.num_layers - 1), model.num_layers))
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "layers": layers,
               "alpha": args.alpha, "runs": []}
    for tokens in args.tokens:
        ex = av_input(model, tokens).to(args.device)
        media = ex.spans.media.numpy()
        rng = np.random.default_rng(0)
        sinks = np.sort(rng.choice(media, size=max(1, len(ex) // 6), replace=False))
        sets = {"cross_modal_sinks": torch.as_tensor(sinks)}
        run = {"tokens": len(ex), "query_rows": len(ex.spans.text), "key_columns": len(sinks)}

        def hf_sdpa() -> None:
            with torch.no_grad():
                model._module(**ex.data)

        def plain_trace() -> torch.Tensor:
            with torch.no_grad(), model.trace(ex):
                logits = model.logits.save()
            return logits

        plain_logits = plain_trace().float()
        # bf16 floor of the logit comparison below: eager and SDPA differ without any boost
        SPEC.update(rows=ex.spans.text.to(args.device), keys=torch.as_tensor(sinks, device=args.device),
                    layers=set(), alpha=0.0, mode="pre_softmax")
        config._attn_implementation = EAGER_NAME
        try:
            with torch.no_grad():
                eager_plain = model._module(**ex.data, output_attentions=True).logits.float()
        finally:
            config._attn_implementation = "sdpa"
            SPEC.clear()
        run["max_abs_logit_diff_eager_vs_sdpa_unboosted"] = float((eager_plain - plain_logits).abs().max())
        del eager_plain
        calls = {"hf_sdpa": hf_sdpa, "plain_trace": plain_trace}
        for mode in ("pre_softmax", "multiplicative"):
            iv = ivs.AttentionBoost(queries="text", keys="cross_modal_sinks", alpha=args.alpha, mode=mode,
                                    layers=layers, sets=sets)

            def boosted(iv=iv) -> torch.Tensor:
                with torch.no_grad(), model.trace(ex):
                    iv.apply(model, ex)
                    logits = model.logits.save()
                return logits

            def eager_way(mode=mode) -> torch.Tensor:
                SPEC.update(rows=ex.spans.text.to(args.device), keys=torch.as_tensor(sinks, device=args.device),
                            layers=set(layers), alpha=args.alpha, mode=mode)
                config._attn_implementation = EAGER_NAME
                try:
                    with torch.no_grad():
                        out = model._module(**ex.data, output_attentions=True)
                    assert len(out.attentions) == model.num_layers
                    return out.logits
                finally:
                    config._attn_implementation = "sdpa"
                    SPEC.clear()

            def hooked(iv=iv) -> torch.Tensor:
                with torch.no_grad():
                    return ivs.run(model, ex, iv, runtime="hooks")

            calls[f"boost_sdpa_{mode}"], calls[f"eager_way_{mode}"] = boosted, eager_way
            calls[f"boost_hooks_{mode}"] = hooked
        timings = interleaved(calls, repeat=args.repeat)
        run.update(timings)
        for mode in ("pre_softmax", "multiplicative"):
            ours, eager = timings[f"boost_sdpa_{mode}"], timings[f"eager_way_{mode}"]
            ours_logits, eager_logits = calls[f"boost_sdpa_{mode}"]().float(), calls[f"eager_way_{mode}"]().float()
            run[f"ratios_{mode}"] = {
                "time_boost_vs_plain": ours["ms"] / run["plain_trace"]["ms"],
                "mem_boost_vs_plain": _ratio(ours["peak_extra_gib"], run["plain_trace"]["peak_extra_gib"]),
                "time_eager_vs_boost": eager["ms"] / ours["ms"],
                "mem_eager_vs_boost": _ratio(eager["peak_extra_gib"], ours["peak_extra_gib"]),
                "max_abs_logit_diff": float((ours_logits - eager_logits).abs().max()),
                "boost_effect": float((ours_logits - plain_logits).abs().max()),
                "time_hooks_vs_hf": timings[f"boost_hooks_{mode}"]["ms"] / run["hf_sdpa"]["ms"],
                "max_abs_logit_diff_hooks_vs_trace": float(
                    (calls[f"boost_hooks_{mode}"]().float() - ours_logits).abs().max()),
            }
        results["runs"].append(run)
    report(results, args.out)


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


if __name__ == "__main__":
    main()
