"""The routed attention function: decoder attention calls that Python code can see and change.

One attention function is registered with transformers' ``AttentionInterface`` under
`ATTENTION_IMPLEMENTATION`; `route_attention` switches a model's configs to it for the
duration of a block and makes a list of `AttentionHook` s active. Per call, the function
finds the decoder layer of the attention module, asks the hooks for the output (`attend`:
the first that returns one wins, else SDPA runs exactly as before), then lets every hook
edit that output in turn (`after`). Layers no hook handles run SDPA unchanged. This is
what ASD's boost and statistics, FMD's merge weights and the hook runtime's attention
primitives (`interventions.runtime.hooks`) run on: no nnsight trace, no attention maps.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterable, Iterator, Sequence

import torch

from nnsight_av.errors import AdapterError

__all__ = ["ATTENTION_IMPLEMENTATION", "AttentionHook", "route_attention", "active_hooks"]

#: Name under which the hooked attention function is registered with transformers.
ATTENTION_IMPLEMENTATION = "nnsight_av_hooked"


class AttentionHook:
    """Base class of the per-call objects the hooked attention function consults.

    ``layer_of`` maps ``id(attention module)`` to its decoder layer; `attend` returns the
    attention output (``[B, q, heads, dim]``) to use instead of SDPA's, or None to run SDPA;
    `after` may edit the output the call settled on (in place or by returning a new one).
    """

    def __init__(self, attention_modules: Sequence[torch.nn.Module]) -> None:
        self.layer_of = {id(m): i for i, m in enumerate(attention_modules)}

    def attend(self, layer: int, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor | None:
        return None

    def after(self, layer: int, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, mask: torch.Tensor | None, scale: float, out: torch.Tensor) -> torch.Tensor:
        return out


_ACTIVE: ContextVar[tuple[AttentionHook, ...]] = ContextVar("nnsight_av_attention_hooks", default=())
_REGISTERED = False


def active_hooks() -> tuple[AttentionHook, ...]:
    """The hooks the routed attention function consults now (outermost first)."""
    return _ACTIVE.get()


def _hooked_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    hooks = [(hook, hook.layer_of.get(id(module))) for hook in _ACTIVE.get()]
    hooks = [(hook, layer) for hook, layer in hooks if layer is not None]
    if not hooks:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    layer = hooks[0][1]
    special = [k for k in ("sliding_window", "softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
    if special:
        raise AdapterError(f"decoder layer {layer} calls attention with {special}; the routed attention "
                           "computes plain causal softmax attention only")
    scale = float(scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5))
    out = None
    for hook, layer in hooks:
        out = hook.attend(layer, module, query, key, value, attention_mask, scale)
        if out is not None:
            break
    if out is None:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     is_causal=is_causal, **kwargs)[0]
    for hook, layer in hooks:
        out = hook.after(layer, module, query, key, value, attention_mask, scale, out)
    return out, None


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _hooked_attention)
    # Masks are built as for SDPA (None when plain causal), which is what the function falls back to.
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    _REGISTERED = True


@contextmanager
def route_attention(configs: Iterable[Any], hook: AttentionHook) -> Iterator[None]:
    """Within the block, attention of models using ``configs`` goes through the routed function and ``hook``.

    Blocks nest: an inner hook joins the active ones (the outer hook's `attend` is asked first,
    then every hook's `after`, outer first).
    """
    _register()
    configs = list({id(c): c for c in configs}.values())
    previous = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = ATTENTION_IMPLEMENTATION
    token = _ACTIVE.set((*_ACTIVE.get(), hook))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        for config, value in zip(configs, previous):
            config._attn_implementation = value
