"""ASD: sink-guided decoding against hallucination (METHOD.md section 6).

Two passes per generated token share one batch of two and one KV-cache layout:

- row 0, the *unguided* pass, is the normal greedy decoding step; the attention statistics
  of its last query row at the target layers (text mass ``m_t``, cross-modal vs unimodal
  sink attention ``C``/``U``) are read from its own query and the cached keys, inside the
  attention call of those layers (no attention maps, no extra pass);
- row 1, the *guided* pass, raises the attention logits of text and generated query rows to
  the cross-modal sink columns (``av`` and ``va``) at the boost layers: ``a <- a + alpha |a|``.

Per token: ``out_t = log p_t + s_t (log p_guided,t - log p_t)`` with the adaptive strength

    target = min(cap, lambda * w_t),   w_t = C / (C + U + 1e-8)
    if m_t > thr:  target *= (1 + cos(pi * min(1, (m_t - thr) / width))) / 2
    if w_t < gate: target *= (w_t / gate) ** 2
    s_t = momentum * s_{t-1} + (1 - momentum) * target,   s_1 = 0

The guided pass differs from the unguided one only from the first boosted query row on (the
first text row after the earliest boosted column), so its prompt KV is the prefill's up to
that row and only the prompt's tail (the question, a few dozen tokens) is recomputed.

Parts: `analyses.asd_config` (`ASDConfig`), `analyses.asd_schedule` (the strength schedule),
`analyses.asd_kernel` (the decode attention kernel), `analyses.asd_hook` (the routed-attention
hook and sink sets); this module holds the loop, `asd_generate`, and re-exports the rest.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from interventions.runtime.decoder import Decoder, sync_device
from interventions.runtime.hooks import applied
from interventions.runtime.static_decoder import use_static
from nnsight_av.errors import InputError

from .asd_config import SINK_SETS, SINK_SHORTCUTS, ASDConfig  # noqa: F401  (re-exported)
from .asd_hook import ASDHook, as_sink_sets, asd_sink_sets, fused_sink_sets, step_statistics
from .asd_kernel import decode_attention  # noqa: F401  (re-exported)
from .asd_static import static_asd_loop
from .asd_schedule import next_strength, strength_schedule, strength_target  # noqa: F401  (re-exported)
from .decoding import DecodeOutput, as_inputs, check_new_tokens
from .plots import plot_asd_steps
from .sinks import resolve_sink_dims, sink_scores

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["ASDConfig", "ASDOutput", "asd_generate", "strength_target", "next_strength", "strength_schedule",
           "decode_attention", "asd_sink_sets", "SINK_SETS"]

# ---------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------
@dataclass(repr=False)
class ASDOutput(DecodeOutput):
    """`DecodeOutput` plus ASD's per-step diagnostics and the sink sets used.

    ``steps`` holds equal-length lists keyed ``s`` (applied strength), ``target``, ``w``,
    ``m``, ``C``, ``U``, ``fallback`` (the step was decoded greedily), ``reason`` (why) and
    ``changed`` (the mixed choice differs from the unguided argmax). ``sinks``: the av/va/aa/vv
    positions. ``logprobs``: with ``keep_logprobs=True``, per step the unguided and guided
    log-probabilities ``[steps, 2, vocab]`` (not serialised).
    """

    steps: dict[str, list[Any]] = field(default_factory=dict)
    sinks: dict[str, list[int]] = field(default_factory=dict)
    logprobs: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": "ASDOutput", **asdict(self)}
        data.pop("logprobs", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ASDOutput":
        data = {k: v for k, v in data.items() if k not in ("kind", "logprobs")}
        return cls(**data)

    @property
    def s(self) -> np.ndarray:
        return np.asarray(self.steps.get("s", []), dtype=np.float64)

    @property
    def w(self) -> np.ndarray:
        return np.asarray(self.steps.get("w", []), dtype=np.float64)

    @property
    def m(self) -> np.ndarray:
        return np.asarray(self.steps.get("m", []), dtype=np.float64)

    @property
    def fallback(self) -> np.ndarray:
        return np.asarray(self.steps.get("fallback", []), dtype=bool)

    def to_frame(self) -> "pd.DataFrame":
        """One row per generated token with ASD's diagnostics (`diagnostics`)."""
        return self.diagnostics()

    def diagnostics(self) -> "pd.DataFrame":
        """One row per generated token: token, s_t, target, w_t, m_t, C, U, fallback, reason, changed."""
        import pandas as pd

        frame = pd.DataFrame({"step": list(range(1, len(self.token_ids) + 1)), "token_id": self.token_ids,
                              **self.steps})
        return frame

    def plot(self, tokenizer: Any = None, figsize: tuple[float, float] = (9.0, 5.0)) -> "Figure":
        """Strength s_t (and its target), adaptive weight w_t and text mass m_t per step; see `plot_asd_steps`."""
        return plot_asd_steps(self, tokenizer, figsize)


