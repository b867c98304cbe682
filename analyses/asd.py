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
from jaxtyping import Float

from interventions.attention import AttentionBoost
from interventions.attention_edits import boost_amount, boost_bias, boosted_attention
from interventions.runtime.decoder import Decoder, sync_device
from interventions.runtime.hooks import applied
from interventions.runtime.routing import AttentionHook
from nnsight_av.errors import InputError, TokenSelectionError

from .attention import attention_with_lse, column_sums
from .decoding import DecodeOutput, as_inputs, check_new_tokens
from .mds import MDSResult, sink_analysis
from .sink_config import ASD_SINKS, SinkConfig
from .sinks import SinkResult, resolve_sink_dims, sink_scores

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["ASDConfig", "ASDOutput", "asd_generate", "strength_target", "next_strength", "strength_schedule", "decode_attention",
           "asd_sink_sets", "SINK_SETS"]

SINK_SETS = ("av", "va", "aa", "vv")


@dataclass(frozen=True)
class ASDConfig:
    """Every constant of ASD, with the paper's defaults (METHOD.md section 6).

    Sinks: ``sinks``, a `SinkConfig` (default `ASD_SINKS`: N = 3, where tracing uses 2);
    ``k_divide`` (N in K = int(T / N)), ``sink_dims`` / ``tau`` (None: the adapter's) and
    ``split_rule`` ("rank" or "sign") are shortcuts that override its fields, and read back
    the effective values.
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

    k_divide: float | None = None
    sink_dims: tuple[int, ...] | None = None
    tau: float | None = None
    criterion: str | None = None
    split_rule: str | None = None
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
    sinks: SinkConfig | None = None

    def __post_init__(self) -> None:
        # One sink config: the shortcuts override its fields and then read back the effective values.
        sinks = ASD_SINKS if self.sinks is None else SinkConfig.from_dict(self.sinks)
        sinks = sinks.with_(dims=self.sink_dims, tau=self.tau, k_divide=self.k_divide, split_rule=self.split_rule,
                            criterion=self.criterion)
        object.__setattr__(self, "sinks", sinks)
        for name, value in (("k_divide", sinks.k_divide), ("sink_dims", sinks.dims), ("tau", sinks.tau),
                            ("split_rule", sinks.split_rule), ("criterion", sinks.criterion)):
            object.__setattr__(self, name, value)
        for name in ("boost_sets", "cross_sets", "unimodal_sets"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            bad = [s for s in value if s not in SINK_SETS]
            if bad:
                raise InputError(f"ASDConfig.{name}: unknown sink sets {bad}; use {list(SINK_SETS)}")
        checks = [
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
        """The layers the guided pass boosts, clipped to a model of ``num_layers``."""
        return self._clip(self.boost_start, self.boost_end, num_layers)

    def guided_pass(self, sets: Mapping[str, Any], num_layers: int) -> AttentionBoost:
        """The guided pass as an intervention primitive: what `asd_generate`'s fused kernels compute.

        An `AttentionBoost` of the ``boost_rows`` query rows (prompt text and generated rows, or
        generated rows only) on the ``boost_sets`` columns of ``sets`` (the av/va/aa/vv positions),
        at `boost_layers`, with ``alpha`` and ``boost_mode``. Run it with ``interventions.run`` /
        ``interventions.generate`` (either runtime) to get the guided branch alone; the tests
        check it against the guided log-probabilities ASD keeps.

        >>> iv = ASDConfig(boost_start=1).guided_pass({"av": [5], "va": [2], "aa": [], "vv": []}, 4)
        >>> iv.keys, iv.site.layers, iv.alpha
        ((2, 5), (1, 2, 3), 0.2)
        """
        cols = sorted({int(p) for name in self.boost_sets for p in torch.as_tensor(sets[name]).flatten().tolist()})
        queries = ["text", "generated"] if self.boost_rows == "text" else "generated"
        return AttentionBoost(queries=queries, keys=cols, layers=self.boost_layers(num_layers), alpha=self.alpha,
                              mode=self.boost_mode, allow_empty=True)

    def target_layers(self, num_layers: int) -> list[int]:
        return self._clip(self.target_start, self.target_end, num_layers)

    def to_dict(self) -> dict[str, Any]:
        """Every setting; the sink settings once, under ``"sinks"``."""
        out = {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)
               if f.name not in SINK_SHORTCUTS and f.name != "sinks"}
        return {**out, "sinks": self.sinks.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ASDConfig":
        """From `to_dict` output (older files with flat sink keys load too)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown ASDConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


