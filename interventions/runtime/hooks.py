"""Interventions on plain PyTorch hooks: the same `Intervention` objects, no nnsight trace.

`applied(model, inputs, interventions)` compiles each intervention to the ops the nnsight
engine runs (`Intervention.compile`: layer, hook point, function) and executes them from
forward hooks on the raw modules and from the routed attention function:

==================  ==========================================================
``resid_pre``       forward pre-hook of the decoder layer (also learns the KV-cache length)
``input_layernorm`` forward hook of the pre-attention norm
``attn_call``       the routed attention function: `apply_attention_edits` on its output
``attn_heads``      the routed attention function: its per-head output, before ``o_proj``
``attn_output``     forward hook of the attention block
``mlp_output``      forward hook of the MLP
``resid_post``      forward hook of the decoder layer
==================  ==========================================================

Each batch row has its own `ApplyContext` (its input, sets and padding offset), so a batch of
several clips runs in one forward; ops at one point run in row order, then in composition
order, as in the nnsight engine (a ``Patch(source=k)`` row records before the rows it
patches). Set up for one input, the interventions apply to every row of any batch of that
layout (the conditions of causal tracing, ASD's two branches). Positions map to rows through
the KV-cache length each layer sees, so forwards that compute a suffix of the sequence over
a cached prefix (generation steps, the patched runs of causal tracing) edit the right rows. Attention edits make the routed function the
model's attention backend while the block is open (SDPA for every call it leaves alone).
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch

from nnsight_av.batching import as_list
from nnsight_av.errors import InputError

from ..attention_edits import apply_attention_edits
from ..base import Intervention, as_intervention, normalize_sets
from ..context import ApplyContext
from ..engine import Op, first_tensor, past_length, with_first
from .kv_cache import query_positions, removing
from .routing import AttentionHook, route_attention

try:
    from torch.nn.attention.bias import CausalBias
except ImportError:  # pragma: no cover - older torch
    CausalBias = ()

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["applied", "HookExecutor", "observed", "gradients_from"]

#: Hook points served by plain forward hooks: point -> (raw module role, pre-hook?).
MODULE_POINTS = {"resid_pre": ("layer", True), "input_layernorm": ("input_layernorm", False),
                 "attn_output": ("self_attn", False), "mlp_output": ("mlp", False), "resid_post": ("layer", False)}
ATTENTION_POINTS = ("attn_call", "attn_heads")


class HookExecutor(AttentionHook):
    """Runs per-row compiled ops from PyTorch hooks; `enabled` switches it off between forwards."""

    def __init__(self, model: "AVModel", rows: Sequence[tuple[ApplyContext, list[Op]]]) -> None:
        super().__init__([model.raw("self_attn", layer=i) for i in range(model.num_layers)])
        self.model = model
        self.rows = list(rows)
        self.enabled = True
        self.visits = itertools.count()
        self.by_point: dict[tuple[int, str], list[tuple[int, Op]]] = {}
        for row, (_, ops) in enumerate(self.rows):
            for op in ops:
                self.by_point.setdefault((op.layer, op.point), []).append((row, op))
        self.layers = sorted({layer for layer, _ in self.by_point})
        self.attention = any(point in ATTENTION_POINTS for _, point in self.by_point)

    # -- per layer ---------------------------------------------------------------------------
    def _enter(self, layer: int, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        past = past_length(kwargs, layer)
        stamp = (id(self), next(self.visits))          # one visit of this layer, the same for every row
        query = query_positions(kwargs)
        if isinstance(query, list):               # scattered positions, one set per batch row
            if len(query) != len(self.rows):
                raise InputError(f"a forward of {len(query)} batch rows with their own positions ran with "
                                 f"interventions set up for {len(self.rows)} rows; set up one per batch row")
            for (ctx, _), positions in zip(self.rows, query):
                ctx.enter_layer(layer, past, hidden.shape[1], stamp, positions)
            return
        for ctx, _ in self.rows:
            ctx.enter_layer(layer, past, hidden.shape[1], stamp, query)

    def _batch_rows(self, batch: int) -> list[int]:
        """Which context serves each batch row: its own, or the only one for every row."""
        if batch == len(self.rows):
            return list(range(batch))
        if len(self.rows) == 1:
            return [0] * batch
        raise InputError(f"a forward of batch {batch} ran with interventions set up for {len(self.rows)} rows")

    def _edit(self, layer: int, point: str, value: torch.Tensor) -> torch.Tensor:
        edited = value.clone()              # ops edit rows of the copy in place (a view per row)
        ops = self.by_point[(layer, point)]
        for b, row in enumerate(self._batch_rows(value.shape[0])):
            for r, op in ops:
                if r == row:
                    op.fn(edited[b:b + 1], self.rows[row][0])
        return edited

    def hooks(self) -> list[Any]:
        """Register the forward hooks; returns their handles."""
        handles = []
        for layer in self.layers:
            block = self.model.raw("layer", layer)

            def enter(module, args, kwargs, layer=layer):
                if not self.enabled:
                    return None
                self._enter(layer, args, kwargs)
                if (layer, "resid_pre") not in self.by_point:
                    return None
                if args:
                    return (self._edit(layer, "resid_pre", args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self._edit(layer, "resid_pre", kwargs["hidden_states"])}

            # prepend: our edit comes first, as an nnsight edit of the value would
            handles.append(block.register_forward_pre_hook(enter, with_kwargs=True, prepend=True))
            for point, (role, pre) in MODULE_POINTS.items():
                if pre or (layer, point) not in self.by_point:
                    continue

                def after(module, args, output, layer=layer, point=point):
                    if not self.enabled:
                        return None
                    return with_first(output, self._edit(layer, point, first_tensor(output)))

                handles.append(self.model.raw(role, layer=layer).register_forward_hook(after, prepend=True))
        return handles

    # -- inside attention (the routed function) ----------------------------------------------------
    def after(self, layer, module, query, key, value, mask, scale, out):
        if not self.enabled:
            return out
        calls = self.by_point.get((layer, "attn_call"), [])
        heads = self.by_point.get((layer, "attn_heads"), [])
        if not calls and not heads:
            return out
        out = out.clone()
        groups = query.shape[1] // key.shape[1]
        for b, row in enumerate(self._batch_rows(query.shape[0])):
            ctx = self.rows[row][0]
            edits = [edit for r, op in calls if r == row for edit in op.fn(ctx)]
            if edits:
                if isinstance(mask, CausalBias):
                    mask = None                # causal, aligned bottom-right (queries are the last rows), as None is
                pick = slice(b, b + 1)
                row_mask = mask[pick] if mask is not None and mask.dim() == 4 and mask.shape[0] > 1 else mask
                apply_attention_edits(query[pick], key[pick], value[pick], row_mask, scale, out[pick], None, edits,
                                      num_key_value_groups=groups, to_device=ctx.to, memo=ctx.memo)
            for r, op in heads:
                if r == row:
                    op.fn(out[b:b + 1], ctx)
        return out


def _rows(model: "AVModel", inputs: Any, interventions: Any, sets: Any, offsets: Sequence[int] | None,
          ) -> list[tuple[ApplyContext, list[Op]]]:
    items, _ = as_list(inputs)
    per_row = interventions if isinstance(interventions, list) and len(interventions) == len(items) and \
        all(iv is None or isinstance(iv, Intervention) for iv in interventions) else [interventions] * len(items)
    per_sets = sets if isinstance(sets, (list, tuple)) else [sets] * len(items)
    if len(per_sets) != len(items):
        raise InputError(f"sets= has {len(per_sets)} entries for {len(items)} rows")
    offsets = list(offsets) if offsets is not None else [0] * len(items)
    rows = []
    for index, item in enumerate(items):
        ctx = ApplyContext(model, item, normalize_sets(per_sets[index]), invoke=(index, items), offset=offsets[index])
        iv = as_intervention(per_row[index])
        rows.append((ctx, iv.compile(model, ctx) if iv is not None else []))
    return rows


@contextmanager
def applied(model: "AVModel", inputs: "AVInputs | Sequence[AVInputs]", interventions: Any, *,
            sets: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
            offsets: Sequence[int] | None = None) -> Iterator[HookExecutor]:
    """Within the block, forwards of ``model``'s raw modules apply ``interventions``.

    ``inputs``: the `AVInputs` of each batch row of the forwards to come (one for a batch of
    one). ``interventions``: one, a list composed in order, or ``None``; or a list with one
    entry per row (``None`` for a row left alone). ``sets``: named position sets (one mapping,
    or one per row). ``offsets``: per row, how far left padding moved its positions. The
    yielded `HookExecutor` can be switched off between forwards (``executor.enabled = False``),
    e.g. for generation steps that should run unchanged.

    >>> import nnsight_av as nav, interventions as ivs
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(audio=nav.testing.synthetic_tone(1.0), text="Hi")
    >>> with ivs.runtime.applied(model, ex, ivs.Zero(tokens="audio", layers=0)):
    ...     logits = model.raw()(**ex.data).logits
    >>> torch.allclose(logits, ivs.run(model, ex, ivs.Zero(tokens="audio", layers=0)), atol=1e-5)
    True
    """
    executor = HookExecutor(model, _rows(model, inputs, interventions, sets, offsets))
    with ExitStack() as stack:
        handles = executor.hooks()
        stack.callback(lambda: [h.remove() for h in handles])
        if executor.attention:
            config_holders = [model.raw("stack"), *(model.raw("self_attn", layer=i) for i in executor.layers)]
            configs = [c for c in (getattr(m, "config", None) for m in config_holders) if c is not None]
            stack.enter_context(route_attention(configs, executor))
        yield executor


@contextmanager
def observed(model: "AVModel", point: str, layers: Sequence[int],
             fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, ``fn(layer, value)`` sees the tensor at hook ``point`` of each of ``layers``.

    ``value`` is the model's own tensor, ``[B, rows, ...]`` (a view into the forward, so a
    gradient can be taken with respect to it): read it, do not edit it (edits go through
    `applied`). Points: those served by module hooks (`MODULE_POINTS`). Registered first
    (``prepend``): an edit `applied` opened *inside* this block comes before it.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(audio=nav.testing.synthetic_tone(1.0), text="Hi")
    >>> seen = {}
    >>> with observed(model, "mlp_output", [1], lambda layer, value: seen.setdefault(layer, value.shape)):
    ...     _ = model.raw()(**ex.data)
    >>> seen[1][1] == len(ex)
    True
    """
    if point not in MODULE_POINTS:
        raise InputError(f"cannot observe {point!r} with module hooks; points: {', '.join(MODULE_POINTS)}")
    role, pre = MODULE_POINTS[point]
    handles = []
    for layer in sorted(set(layers)):
        module = model.raw(role, layer=layer)
        if pre:
            def before(mod, args, kwargs, layer=layer):
                fn(layer, args[0] if args else kwargs["hidden_states"])
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True, prepend=True))
        else:
            def after(mod, args, out, layer=layer):
                fn(layer, first_tensor(out))
            handles.append(module.register_forward_hook(after, prepend=True))
    with removing(handles):
        yield


@contextmanager
def gradients_from(model: "AVModel", layer: int = 0) -> Iterator[None]:
    """Within the block, a forward records an autograd graph from decoder ``layer``'s input on, even under ``no_grad``.

    The layer's input becomes a leaf that requires grad (the media encoders and the layers
    before it run without a graph, which is what a first-order attribution needs and costs
    least); grad mode is restored when the block ends. Registered first (``prepend``): edits
    `applied` opened inside the block come before it, `observed` hooks opened outside see the leaf.
    """
    previous = torch.is_grad_enabled()

    def start(mod, args, kwargs):
        torch.set_grad_enabled(True)
        hidden = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    try:
        with removing([model.raw("layer", layer).register_forward_pre_hook(start, with_kwargs=True, prepend=True)]):
            yield
    finally:
        torch.set_grad_enabled(previous)
