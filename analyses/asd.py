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
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from nnsight_av.errors import InputError, TokenSelectionError

from .decoding import AttentionHook, DecodeOutput, Decoder, _as_inputs, _check_tokens, _sync, boosted_attention

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["ASDConfig", "ASDOutput", "asd_generate", "strength_target", "next_strength", "strength_schedule",
           "asd_sink_sets", "SINK_SETS"]

SINK_SETS = ("av", "va", "aa", "vv")


@dataclass(frozen=True)
class ASDConfig:
    """Every constant of ASD, with the paper's defaults (METHOD.md section 6).

    Sinks: ``k_divide`` (N in K = int(T / N)), ``sink_dims`` / ``tau`` (None: the adapter's),
    ``split_rule`` ("rank" or "sign").
    Guided pass: ``alpha``; ``boost_mode`` ("pre_softmax": a + alpha |a|, or "multiplicative");
    ``boost_sets`` (the boosted columns); layers ``boost_start .. boost_end`` inclusive
    (None: the last layer); ``boost_rows``: "text" (prompt text rows and generated rows) or
    "generated" (generated rows only).
    Statistics: layers ``target_start .. target_end`` inclusive; ``cross_sets`` (C) and
    ``unimodal_sets`` (U); ``sink_reduce``: "mean" (mean over heads and the set's columns,
    the default reading of "mean attention to av sinks") or "sum" (mean over heads of the
    summed attention to the set).
    Schedule: ``lam`` (lambda), ``cap``, ``text_mass_threshold`` / ``text_mass_width`` (the
    cosine decay), ``gate`` / ``gate_power`` (the soft gate), ``momentum``, ``first_strength``
    (s_1), ``eps`` (in w_t).
    Layer ranges beyond a small model's depth are clipped to its last layer.

    >>> ASDConfig().boost_layers(28)[:3], ASDConfig().target_layers(28)
    ([6, 7, 8], [18, 19, 20, 21, 22, 23, 24, 25])
    >>> ASDConfig().boost_layers(4), ASDConfig().target_layers(4)
    ([3], [3])
    """

    k_divide: float = 3.0
    sink_dims: tuple[int, ...] | None = None
    tau: float | None = None
    split_rule: str = "rank"
    alpha: float = 0.2
    boost_mode: str = "pre_softmax"
    boost_sets: tuple[str, ...] = ("av", "va")
    boost_start: int = 6
    boost_end: int | None = None
    boost_rows: str = "text"
    target_start: int = 18
    target_end: int | None = 25
    cross_sets: tuple[str, ...] = ("av", "va")
    unimodal_sets: tuple[str, ...] = ("aa", "vv")
    sink_reduce: str = "mean"
    lam: float = 0.5
    cap: float = 0.6
    text_mass_threshold: float = 0.4
    text_mass_width: float = 0.2
    gate: float = 0.6
    gate_power: float = 2.0
    momentum: float = 0.5
    first_strength: float = 0.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("boost_sets", "cross_sets", "unimodal_sets"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            bad = [s for s in value if s not in SINK_SETS]
            if bad:
                raise InputError(f"ASDConfig.{name}: unknown sink sets {bad}; use {list(SINK_SETS)}")
        if self.sink_dims is not None:
            object.__setattr__(self, "sink_dims", tuple(int(d) for d in self.sink_dims))
        checks = [
            (self.k_divide > 0, f"k_divide must be positive, got {self.k_divide}"),
            (self.split_rule in ("rank", "sign"), f"split_rule must be 'rank' or 'sign', got {self.split_rule!r}"),
            (self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (self.boost_mode in ("pre_softmax", "multiplicative"),
             f"boost_mode must be 'pre_softmax' or 'multiplicative', got {self.boost_mode!r}"),
            (self.boost_rows in ("text", "generated"), f"boost_rows must be 'text' or 'generated', got {self.boost_rows!r}"),
            (self.sink_reduce in ("mean", "sum"), f"sink_reduce must be 'mean' or 'sum', got {self.sink_reduce!r}"),
            (self.boost_start >= 0 and self.target_start >= 0, "layer indices must be >= 0"),
            (self.boost_end is None or self.boost_end >= self.boost_start, "boost_end must be >= boost_start"),
            (self.target_end is None or self.target_end >= self.target_start, "target_end must be >= target_start"),
            (self.lam >= 0 and self.cap >= 0, "lam and cap must be >= 0"),
            (self.text_mass_width > 0, f"text_mass_width must be positive, got {self.text_mass_width}"),
            (self.gate > 0, f"gate must be positive, got {self.gate}"),
            (0 <= self.momentum <= 1, f"momentum must lie in [0, 1], got {self.momentum}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"ASDConfig: {message}")

    @staticmethod
    def _clip(start: int, end: int | None, num_layers: int) -> list[int]:
        last = num_layers - 1
        end = last if end is None else end
        return list(range(min(start, last), min(end, last) + 1))

    def boost_layers(self, num_layers: int) -> list[int]:
        return self._clip(self.boost_start, self.boost_end, num_layers)

    def target_layers(self, num_layers: int) -> list[int]:
        return self._clip(self.target_start, self.target_end, num_layers)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ASDConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown ASDConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# ---------------------------------------------------------------------------------------
# the strength schedule
# ---------------------------------------------------------------------------------------
def strength_target(w: float, m: float, config: ASDConfig = ASDConfig()) -> float:
    """The step's target strength from the adaptive weight ``w`` and the text mass ``m``.

    >>> strength_target(1.0, 0.0)          # min(0.6, 0.5 * 1)
    0.5
    >>> round(strength_target(1.0, 0.5), 6)   # r = 0.5: halved by the cosine decay
    0.25
    >>> round(strength_target(0.3, 0.0), 6)   # 0.15 * (0.3 / 0.6)^2
    0.0375
    """
    target = min(config.cap, config.lam * w)
    if m > config.text_mass_threshold:
        r = min(1.0, (m - config.text_mass_threshold) / config.text_mass_width)
        target *= (1.0 + math.cos(math.pi * r)) / 2.0
    if w < config.gate:
        target *= (w / config.gate) ** config.gate_power
    return float(target)


def next_strength(previous: float, w: float, m: float, config: ASDConfig = ASDConfig()) -> float:
    """``s_t = momentum * s_{t-1} + (1 - momentum) * target(w_t, m_t)``."""
    return float(config.momentum * previous + (1.0 - config.momentum) * strength_target(w, m, config))


def strength_schedule(w: Sequence[float], m: Sequence[float], config: ASDConfig = ASDConfig(),
                      valid: Sequence[bool] | None = None) -> np.ndarray:
    """Strengths ``s_1 .. s_n`` for recorded statistics (what `asd_generate` applies step by step).

    ``s_1 = config.first_strength`` (0: the first token is never altered); a step with
    ``valid[t]`` False (no usable statistics) falls back to greedy, ``s_t = 0``, and the
    momentum restarts from 0.

    >>> strength_schedule([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]).round(4).tolist()
    [0.0, 0.25, 0.375]
    """
    if len(w) != len(m):
        raise InputError(f"w and m must have the same length, got {len(w)} and {len(m)}")
    valid = [True] * len(w) if valid is None else list(valid)
    out, previous = [], 0.0
    for t, (wt, mt) in enumerate(zip(w, m)):
        if t == 0:
            s = float(config.first_strength)
        elif not valid[t]:
            s = 0.0
        else:
            s = next_strength(previous, float(wt), float(mt), config)
        out.append(s)
        previous = s
    return np.asarray(out, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# sink sets
# ---------------------------------------------------------------------------------------
def _as_sets(sinks: Any, length: int) -> dict[str, torch.Tensor]:
    """av/va/aa/vv positions from a SinkSplit, a SinkAnalysis / MDSResult (split by rank) or a mapping."""
    if hasattr(sinks, "mds") and hasattr(sinks, "sinks"):
        sinks = sinks.mds
    if hasattr(sinks, "split") and callable(sinks.split):
        sinks = sinks.split()
    if all(hasattr(sinks, name) for name in SINK_SETS):
        raw = {name: getattr(sinks, name) for name in SINK_SETS}
    elif isinstance(sinks, Mapping):
        unknown = sorted(set(sinks) - set(SINK_SETS))
        if unknown:
            raise InputError(f"unknown sink sets {unknown}; use {list(SINK_SETS)}")
        raw = {name: sinks.get(name, []) for name in SINK_SETS}
    else:
        raise InputError(f"sinks must be a SinkSplit, a SinkAnalysis or a mapping of av/va/aa/vv positions, "
                         f"got {type(sinks).__name__}")
    out = {}
    for name, value in raw.items():
        pos = torch.as_tensor(value.tolist() if torch.is_tensor(value) else list(value), dtype=torch.long).flatten()
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
            raise TokenSelectionError(f"sink set {name!r}: positions must lie in [0, {length}), got {pos.tolist()[:8]}")
        out[name] = torch.unique(pos)
    return out


def asd_sink_sets(model: "AVModel", inputs: "AVInputs", config: ASDConfig = ASDConfig()) -> dict[str, torch.Tensor]:
    """The four sink sets ASD uses: global sinks with ``N = config.k_divide`` split by MDS.

    One prefill (`analyses.sink_analysis`). Raises `InputError` if the input lacks audio or video.
    """
    from .mds import sink_analysis

    ex = _as_inputs(model, inputs)
    device = model._module.get_input_embeddings().weight.device
    if device.type != "cpu":
        ex = ex.to(device)
    analysis = sink_analysis(model, ex, dims=config.sink_dims, tau=config.tau, k_divide=config.k_divide,
                             progress=False)
    return _as_sets(analysis.mds.split(rule=config.split_rule), len(ex))


# ---------------------------------------------------------------------------------------
# the attention hook: boost rows of the guided pass, statistics of the unguided one
# ---------------------------------------------------------------------------------------
class _ASDHook(AttentionHook):
    def __init__(self, attention_modules: Sequence[torch.nn.Module], config: ASDConfig, boost_layers: list[int],
                 target_layers: list[int], boost_cols: torch.Tensor, weights: torch.Tensor, tail_start: int,
                 device: torch.device) -> None:
        super().__init__(attention_modules)
        self.config = config
        self.boost = frozenset(boost_layers) if boost_cols.numel() and config.alpha > 0 else frozenset()
        self.target = {layer: i for i, layer in enumerate(target_layers)}
        self.cols = boost_cols.to(device)
        self.weights = weights.to(device)                  # [T_prompt, 4]: av, va, aa, vv
        self.prompt = weights.shape[0]
        self.tail_start = tail_start
        self.buffer = torch.zeros(len(target_layers), 5, dtype=torch.float32, device=device)
        self.mode = "prefill"
        self.guided: tuple[int, ...] = ()
        self.rows: torch.Tensor | None = None

    def _record(self, layer: int, probs: torch.Tensor) -> None:
        """``probs [heads, keys]`` of the unguided last query row."""
        sinks = probs[:, : self.prompt] @ self.weights                          # [heads, 4]
        mass = probs[:, self.tail_start:].sum(-1)                                # [heads]
        self.buffer[self.target[layer], :4] = sinks.mean(0)
        self.buffer[self.target[layer], 4] = mass.mean()

    def attend(self, layer, module, query, key, value, mask, scale):
        boost = layer in self.boost and self.mode in ("tail", "decode") and len(self.guided) > 0
        stats = layer in self.target and self.mode in ("prefill", "decode")
        if self.mode == "prefill":
            if stats:
                # The prompt's last row sees every key: its statistics for the diagnostics of step 1.
                _, probs = boosted_attention(query[:1, :, -1:], key[:1], value[:1], scale, mask=None)
                self._record(layer, probs[0, :, 0])
            return None
        if not (boost or stats):
            return None
        out, probs = boosted_attention(query, key, value, scale, mask,
                                       batch=self.guided if boost else (), rows=self.rows, columns=self.cols,
                                       alpha=self.config.alpha, mode=self.config.boost_mode)
        if stats:
            self._record(layer, probs[0, :, -1])
        return out

    def read(self) -> np.ndarray:
        values = self.buffer.cpu().numpy().astype(np.float64)
        self.buffer.zero_()
        return values


def _statistics(values: np.ndarray, config: ASDConfig) -> tuple[float, float, float, float]:
    """``(w, m, C, U)`` from the per-target-layer ``[av, va, aa, vv, text mass]`` rows."""
    index = {name: i for i, name in enumerate(SINK_SETS)}
    c = float(sum(values[:, index[s]].sum() for s in config.cross_sets))
    u = float(sum(values[:, index[s]].sum() for s in config.unimodal_sets))
    m = float(values[:, 4].mean())
    w = c / (c + u + config.eps)
    return w, m, c, u


# ---------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------
@dataclass
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

    def diagnostics(self) -> "pd.DataFrame":
        """One row per generated token: token, s_t, target, w_t, m_t, C, U, fallback, reason, changed."""
        import pandas as pd

        frame = pd.DataFrame({"step": list(range(1, len(self.token_ids) + 1)), "token_id": self.token_ids,
                              **self.steps})
        return frame

    def plot(self, tokenizer: Any = None, figsize: tuple[float, float] = (9.0, 5.0)) -> "Figure":
        """Strength s_t (and its target), adaptive weight w_t and text mass m_t per step; fallback steps shaded."""
        import matplotlib.pyplot as plt

        steps = np.arange(1, len(self.token_ids) + 1)
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=figsize)
        top.plot(steps, self.s, marker="o", label="s_t (applied)")
        top.plot(steps, self.steps.get("target", []), ls="--", label="target")
        top.set_ylabel("strength")
        top.legend(loc="upper right")
        bottom.plot(steps, self.w, marker=".", label="w_t = C / (C + U)")
        bottom.plot(steps, self.m, marker=".", label="m_t (text mass)")
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_xlabel("generated token")
        bottom.legend(loc="upper right")
        for ax in (top, bottom):
            for step, flag in zip(steps, self.fallback):
                if flag:
                    ax.axvspan(step - 0.5, step + 0.5, color="0.85", zorder=0)
        if tokenizer is not None and len(steps) <= 40:
            bottom.set_xticks(steps)
            bottom.set_xticklabels([tokenizer.decode([t]) for t in self.token_ids], rotation=90)
        top.set_title(f"ASD: {self.text[:70]!r}")
        fig.tight_layout()
        return fig


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
) -> ASDOutput:
    """Sink-guided decoding (greedy choice on the mixed log-probabilities).

    ``sinks``: the av/va/aa/vv sets to use (a `SinkSplit`, `SinkAnalysis`, or a mapping of
    positions); default: found on the prompt with `asd_sink_sets` (one extra prefill).
    If the input lacks audio or video, or no column is left to boost, every step falls back
    to greedy (``steps["fallback"]``, with the reason); a step whose statistics are unusable
    (no attention on any sink set) falls back too. Nothing becomes NaN.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="Describe what you see and hear in a single sentence.")
    >>> sets = {"av": ex.spans.audio[:2], "va": ex.spans.video[:2], "aa": ex.spans.audio[2:4], "vv": ex.spans.video[2:4]}
    >>> out = asd_generate(model, ex, max_new_tokens=4, config=ASDConfig(boost_start=1), sinks=sets)
    >>> out.steps["s"][0], len(out.steps["w"]) == out.num_new_tokens
    (0.0, True)
    """
    _check_tokens(max_new_tokens)
    if not isinstance(config, ASDConfig):
        raise InputError(f"config must be an ASDConfig, got {type(config).__name__}")
    ex = _as_inputs(model, inputs)
    decoder = Decoder(model)
    length = len(ex)
    start = time.perf_counter()

    reason_global = ""
    if sinks is None:
        try:
            sets = asd_sink_sets(model, ex, config)
        except InputError as error:
            sets = {name: torch.zeros(0, dtype=torch.long) for name in SINK_SETS}
            reason_global = f"no sink sets: {error}"
    else:
        sets = _as_sets(sinks, length)
    boost_cols = torch.unique(torch.cat([sets[name] for name in config.boost_sets]))
    if not reason_global and boost_cols.numel() == 0:
        reason_global = "no cross-modal sink to boost"

    labels = ex.spans.modality_of()
    weights = torch.zeros(length, len(SINK_SETS), dtype=torch.float32)
    for j, name in enumerate(SINK_SETS):
        pos = sets[name]
        if pos.numel():
            weights[pos, j] = 1.0 / pos.numel() if config.sink_reduce == "mean" else 1.0
    media = ex.spans.media
    tail_start = int(media.max()) + 1 if media.numel() else 0
    layers = decoder.num_layers
    hook = _ASDHook(decoder.attention, config, config.boost_layers(layers), config.target_layers(layers), boost_cols,
                    weights, tail_start, decoder.device)

    # First boosted query row: the first text row after the earliest boosted column (earlier text rows
    # cannot see any boosted column, so the guided pass equals the unguided one up to there).
    if config.boost_rows == "text" and boost_cols.numel():
        first_col = int(boost_cols.min())
        later_text = [p for p in range(first_col + 1, length) if labels[p] == "text"]
        first_row = later_text[0] if later_text else length
    else:
        first_row = length
    tail_rows = torch.tensor([p - first_row for p in range(first_row, length) if labels[p] == "text"],
                             dtype=torch.long, device=decoder.device)

    steps: dict[str, list[Any]] = {k: [] for k in ("s", "target", "w", "m", "C", "U", "fallback", "reason", "changed")}
    kept: list[torch.Tensor] = []
    ids: list[int] = []
    finished = False
    guided_on = not reason_global

    def record(s: float, target: float, w: float, m: float, c: float, u: float, fallback: bool, reason: str,
               changed: bool) -> None:
        for key, value in zip(steps, (s, target, w, m, c, u, fallback, reason, changed)):
            steps[key].append(value)

    with torch.inference_mode(), decoder.hooked(hook):
        hook.mode = "prefill"
        prefill = decoder.prefill(decoder.data(ex))
        first_stats = hook.read()
        unguided = torch.log_softmax(prefill.logits[0], -1)
        guided = unguided
        if guided_on:
            kv = decoder.kv(prefill.cache)
            if first_row < length:
                hook.mode, hook.guided, hook.rows = "tail", (0,), tail_rows
                guided_cache = decoder.new_cache([(k[:, :, :first_row], v[:, :, :first_row]) for k, v in kv])
                positions = None if prefill.positions is None else prefill.positions[..., first_row:]
                guided_logits = decoder.run(prefill.embeds[:, first_row:], positions, guided_cache)
                guided = torch.log_softmax(guided_logits[0], -1)
                guided_kv = decoder.kv(guided_cache)
            else:
                guided_kv = kv
            cache = decoder.new_cache([(torch.cat([k0, kg]), torch.cat([v0, vg]))
                                       for (k0, v0), (kg, vg) in zip(kv, guided_kv)])
            hook.guided, hook.rows = (1,), None
        else:
            cache = prefill.cache
        hook.mode = "decode"
        batch = 2 if guided_on else 1

        w, m, c, u = _statistics(first_stats, config)
        previous = float(config.first_strength)
        for step in range(max_new_tokens):
            if step == 0:
                s, target, fallback = previous, 0.0, not guided_on
                reason = reason_global or "first token"
                if not guided_on:
                    s = 0.0
            else:
                usable = guided_on and math.isfinite(w) and math.isfinite(m) and (c + u) > 0
                if usable:
                    target = strength_target(w, m, config)
                    s = config.momentum * previous + (1.0 - config.momentum) * target
                    fallback, reason = False, ""
                else:
                    target, s, fallback = 0.0, 0.0, True
                    reason = reason_global or "no attention on any sink set"
            mixed = unguided if s == 0.0 else unguided + s * (guided - unguided)
            token = mixed.argmax()
            value = int(token)
            ids.append(value)
            record(s, target, w, m, c, u, fallback, reason, value != int(unguided.argmax()))
            if keep_logprobs:
                kept.append(torch.stack([unguided, guided]).cpu())
            previous = s
            if value in decoder.eos:
                finished = True
                break
            if step == max_new_tokens - 1:
                break
            logits = decoder.step(token.reshape(1).expand(batch), prefill, step, cache)
            w, m, c, u = _statistics(hook.read(), config)
            unguided = torch.log_softmax(logits[0], -1)
            guided = torch.log_softmax(logits[1], -1) if guided_on else unguided
    _sync(decoder.device)
    ms = (time.perf_counter() - start) * 1000
    return ASDOutput(
        "asd", decoder.decode_text(ids), ids, length, ms, finished,
        {"max_new_tokens": max_new_tokens, "config": config.to_dict()},
        {"first_boosted_row": first_row, "boost_columns": int(boost_cols.numel())},
        steps, {name: sets[name].tolist() for name in SINK_SETS},
        torch.stack(kept) if keep_logprobs and kept else None,
    )