#: The flat sink fields of `ASDConfig` (shortcuts for its ``sinks``).
SINK_SHORTCUTS = ("k_divide", "sink_dims", "tau", "split_rule", "criterion")


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
    ex = as_inputs(model, inputs)
    device = model.raw("embed").weight.device
    if device.type != "cpu":
        ex = ex.to(device)
    analysis = sink_analysis(model, ex, **config.sinks.search_kwargs(), progress=False)
    return _as_sets(analysis.mds.split(rule=config.split_rule), len(ex))


# ---------------------------------------------------------------------------------------
# decode attention on the GPU: one kernel for boost, softmax, output and statistics
# ---------------------------------------------------------------------------------------
_DECODE_KERNEL: Any = None


def _decode_kernel() -> Any:
    """Build (once) the Triton kernel for one query row per (batch, head) over the cached keys.

    Online softmax over key blocks; on the way it adds ``alpha[b] * flag[t] * |a|`` (or
    ``alpha[b] * flag[t]``) to the logits of flagged key columns, and accumulates the
    probability mass on 8 weighted column sets (``W``; keys past the prompt count in set 4,
    the text mass). Replaces the ~12 small torch kernels of the written-out attention.
    """
    global _DECODE_KERNEL
    if _DECODE_KERNEL is not None:
        return _DECODE_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def asd_decode_attention(
        Q, K, V, OUT, FLAG, ALPHA, W, STATS,
        sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, swt, ssb, ssh,
        T, TP, H, GQA, scale,
        D: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr, MULT: tl.constexpr, WITH_STATS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        kvh = h // GQA
        offs_d = tl.arange(0, DP)
        dmask = offs_d < D
        offs_j = tl.arange(0, 8)
        q = tl.load(Q + b * sqb + h * sqh + offs_d * sqd, mask=dmask, other=0.0).to(tl.float32) * scale
        boost = tl.load(ALPHA + b)
        m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
        acc = tl.zeros([DP], tl.float32)
        st = tl.zeros([8], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < T
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(K + b * skb + kvh * skh + offs_t[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask,
                        other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            flag = tl.load(FLAG + offs_t, mask=offs_t < TP, other=0.0)
            if MULT:
                s = s + flag * boost
            else:
                s = s + flag * boost * tl.abs(s)
            s = tl.where(tmask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            corr = tl.exp(m_i - m_new)
            l_i = l_i * corr + tl.sum(p, axis=0)
            v = tl.load(V + b * svb + kvh * svh + offs_t[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask,
                        other=0.0).to(tl.float32)
            acc = acc * corr + tl.sum(p[:, None] * v, axis=0)
            if WITH_STATS:
                in_prompt = offs_t < TP
                wv = tl.load(W + offs_t[:, None] * swt + offs_j[None, :], mask=in_prompt[:, None], other=0.0)
                wv = tl.where((offs_t >= TP)[:, None] & (offs_j == 4)[None, :], 1.0, wv)
                st = st * corr + tl.sum(p[:, None] * wv, axis=0)
            m_i = m_new
        tl.store(OUT + b * sob + h * soh + offs_d, (acc / l_i).to(OUT.dtype.element_ty), mask=dmask)
        if WITH_STATS:
            tl.store(STATS + b * ssb + h * ssh + offs_j, st / l_i)

    _DECODE_KERNEL = asd_decode_attention
    return _DECODE_KERNEL


def _triton_ready(query: torch.Tensor) -> bool:
    if not query.is_cuda or query.shape[2] != 1 or query.shape[-1] > 256:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def decode_attention(
    query: Float[torch.Tensor, "batch heads 1 dim"],
    key: Float[torch.Tensor, "batch kv_heads keys dim"],
    value: Float[torch.Tensor, "batch kv_heads keys dim"],
    scale: float,
    flag: Float[torch.Tensor, "prompt"],
    boost: Float[torch.Tensor, "batch"],
    weights: Float[torch.Tensor, "prompt 8"],
    multiplicative: bool = False,
    backend: str = "auto",
) -> tuple[Float[torch.Tensor, "batch 1 heads dim"], Float[torch.Tensor, "batch heads 8"]]:
    """One query row per batch entry against the cached keys, with the ASD boost and statistics.

    ``query [B, heads, 1, d]``, ``key``/``value [B, kv_heads, T, d]``; ``flag [TP]`` marks the
    boosted key columns (1.0) among the first ``TP`` keys; ``boost [B]`` is each row's
    ``alpha`` (0 for the unguided row; ``log1p(alpha)`` when ``multiplicative``);
    ``weights [TP, 8]`` weight the probabilities into 8 sums (column 4 also counts every key
    from ``TP`` on). Returns the output ``[B, 1, heads, d]`` (query dtype) and the sums
    ``[B, heads, 8]`` (float32). ``backend``: "auto" (Triton on CUDA), "triton" or "torch".

    >>> q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    >>> flag = torch.tensor([0, 1, 1, 0, 0.0]); w = torch.zeros(5, 8); w[1:3, 0] = 0.5
    >>> out, sums = decode_attention(q, k, v, 0.3, flag, torch.tensor([0.0, 0.2]), w)
    >>> ref, probs = boosted_attention(q, k, v, 0.3, batch=[1], columns=torch.tensor([1, 2]), alpha=0.2)
    >>> torch.allclose(out, ref, atol=1e-6), torch.allclose(sums[..., 0], probs[:, :, 0, 1:3].mean(-1), atol=1e-6)
    (True, True)
    """
    b, h, n, d = query.shape
    if n != 1:
        raise InputError(f"decode_attention takes one query row, got {n}")
    tk, tp = key.shape[2], flag.shape[0]
    use_triton = backend == "triton" or (backend == "auto" and _triton_ready(query))
    if use_triton:
        import triton

        kernel = _decode_kernel()
        out = torch.empty(b, 1, h, d, dtype=query.dtype, device=query.device)
        sums = torch.empty(b, h, 8, dtype=torch.float32, device=query.device)
        weights = weights.contiguous()
        kernel[(b * h,)](
            query, key, value, out, flag, boost, weights, sums,
            query.stride(0), query.stride(1), query.stride(3), key.stride(0), key.stride(1), key.stride(2),
            key.stride(3), value.stride(0), value.stride(1), value.stride(2), value.stride(3),
            out.stride(0), out.stride(2), weights.stride(0), sums.stride(0), sums.stride(1),
            tk, tp, h, h // key.shape[1], float(scale),
            D=d, DP=triton.next_power_of_2(max(d, 16)), BLOCK_T=64, MULT=bool(multiplicative), WITH_STATS=True,
            num_warps=4,
        )
        return out, sums
    kv = key.shape[1]
    logits = torch.matmul(query.float().reshape(b, kv, h // kv, d), key.float().transpose(-1, -2)).view(b, h, tk)
    logits = logits * scale
    bonus = flag.to(logits.dtype)[None, None, :] * boost.to(logits.dtype)[:, None, None]
    head = logits[..., :tp]
    head = head + boost_bias(head, bonus, "multiplicative" if multiplicative else "pre_softmax")
    logits = torch.cat([head, logits[..., tp:]], dim=-1)
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs.view(b, kv, h // kv, tk), value.float()).view(b, 1, h, d)
    full = torch.zeros(tk, 8, dtype=torch.float32, device=query.device)
    full[:tp] = weights.float()
    full[tp:, 4] = 1.0
    return out.to(query.dtype), probs @ full


# ---------------------------------------------------------------------------------------
# the attention hook: fused sink analysis in the prefill, boost and statistics while decoding
# ---------------------------------------------------------------------------------------
def _row_probs(query_row: torch.Tensor, key: torch.Tensor, scale: float,
               lse: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities ``[heads, T]`` of one query row ``[heads, d]`` over ``key [kv, T, d]``."""
    h, d = query_row.shape
    kv, tk = key.shape[0], key.shape[1]
    logits = torch.matmul(query_row.float().reshape(kv, h // kv, d), key.float().transpose(-1, -2)).reshape(h, tk)
    logits = logits * scale
    if lse is None:
        return torch.softmax(logits, dim=-1)
    return torch.exp(logits - lse.float()[:, None])


class _ASDHook(AttentionHook):
    """Modes: "analysis" (prefill with the sink analysis fused in), "prefill" (statistics of the last
    row only), "tail" (guided recompute of the prompt's tail), "decode" (batch of two)."""

    def __init__(self, attention_modules: Sequence[torch.nn.Module], config: ASDConfig, target_layers: list[int],
                 device: torch.device, num_heads: int, backend: str = "auto") -> None:
        super().__init__(attention_modules)
        self.config = config
        self.num_heads = num_heads
        self.last_rows: dict[int, torch.Tensor] = {}
        self.target = {layer: i for i, layer in enumerate(target_layers)}
        self.device = device
        self.backend = backend
        self.boost: frozenset[int] = frozenset()
        self.mode = "prefill"
        self.guided: tuple[int, ...] = ()
        self.rows: torch.Tensor | None = None
        self.buffer = torch.zeros(len(target_layers), 5, dtype=torch.float32, device=device)
        self.decode_buffer: torch.Tensor | None = None
        # fused analysis
        self.media_cols: torch.Tensor | None = None
        self.row_groups: torch.Tensor | None = None
        self.col_sums: dict[int, torch.Tensor] = {}

    def set_sets(self, sets: dict[str, torch.Tensor], boost_layers: list[int], length: int, tail_start: int) -> None:
        """Fix the sink sets once they are known (after the analysis prefill)."""
        config = self.config
        self.cols = torch.unique(torch.cat([sets[name] for name in config.boost_sets])).to(self.device)
        self.boost = frozenset(boost_layers) if self.cols.numel() and config.alpha > 0 else frozenset()
        weights = torch.zeros(length, 8, dtype=torch.float32)
        for j, name in enumerate(SINK_SETS):
            pos = sets[name]
            if pos.numel():
                weights[pos, j] = 1.0 / pos.numel() if config.sink_reduce == "mean" else 1.0
        weights[tail_start:, 4] = 1.0
        self.weights = weights.to(self.device)
        self.tail_start = tail_start
        flag = torch.zeros(length, dtype=torch.float32)
        flag[self.cols.cpu()] = 1.0
        self.flag = flag.to(self.device)
        self.amount = boost_amount(config.alpha, config.boost_mode)

    def _record(self, layer: int, probs: torch.Tensor) -> None:
        """``probs [heads, keys]`` of the unguided last query row."""
        sums = probs[:, : self.weights.shape[0]] @ self.weights[:, :4]          # [heads, 4]
        mass = probs[:, self.tail_start:].sum(-1)                                # [heads]
        self.buffer[self.target[layer], :4] = sums.mean(0)
        self.buffer[self.target[layer], 4] = mass.mean()

    def attend(self, layer, module, query, key, value, mask, scale):
        mode = self.mode
        if mode == "analysis":
            return self._analysis(layer, query, key, value, mask, scale)
        stats = layer in self.target
        if mode == "prefill":
            if stats:
                self._record(layer, _row_probs(query[0, :, -1], key[0], scale))
            return None
        boost = layer in self.boost and len(self.guided) > 0
        if mode == "decode" and (boost or stats) and mask is None and query.shape[2] == 1:
            amounts = self.decode_amounts if boost else self.zero_amounts
            out, sums = decode_attention(query, key, value, scale, self.flag, amounts, self.weights,
                                         self.config.boost_mode == "multiplicative", self.backend)
            if stats:
                self.decode_buffer[self.target[layer]] = sums[0, :, :5]
            return out
        if not (boost or stats):
            return None
        out, probs = boosted_attention(query, key, value, scale, mask, batch=self.guided if boost else (),
                                       rows=self.rows, columns=self.cols, alpha=self.config.alpha,
                                       mode=self.config.boost_mode)
        if stats and mode == "decode":
            self._record(layer, probs[0, :, -1])
        return out

    def start_decode(self, batch: int) -> None:
        self.mode = "decode"
        self.guided = (1,) if batch == 2 else ()
        self.rows = None
        self.decode_amounts = torch.tensor([0.0, self.amount][:batch], dtype=torch.float32, device=self.device)
        self.zero_amounts = torch.zeros(batch, dtype=torch.float32, device=self.device)
        self.decode_buffer = torch.zeros(len(self.target), self.num_heads, 5, dtype=torch.float32, device=self.device)

    def _analysis(self, layer, query, key, value, mask, scale):
        if mask is not None or query.shape[2] != key.shape[2] or query.shape[0] != 1:
            raise InputError("the fused sink analysis needs one unpadded prompt")
        out, lse = attention_with_lse(query, key, value, scale)
        if self.media_cols.numel():
            sums = column_sums(query, key, lse, self.media_cols, self.row_groups, 2, scale, True)
            self.col_sums[layer] = sums.sum(1)[0]                                  # [2 groups, columns]
        if layer in self.target:
            self.last_rows[layer] = _row_probs(query[0, :, -1], key[0], scale, lse[0, :, -1])
        return out.transpose(1, 2).contiguous()

    def read(self) -> np.ndarray:
        """Per target layer ``[av, va, aa, vv, text mass]`` of the last step (and reset)."""
        if self.mode == "decode" and self.decode_buffer is not None:
            values = self.decode_buffer.mean(1)
            self.decode_buffer.zero_()
            # A layer served by the written-out path (a mask was present) recorded into `buffer`.
            values = values + self.buffer
        else:
            values = self.buffer.clone()
        self.buffer.zero_()
        return values.cpu().numpy().astype(np.float64)


def _statistics(values: np.ndarray, config: ASDConfig) -> tuple[float, float, float, float]:
    """``(w, m, C, U)`` from the per-target-layer ``[av, va, aa, vv, text mass]`` rows."""
    index = {name: i for i, name in enumerate(SINK_SETS)}
    c = float(sum(values[:, index[s]].sum() for s in config.cross_sets))
    u = float(sum(values[:, index[s]].sum() for s in config.unimodal_sets))
    m = float(values[:, 4].mean())
    w = c / (c + u + config.eps)
    return w, m, c, u


def _fused_sink_sets(hook: _ASDHook, scores: dict[int, torch.Tensor], ex: "AVInputs", dims: list[int], tau: float,
                     config: ASDConfig, num_layers: int, num_heads: int, criterion: str = "phi") -> dict[str, torch.Tensor]:
    """Global sinks and their MDS split from the fused prefill (what `sink_analysis` computes)."""
    layers = list(range(num_layers))
    score = torch.stack([scores[l].float().cpu() for l in layers])
    sinks = SinkResult(score, layers, list(dims), tau, float(config.k_divide), ex.layout(), config.sinks.k,
                       criterion=criterion)
    labels = ex.spans.modality_of()
    keep = [int(p) for p in sinks.positions.tolist() if labels[int(p)] in ("video", "audio")]
    pos = torch.tensor(keep, dtype=torch.long)
    cols = hook.media_cols.cpu()
    if pos.numel() == 0:
        empty = torch.zeros(num_layers, 0)
        result = MDSResult(pos, [], layers, empty, empty.clone())
    else:
        index = torch.searchsorted(cols, pos)
        sums = torch.stack([hook.col_sums[l].float().cpu() for l in layers])[:, :, index]    # [L, 2, S]
        groups = hook.row_groups.cpu()
        counts = torch.zeros(2, pos.numel(), dtype=torch.long)
        for g in range(2):
            rows = torch.nonzero(groups == g).flatten()
            counts[g] = rows.numel() - torch.searchsorted(rows, pos, right=True)
        denom = (counts * num_heads).float()
        mean = torch.where(denom > 0, sums / denom.clamp(min=1), torch.zeros_like(sums))
        result = MDSResult(pos, [labels[p] for p in keep], layers, mean[:, 0], mean[:, 1])
    return _as_sets(result.split(rule=config.split_rule), len(ex))


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

    def diagnostics(self) -> "pd.DataFrame":
        """One row per generated token: token, s_t, target, w_t, m_t, C, U, fallback, reason, changed."""
        import pandas as pd

        frame = pd.DataFrame({"step": list(range(1, len(self.token_ids) + 1)), "token_id": self.token_ids,
                              **self.steps})
        return frame

    def plot(self, tokenizer: Any = None, figsize: tuple[float, float] = (9.0, 5.0)) -> "Figure":
        """Strength s_t (and its target), adaptive weight w_t and text mass m_t per step; fallback steps shaded."""
        from .plots import figure, no_data

        fig = figure(*figsize)
        if not self.token_ids:
            return no_data(fig, "no data: no token was generated", f"ASD: {self.text[:70]!r}")
        steps = np.arange(1, len(self.token_ids) + 1)
        top, bottom = fig.subplots(2, 1, sharex=True)
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
            # repr keeps control characters of odd tokens printable
            bottom.set_xticklabels([repr(tokenizer.decode([t]))[1:-1] for t in self.token_ids], rotation=90)
        top.set_title(f"ASD: {self.text[:70]!r}")
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
    backend: str = "auto",
    interventions: Any = None,
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
    of ASD's routed attention.

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
    length = len(ex)
    layers = decoder.num_layers
    labels = ex.spans.modality_of()
    media = ex.spans.media
    tail_start = int(media.max()) + 1 if media.numel() else 0
    start = time.perf_counter()

    hook = _ASDHook(decoder.attention, config, config.target_layers(layers), decoder.device, model.num_heads, backend)
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
        sets = _as_sets(sinks, length)

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
            sets = _fused_sink_sets(hook, scores, ex, dims, tau, config, layers, model.num_heads, criterion)
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

        w, m, c, u = _statistics(first_stats, config)
        previous = 0.0
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
            w, m, c, u = _statistics(hook.read(), config)
            both = torch.log_softmax(logits, -1)
            unguided = both[0]
            guided = both[1] if guided_on else unguided
    sync_device(decoder.device)
    ms = (time.perf_counter() - start) * 1000
    return ASDOutput(
        "asd", decoder.decode_text(ids), ids, length, ms, finished,
        {"max_new_tokens": max_new_tokens, "config": config.to_dict()},
        {"first_boosted_row": first_row, "boost_columns": int(boost_cols.numel()), "sink_dims": list(dims),
         "tau": tau if fused else None},
        steps, {name: sets[name].tolist() for name in SINK_SETS},
        torch.stack(kept) if keep_logprobs and kept else None,
    )
