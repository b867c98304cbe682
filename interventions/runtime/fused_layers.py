"""Decode-step forward of Qwen2-family decoder layers with fewer kernels per token.

Inside a CUDA graph a decode step costs the weight reads plus a few microseconds per kernel, and
Hugging Face's layer launches ~45 of them for one token (RMSNorm in float32 as ~7 elementwise
kernels, twice; rotary ~10; separate q/k/v projections; residual adds; SiLU and the product).
`fused_decode_layers` swaps, for the duration of a block, the ``forward`` of each decoder layer whose
class the model's adapter declares of this pattern (``Adapter.fused_decode_layers``: Qwen2 /
Qwen2.5-Omni, Llama: RMSNorm, q/k/v/o projections with rotary, SiLU-gated MLP, no q/k norms)
for one that computes the same thing from the same module weights with:

- one q/k/v projection per layer: the three weights (and biases) concatenated once and cached
  per layer (memory: ``(q + k + v) x hidden`` per layer, ~0.9 GB for a 7B Qwen2, ~6% of its weights;
  rebuilt when a weight changes);
- RMSNorm, the residual add before the second RMSNorm, rotary and SiLU times up as small pure
  functions, compiled with ``torch.compile(fullgraph=True)`` on CUDA (one or two Triton kernels
  each, captured in the decode step's CUDA graph); elsewhere they run as written, the same ops in
  the same order as transformers' modules, so CPU results are bit-identical to the modules'.

Attention still goes through ``config._attn_implementation`` (the routed function and its hooks:
ASD's boost and statistics, the grouped decode attention), the cache's ``update`` and the layer's
own forward hooks (FMD's merge) run as before. A layer with hooks on its submodules, or of a
class not known here, keeps its own forward.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .op_count import one_kernel

__all__ = ["fused_decode_layers", "fusable", "rms_norm", "add_rms_norm", "rotary", "silu_mul"]



def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' Qwen2 RMSNorm, op for op (float32 statistics, scale after casting back).

    >>> x = torch.randn(2, 8); norm = torch.nn.RMSNorm(8, eps=1e-6)
    >>> torch.allclose(rms_norm(x, norm.weight, 1e-6), norm(x), atol=1e-6)
    True
    """
    dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + x`` and ``rms_norm(h)`` (one kernel when compiled)."""
    hidden = residual + x
    return hidden, rms_norm(hidden, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' ``apply_rotary_pos_emb`` (``cos``/``sin`` ``[B, T, d]``, q/k ``[B, heads, T, d]``).

    >>> q, k, cos, sin = torch.randn(1, 2, 1, 4), torch.randn(1, 1, 1, 4), torch.ones(1, 1, 4), torch.zeros(1, 1, 4)
    >>> all(torch.equal(a, b) for a, b in zip(rotary(q, k, cos, sin), (q, k)))
    True
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the gated MLP's activation."""
    return F.silu(gate) * up


_PURE = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "rotary": rotary, "silu_mul": silu_mul}
#: As written; `count_ops` counts each call as the one kernel it compiles to on CUDA.
_EAGER = {name: one_kernel(fn) for name, fn in _PURE.items()}
_COMPILED: dict[str, Callable] = {}


def _ops(device: torch.device) -> dict[str, Callable]:
    """The pure functions, compiled on CUDA (once per process), as written elsewhere."""
    if device.type != "cuda":
        return _EAGER
    if not _COMPILED:
        _COMPILED.update({name: torch.compile(fn, fullgraph=True, dynamic=False) for name, fn in _PURE.items()})
    return _COMPILED


def fusable(layer: torch.nn.Module, known: Sequence[str]) -> bool:
    """Whether `fused_decode_layers` can run ``layer``: its class among ``known`` (the adapter's
    ``fused_decode_layers``), eval mode, the expected parts, no submodule hooks."""
    if type(layer).__name__ not in known or layer.training:
        return False
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    parts += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in parts) or hasattr(attn, "q_norm"):
        return False
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
        return False
    norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    if not all(hasattr(n, "variance_epsilon") and type(n).__name__.endswith("RMSNorm") for n in norms):
        return False
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    return not any(_user_hooks(m) for m in layer.modules() if m is not layer)


