"""ASD's routed-attention hook and sink sets: the fused sink analysis in the prefill, boost and statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from interventions.attention_edits import boost_amount, boosted_attention
from interventions.attention_math import attention_with_lse, grouped_logits
from interventions.runtime.routing import AttentionHook
from nnsight_av.errors import InputError, TokenSelectionError

from .asd_config import SINK_SETS, ASDConfig
from .asd_kernel import decode_attention
from .column_math import column_sums
from .decoding import as_inputs
from .mds import MDSResult, sink_analysis
from .sinks import SinkResult

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["ASDHook", "asd_sink_sets", "as_sink_sets", "fused_sink_sets", "step_statistics"]

# ---------------------------------------------------------------------------------------
# sink sets
# ---------------------------------------------------------------------------------------
def as_sink_sets(sinks: Any, length: int) -> dict[str, torch.Tensor]:
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
    return as_sink_sets(analysis.mds.split(rule=config.split_rule), len(ex))


# ---------------------------------------------------------------------------------------
# the attention hook: fused sink analysis in the prefill, boost and statistics while decoding
# ---------------------------------------------------------------------------------------
def _row_probs(query_row: torch.Tensor, key: torch.Tensor, scale: float,
               lse: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities ``[heads, T]`` of one query row ``[heads, d]`` over ``key [kv, T, d]``."""
    logits = grouped_logits(query_row[None, :, None], key[None], scale).view(query_row.shape[0], key.shape[1])
    if lse is None:
        return torch.softmax(logits, dim=-1)
    return torch.exp(logits - lse.float()[:, None])


class ASDHook(AttentionHook):
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
        # static-cache decoding: the number of valid keys (a device tensor the step sets); the mask is then
        # implied by it, so every boosted or target layer runs the decode kernel.
        self.length: torch.Tensor | None = None

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
        static = self.length is not None
        if mode == "decode" and (boost or stats) and (mask is None or static) and query.shape[2] == 1:
            amounts = self.decode_amounts if boost else self.zero_amounts
            out, sums = decode_attention(query, key, value, scale, self.flag, amounts, self.weights,
                                         self.config.boost_mode == "multiplicative", self.backend, self.length)
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


def step_statistics(values: np.ndarray, config: ASDConfig) -> tuple[float, float, float, float]:
    """``(w, m, C, U)`` from the per-target-layer ``[av, va, aa, vv, text mass]`` rows."""
    index = {name: i for i, name in enumerate(SINK_SETS)}
    c = float(sum(values[:, index[s]].sum() for s in config.cross_sets))
    u = float(sum(values[:, index[s]].sum() for s in config.unimodal_sets))
    m = float(values[:, 4].mean())
    w = c / (c + u + config.eps)
    return w, m, c, u


def fused_sink_sets(hook: ASDHook, scores: dict[int, torch.Tensor], ex: "AVInputs", dims: list[int], tau: float,
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
    return as_sink_sets(result.split(rule=config.split_rule), len(ex))