# ---------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------
def asd_generate(
    model: "AVModel",
    inputs: "AVInputs",
    max_new_tokens: int = 64,
    config: ASDConfig = ASDConfig(),
    *,
    sinks: Any = None,
    keep_logprobs: bool = False,
    backend: str = "auto",
    interventions: Any = None,
    static: bool | None = None,
    graph: bool | None = None,
) -> ASDOutput:
    """Sink-guided decoding (greedy choice on the mixed log-probabilities).

    ``sinks``: the av/va/aa/vv sets to use (a `SinkSplit`, `SinkAnalysis`, or a mapping of
    positions); default: found on the prompt as `asd_sink_sets` does (global sinks with
    ``N = config.k_divide``, MDS split), fused into the prefill that starts the KV cache.
    If the input lacks audio or video, no sink dimension is known, or no column is left to
    boost, every step falls back to greedy (``steps["fallback"]``, with the reason); a step
    whose statistics are unusable (no attention on any sink set) falls back too. Nothing
    becomes NaN. ``backend``: decode attention through the Triton kernel on CUDA ("auto"),
    or the written-out torch path ("torch"). ``interventions``: the user's own, applied to every
    forward (the sink-finding prefill, both branches, every step) on the hook runtime, on top
    of ASD's routed attention. ``static``/``graph``: as for `greedy_generate` (the static path keeps
    the statistics and the strength schedule on the device, `analyses.asd_static`; it is not used
    with ``keep_logprobs`` or ``interventions``); ``meta["decode"]`` says which ran.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="Describe what you see and hear in a single sentence.")
    >>> sets = {"av": ex.spans.audio[:2], "va": ex.spans.video[:2], "aa": ex.spans.audio[2:4], "vv": ex.spans.video[2:4]}
    >>> out = asd_generate(model, ex, max_new_tokens=4, config=ASDConfig(boost_start=1), sinks=sets)
    >>> out.steps["s"][0], len(out.steps["w"]) == out.num_new_tokens
    (0.0, True)
    """
    check_new_tokens(max_new_tokens)
    if not isinstance(config, ASDConfig):
        raise InputError(f"config must be an ASDConfig, got {type(config).__name__}")
    if backend not in ("auto", "triton", "torch"):
        raise InputError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    ex = as_inputs(model, inputs)
    decoder = Decoder(model)
    static = use_static(decoder, static, {"interventions": interventions is not None, "keep_logprobs": keep_logprobs})
    length = len(ex)
    layers = decoder.num_layers
    labels = ex.spans.modality_of()
    media = ex.spans.media
    tail_start = int(media.max()) + 1 if media.numel() else 0
    start = time.perf_counter()

    hook = ASDHook(decoder.attention, config, config.target_layers(layers), decoder.device, model.num_heads, backend)
    empty = {name: torch.zeros(0, dtype=torch.long) for name in SINK_SETS}
    reason_global = ""
    scores: dict[int, torch.Tensor] = {}
    handles: list[Any] = []
    fused = sinks is None
    dims: list[int] = []
    tau = float(model.adapter.tau() if config.tau is None else config.tau)
    criterion = model.adapter.sink_criterion() if config.criterion is None else config.criterion
    if fused:
        video, audio = ex.spans.video, ex.spans.audio
        if video.numel() == 0 or audio.numel() == 0:
            reason_global = "no sink sets: the input lacks audio or video tokens"
        else:
            dims = resolve_sink_dims(model, config.sink_dims, ex)
            if not dims:
                reason_global = "no sink sets: no sink dimension is known or found for this model"
        if reason_global:
            fused, sets = False, empty
        else:
            hook.media_cols = torch.sort(torch.cat([video, audio])).values.to(decoder.device)
            groups = torch.full((length,), -1, dtype=torch.long)
            groups[video], groups[audio] = 0, 1
            hook.row_groups = groups.to(decoder.device)

            def residual(layer: int) -> Any:
                def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    scores[layer] = sink_scores(hidden[0], dims, criterion)
                return pre

            handles = [decoder.layers[l].register_forward_pre_hook(residual(l), with_kwargs=True)
                       for l in range(layers)]
    else:
        sets = as_sink_sets(sinks, length)

    steps: dict[str, list[Any]] = {k: [] for k in ("s", "target", "w", "m", "C", "U", "fallback", "reason", "changed")}
    kept: list[torch.Tensor] = []
    ids: list[int] = []
    finished = False

    def record(*values: Any) -> None:
        for key, value in zip(steps, values):
            steps[key].append(value)

    with torch.inference_mode(), decoder.hooked(hook), applied(model, ex, interventions):
        if fused:
            hook.mode = "analysis"
        else:
            hook.set_sets(sets, config.boost_layers(layers), length, tail_start)
            hook.mode = "prefill"
        try:
            prefill = decoder.prefill(decoder.data(ex))
        finally:
            for handle in handles:
                handle.remove()
        if fused:
            sets = fused_sink_sets(hook, scores, ex, dims, tau, config, layers, model.num_heads, criterion)
            hook.set_sets(sets, config.boost_layers(layers), length, tail_start)
            for layer, probs in hook.last_rows.items():
                hook._record(layer, probs)
            hook.mode = "prefill"
        first_stats = hook.read()
        boost_cols = hook.cols.cpu()
        if not reason_global and boost_cols.numel() == 0:
            reason_global = "no cross-modal sink to boost"
        guided_on = not reason_global

        # First boosted query row: the first text row after the earliest boosted column (earlier text
        # rows cannot see any boosted column, so the guided pass equals the unguided one up to there).
        if config.boost_rows == "text" and boost_cols.numel():
            first_col = int(boost_cols.min())
            later_text = [p for p in range(first_col + 1, length) if labels[p] == "text"]
            first_row = later_text[0] if later_text else length
        else:
            first_row = length

        unguided = torch.log_softmax(prefill.logits[0], -1)
        guided = unguided
        if guided_on:
            kv = decoder.kv(prefill.cache)
            if first_row < length:
                hook.mode, hook.guided = "tail", (0,)
                hook.rows = torch.tensor([p - first_row for p in range(first_row, length) if labels[p] == "text"],
                                         dtype=torch.long, device=decoder.device)
                guided_cache = decoder.new_cache([(k[:, :, :first_row], v[:, :, :first_row]) for k, v in kv])
                positions = None if prefill.positions is None else prefill.positions[..., first_row:]
                guided = torch.log_softmax(decoder.run(prefill.embeds[:, first_row:], positions, guided_cache)[0], -1)
                guided_kv = decoder.kv(guided_cache)
            else:
                guided_kv = kv
            cache = decoder.new_cache([(torch.cat([k0, kg]), torch.cat([v0, vg]))
                                       for (k0, v0), (kg, vg) in zip(kv, guided_kv)])
        else:
            cache = prefill.cache
        batch = 2 if guided_on else 1
        hook.start_decode(batch)

        w, m, c, u = step_statistics(first_stats, config)
        previous = 0.0
        how = "dynamic"
        if static:
            ids, finished, steps, how = static_asd_loop(decoder, prefill, cache, hook, config, guided_on, unguided,
                                                        guided, (w, m, c, u), max_new_tokens, graph)
            steps["reason"] = [(reason_global or "first token") if t == 0 else
                               (reason_global or "no attention on any sink set") if fallback else ""
                               for t, fallback in enumerate(steps["fallback"])]
            steps = {key: steps[key] for key in ("s", "target", "w", "m", "C", "U", "fallback", "reason", "changed")}
        else:
            for step in range(max_new_tokens):
                if step == 0:
                    s = float(config.first_strength) if guided_on else 0.0
                    target, fallback, reason = 0.0, not guided_on, reason_global or "first token"
                elif guided_on and math.isfinite(w) and math.isfinite(m) and (c + u) > 0:
                    target = strength_target(w, m, config)
                    s = config.momentum * previous + (1.0 - config.momentum) * target
                    fallback, reason = False, ""
                else:
                    target, s, fallback = 0.0, 0.0, True
                    reason = reason_global or "no attention on any sink set"
                mixed = unguided if s == 0.0 else unguided + s * (guided - unguided)
                token = mixed.argmax()
                value, plain = torch.stack([token, unguided.argmax()]).tolist()     # one device sync
                ids.append(value)
                record(s, target, w, m, c, u, fallback, reason, value != plain)
                if keep_logprobs:
                    kept.append(torch.stack([unguided, guided]).cpu())
                previous = s
                if value in decoder.eos:
                    finished = True
                    break
                if step == max_new_tokens - 1:
                    break
                logits = decoder.step(token.reshape(1).expand(batch), prefill, step, cache)
                w, m, c, u = step_statistics(hook.read(), config)
                both = torch.log_softmax(logits, -1)
                unguided = both[0]
                guided = both[1] if guided_on else unguided
    sync_device(decoder.device)
    ms = (time.perf_counter() - start) * 1000
    return ASDOutput(
        "asd", decoder.decode_text(ids), ids, length, ms, finished,
        {"max_new_tokens": max_new_tokens, "config": config.to_dict()},
        {"first_boosted_row": first_row, "boost_columns": int(boost_cols.numel()), "sink_dims": list(dims),
         "tau": tau if fused else None, "decode": how},
        steps, {name: sets[name].tolist() for name in SINK_SETS},
        torch.stack(kept) if keep_logprobs and kept else None,
    )
