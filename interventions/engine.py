"""Runs compiled intervention ops inside one invoke, in the model's execution order.

Every primitive compiles to `Op` s: (layer, hook point, a function). `execute` sorts
them by layer, then by hook point inside the layer (`POINT_ORDER`), then by the order
they were given (composition order), and visits each hook point once: it reads the
value, copies it, lets every op at that point edit the copy in turn, and swaps the copy
in. nnsight requires requests in execution order, which this sorting guarantees.

Before a layer's first hook point the layer's inputs are read, to learn the KV-cache
length (how many positions precede this forward's rows during generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING, Any, Callable

import torch

from nnsight_av.errors import InputError

from .attention_edits import apply_attention_edits
from .context import ApplyContext, visit_stamp
from .site import POINT_ORDER

if TYPE_CHECKING:
    from nnsight_av.model import AVModel

__all__ = ["Op", "execute", "run_ops", "past_length", "first_tensor", "with_first"]


@dataclass
class Op:
    """One edit at one hook point of one layer.

    ``fn(value, ctx)`` edits ``value`` in place, where ``value`` is this invoke's tensor at
    the point, ``[1, rows, ...]`` (a private copy). For ``point == "attn_call"``,
    ``fn(ctx)`` returns a list of `AttentionEdit` instead.
    """

    layer: int
    point: str
    fn: Callable[..., Any]
    seq: int = 0
    label: str = field(default="")


def past_length(kwargs: dict[str, Any], layer: int) -> int:
    """Tokens in the KV cache a decoder layer called with ``kwargs`` sees before this forward's rows."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer))
    except TypeError:
        return int(cache.get_seq_length())


def first_tensor(value: Any) -> torch.Tensor:
    """A module output's main tensor (the first of a tuple/list)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def with_first(value: Any, first: torch.Tensor) -> Any:
    """``value`` with its main tensor replaced by ``first`` (same container type)."""
    if isinstance(value, tuple):
        return (first, *value[1:])
    if isinstance(value, list):
        return [first, *value[1:]]
    return first


def run_ops(ops: list[Op], tensor: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
    """A copy of ``tensor`` edited by each of ``ops`` in turn."""
    edited = tensor.clone()
    for op in ops:
        op.fn(edited, ctx)
    return edited


def execute(model: "AVModel", ops: list[Op], ctx: ApplyContext) -> None:
    """Run ``ops`` in this invoke (must be called from inside the invoke's code)."""
    ordered = sorted(enumerate(ops), key=lambda item: (item[1].layer, POINT_ORDER[item[1].point], item[0]))
    for layer, layer_items in groupby((op for _, op in ordered), key=lambda op: op.layer):
        by_point: dict[str, list[Op]] = {}
        for op in layer_items:
            by_point.setdefault(op.point, []).append(op)
        view = model.layers[layer]
        envoy = object.__getattribute__(view, "_envoy") if hasattr(view, "_envoy") else view
        stamp = visit_stamp(f"{getattr(envoy, 'path', layer)}.input")
        attention = "attn_call" in by_point or "attn_heads" in by_point
        # A layer edited only at and after its attention call learns the cache length from the
        # call's query/key (keys include the cache): one nnsight request fewer per layer.
        from_call = attention and "resid_pre" not in by_point and "input_layernorm" not in by_point
        if not from_call:
            args, kwargs = view.inputs
            hidden = args[0] if args else kwargs["hidden_states"]
            ctx.enter_layer(layer, past_length(kwargs, layer), hidden.shape[1], stamp)

        if "resid_pre" in by_point:
            view.input = run_ops(by_point["resid_pre"], hidden, ctx)
        if "input_layernorm" in by_point:
            value = view.input_layernorm.output
            view.input_layernorm.output = with_first(value, run_ops(by_point["input_layernorm"], first_tensor(value), ctx))
        if attention:
            call = model.adapter.attention_call(view.self_attn)
            edits = []
            if "attn_call" in by_point or from_call:
                call_args, call_kwargs = call.inputs
                module, query, key, value_states = call_args[:4]
                mask = call_args[4] if len(call_args) > 4 else call_kwargs.get("attention_mask")
            if from_call:
                ctx.enter_layer(layer, key.shape[2] - query.shape[2], query.shape[2], stamp)
            if "attn_call" in by_point:
                for op in by_point["attn_call"]:
                    edits.extend(op.fn(ctx))
            output = call.output
            out, weights = output[0], (output[1] if len(output) > 1 else None)
            out = out.clone()
            if edits:
                scaling = call_kwargs.get("scaling", getattr(module, "scaling", None))
                if call_kwargs.get("sliding_window") is not None:
                    raise InputError("attention primitives do not support sliding-window attention layers")
                out, weights = apply_attention_edits(query, key, value_states, mask, scaling, out, weights, edits,
                                                     num_key_value_groups=query.shape[1] // key.shape[1],
                                                     to_device=ctx.to, memo=ctx.memo)
            for op in by_point.get("attn_heads", []):
                op.fn(out, ctx)
            call.output = (out, weights, *output[2:])
        if "attn_output" in by_point:
            value = view.self_attn.output
            view.self_attn.output = with_first(value, run_ops(by_point["attn_output"], first_tensor(value), ctx))
        if "mlp_output" in by_point:
            value = view.mlp.output
            view.mlp.output = with_first(value, run_ops(by_point["mlp_output"], first_tensor(value), ctx))
        if "resid_post" in by_point:
            value = view.output
            view.output = with_first(value, run_ops(by_point["resid_post"], first_tensor(value), ctx))
