"""One prefill with per-layer callbacks: the residual stream and the attention normalisers, read cheaply.

`run_prefill` runs a right-padded batch up to the last layer something is read from and hands
whole-batch tensors to callbacks: the input of a decoder layer (the residual stream), or a
layer's post-rotary ``q``/``k`` with each query row's log-sum-exp (`read_attention`), so that
exact attention to a few columns can be computed without attention maps
(`analyses.attention`). Where the call is plain causal attention, it is served by a kernel that
returns the log-sum-exp next to its output (`interventions.attention_math.attention_with_lse`),
so reading it costs nothing extra.

It runs on the hook runtime (plain PyTorch hooks and the routed attention function); a model
whose attention bypasses transformers' attention interface is served inside an nnsight trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import nnsight
import torch


from ..attention_math import attention_lse, attention_with_lse
from .decoder import Decoder, StopForward
from .routing import AttentionHook

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["run_prefill", "read_attention", "ResidualFn", "AttentionFn"]


def _fusable(model: "AVModel", kwargs: Mapping[str, Any], q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the layer's attention is plain causal softmax attention that a kernel with lse can serve."""
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        return False
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        return False
    config = model.adapter.text_config
    if getattr(config, "attn_logit_softcapping", None):
        return False
    return q.shape[2] == k.shape[2] and q.shape[2] > 1


def read_attention(model: "AVModel", layer: int, fuse: bool | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor, float]:
    """Inside a trace: ``(q, k, lse, scale)`` of ``layer``'s attention call (q/k after rotary).

    With ``fuse`` (default: when the call is plain causal attention) the call is skipped and
    served by `attention_with_lse`, which gives the normaliser at no extra cost; otherwise the
    call runs as usual and the normaliser is recomputed from q, k and the call's mask.
    Right padding needs no mask: a valid query never sees a padded key.
    """
    call = model.adapter.attention_call(model.layers[layer].self_attn)
    args, kwargs = call.inputs
    module, q, k, v = args[0], args[1], args[2], args[3]
    mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None) or q.shape[-1] ** -0.5
    if fuse is None:
        fuse = _fusable(model, kwargs, q, k)
    if fuse:
        out, lse = attention_with_lse(q, k, v, float(scale))
        call.skip((out.transpose(1, 2).contiguous(), None))
    else:
        lse = attention_lse(q, k, float(scale), mask)
    return q, k, lse, float(scale)


ResidualFn = Callable[[int, torch.Tensor], Any]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], Any]


def run_prefill(
    model: "AVModel",
    batch: Sequence["AVInputs"],
    *,
    residual_layers: Sequence[int] = (),
    on_residual: ResidualFn | None = None,
    attention_layers: Sequence[int] = (),
    on_attention: AttentionFn | None = None,
    fuse: bool | None = None,
) -> tuple[dict[int, Any], dict[int, Any]]:
    """One prefill of ``batch`` (right-padded) with callbacks on whole-batch tensors.

    ``on_residual(layer, h)`` gets the input of decoder layer ``layer`` ``[B, T, hidden]``;
    ``on_attention(layer, q, k, lse, scale)`` the post-rotary q/k and the row normalisers
    (see `read_attention`). Their return values come back keyed by layer. The run stops
    right after the last thing it needs, so no logits are computed.

    It runs on the Hugging Face module with plain PyTorch hooks and the attention function
    routed through `interventions.runtime.routing` (no nnsight trace: its per-layer host cost
    showed at short lengths on a GPU). A model whose attention does not go through
    transformers' attention interface is served by the same prefill inside an nnsight trace.
    """
    residual_layers = sorted({model.check_layer(l) for l in residual_layers}) if on_residual else []
    attention_layers = sorted({model.check_layer(l) for l in attention_layers}) if on_attention else []
    if not residual_layers and not attention_layers:
        return {}, {}
    try:
        return _run_prefill_hooked(model, batch, residual_layers, on_residual, attention_layers, on_attention, fuse)
    except _AttentionNotRouted:
        return _run_prefill_traced(model, batch, residual_layers, on_residual, attention_layers, on_attention, fuse)


class _AttentionNotRouted(Exception):
    """The hooked prefill saw no attention call of a wanted layer (the model calls attention its own way)."""


def _run_prefill_hooked(model: "AVModel", batch: Sequence["AVInputs"], residual_layers: list[int],
                        on_residual: ResidualFn | None, attention_layers: list[int], on_attention: AttentionFn | None,
                        fuse: bool | None) -> tuple[dict[int, Any], dict[int, Any]]:
    decoder = Decoder(model)
    config = model.adapter.text_config
    softcap = bool(getattr(config, "attn_logit_softcapping", None))
    found_res: dict[int, Any] = {}
    found_attn: dict[int, Any] = {}
    wanted_attn = set(attention_layers)
    # The run ends at the last read: the last residual (before its layer runs) or the last attention call.
    stop_at = max([(l, 0) for l in residual_layers] + [(l, 1) for l in attention_layers])

    class Reader(AttentionHook):
        def attend(self, layer, module, query, key, value, mask, scale):
            if layer not in wanted_attn:
                return None
            fused = fuse if fuse is not None else (not softcap and query.shape[2] == key.shape[2] > 1)
            if fused:
                out, lse = attention_with_lse(query, key, value, float(scale))
            else:
                lse = attention_lse(query, key, float(scale), mask)
            found_attn[layer] = on_attention(layer, query, key, lse, float(scale))
            if (layer, 1) == stop_at:
                raise StopForward
            return out.transpose(1, 2).contiguous() if fused else None

    def residual(layer: int):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            found_res[layer] = on_residual(layer, hidden)
            if (layer, 0) == stop_at:
                raise StopForward
        return pre

    handles = [decoder.layers[l].register_forward_pre_hook(residual(l), with_kwargs=True) for l in residual_layers]
    try:
        with torch.no_grad(), decoder.hooked(Reader(decoder.attention)):
            decoder.module(**decoder.data(list(batch)), use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if attention_layers and attention_layers[0] not in found_attn:
        raise _AttentionNotRouted
    return found_res, found_attn


def _run_prefill_traced(model: "AVModel", batch: Sequence["AVInputs"], residual_layers: list[int],
                        on_residual: ResidualFn | None, attention_layers: list[int], on_attention: AttentionFn | None,
                        fuse: bool | None) -> tuple[dict[int, Any], dict[int, Any]]:
    wanted = sorted(set(residual_layers) | set(attention_layers))
    with torch.no_grad(), model.trace() as tracer:
        for item in batch:
            with tracer.invoke(item, use_cache=False):
                pass
        with tracer.invoke():
            found = nnsight.save([{}, {}])
            for layer in wanted:
                if layer in residual_layers:
                    found[0][layer] = on_residual(layer, model.layers[layer].input)
                if layer in attention_layers:
                    q, k, lse, scale = read_attention(model, layer, fuse)
                    found[1][layer] = on_attention(layer, q, k, lse, scale)
            tracer.stop()
    return found[0], found[1]