def _user_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has forward hooks other than transformers' own output-capturing ones.

    transformers installs those on attention modules at the first call that asks for attentions
    or hidden states and leaves them in place; they record nothing unless a call asks again, and
    a decode step never does, so they must not turn the fused path off for the rest of the session.
    """
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(not getattr(hook, "__module__", "").startswith("transformers.") for hook in hooks)


#: Per layer: the concatenated q/k/v weight and bias, and what they were built from.
_QKV: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _qkv(attn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    key = [(p.weight.data_ptr(), p.weight._version, None if p.bias is None else (p.bias.data_ptr(), p.bias._version))
           for p in projections]
    cached = _QKV.get(attn)
    if cached is None or cached[0] != key:
        weight = torch.cat([p.weight.detach() for p in projections])
        biases = [p.bias for p in projections]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else p.weight.new_zeros(p.out_features) for p, b in zip(projections, biases)])
        cached = (key, weight, bias, [p.out_features for p in projections])
        _QKV[attn] = cached
    return cached[1], cached[2], cached[3]


def _forward(layer: torch.nn.Module, ops: dict[str, Callable]) -> Callable[..., torch.Tensor]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn, mlp = layer.self_attn, layer.mlp
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        d = attn.head_dim
        normed = ops["rms_norm"](hidden_states, norm1.weight, norm1.variance_epsilon)
        weight, bias, sizes = _qkv(attn)
        q, k, v = F.linear(normed, weight, bias).split(sizes, dim=-1)
        q = q.view(b, n, -1, d).transpose(1, 2)
        k = k.view(b, n, -1, d).transpose(1, 2)
        v = v.view(b, n, -1, d).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = ops["rotary"](q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        out, _ = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation](
            attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling,
            sliding_window=getattr(attn, "sliding_window", None), position_ids=position_ids, **kwargs)
        out = F.linear(out.reshape(b, n, -1), attn.o_proj.weight, attn.o_proj.bias)
        hidden, normed = ops["add_rms_norm"](hidden_states, out, norm2.weight, norm2.variance_epsilon)
        act = ops["silu_mul"](F.linear(normed, mlp.gate_proj.weight, mlp.gate_proj.bias),
                              F.linear(normed, mlp.up_proj.weight, mlp.up_proj.bias))
        return hidden + F.linear(act, mlp.down_proj.weight, mlp.down_proj.bias)

    return forward


@contextmanager
def fused_decode_layers(layers: Sequence[torch.nn.Module], known: Sequence[str]) -> Iterator[int]:
    """Within the block, every `fusable` layer of ``layers`` runs the fused forward; yields how many.

    ``known``: the layer classes the model's adapter declares of this pattern
    (`Adapter.fused_decode_layers`). The layers' configs must route attention through a
    registered implementation (the static decoder's `Decoder.hooked`); the layer's own hooks
    still run (only ``forward`` is swapped).

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> layers = model.raw("layers")
    >>> before = vars(layers[0]).get("forward")
    >>> with fused_decode_layers(layers, model.adapter.fused_decode_layers) as count:
    ...     swapped = vars(layers[0]).get("forward") is not before
    >>> count == len(layers), swapped, vars(layers[0]).get("forward") is before
    (True, True, True)
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    chosen = [layer for layer in layers if fusable(layer, known)
              and layer.self_attn.config._attn_implementation in ALL_ATTENTION_FUNCTIONS]
    # nnsight keeps its own wrapper as the instance's ``forward``: it is put back exactly, or every
    # later trace of the model would run past the envoys it waits on
    missing = object()
    before = [vars(layer).get("forward", missing) for layer in chosen]
    for layer in chosen:
        layer.forward = _forward(layer, _ops(layer.self_attn.q_proj.weight.device))
    try:
        yield len(chosen)
    finally:
        for layer, old in zip(chosen, before):
            if old is missing:
                vars(layer).pop("forward", None)
            else:
                layer.forward = old
