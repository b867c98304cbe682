"""Decoding over a static KV cache: one step without host syncs, replayed as a CUDA graph.

`Decoder.step` grows a ``DynamicCache`` and lets transformers build masks and positions on
the host every token; the loop then waits for the argmax before it can launch the next step.
Here the cache is preallocated for the whole generation (``[batch, kv_heads, prompt +
max_new_tokens, head_dim]`` per layer, the prompt's keys/values copied in), and one step
reads and writes only fixed device buffers:

- the token to feed (written by the previous step's choice), a step counter, the rope
  positions (the first generated token's positions plus the counter) and a boolean mask over
  the cache (keys up to the current position);
- every layer writes its new key/value with ``index_copy_`` at the current position;
- ``choose(logits, step)`` (the method: greedy, VCD's contrast, ASD's mixing) returns the
  next token as a device tensor; it goes into the token buffer and the output buffer.

So a step is a fixed sequence of kernels: on CUDA it is captured once as a ``CUDAGraph``
(warm-up on a side stream, capture, then one replay per token); elsewhere it runs eagerly,
the same code. The host reads the generated ids only every ``check_every`` steps to stop at
EOS; tokens past an EOS are discarded, so the ids equal those of a loop that stops at once.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from nnsight_av.errors import InputError

from .fused_layers import fused_decode_layers
from .routing import AttentionHook

if TYPE_CHECKING:
    from .decoder import Decoder, Prefill

__all__ = ["StaticKV", "StaticDecoder", "GroupedDecodeAttention", "static_supported", "use_static"]

#: ``choose(logits [B, V] float32, step 0-d long) -> token`` (0-d long, on the device, no host sync).
Choose = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StaticKV:
    """Preallocated per-layer keys/values that the decoder layers update in place.

    Transformers' attention calls ``update(key, value, layer_idx)``; the new rows go to the
    positions in ``index`` (a device tensor the step sets), and the whole buffers come back
    (the mask hides what is not written yet).
    """

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], max_len: int) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for key, value in layers:
            length = key.shape[2]
            if length > max_len:
                raise InputError(f"the cache holds {length} positions, more than max_len={max_len}")
            k = key.new_zeros(*key.shape[:2], max_len, key.shape[3])
            v = value.new_zeros(*value.shape[:2], max_len, value.shape[3])
            k[:, :, :length] = key
            v[:, :, :length] = value
            self.keys.append(k)
            self.values.append(v)
        self.index = torch.zeros(1, dtype=torch.long, device=self.keys[0].device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.index, key)
        self.values[layer_idx].index_copy_(2, self.index, value)
        return self.keys[layer_idx], self.values[layer_idx]


class GroupedDecodeAttention(AttentionHook):
    """One query row against the static cache without copying keys per query head.

    With a mask, transformers' SDPA call repeats the cache's keys/values for every query head of a
    group (grouped-query attention), which reads and writes the whole cache several times per layer
    and step. For a single query row the heads of a group can instead be the query *rows* of one
    SDPA call over that group's keys: ``[B, kv_heads, heads/kv_heads, d]`` against ``[B, kv_heads, T, d]``.
    Other calls (prompt rows) are left to the next hook or SDPA.
    """

    def attend(self, layer, module, query, key, value, mask, scale):
        b, h, n, d = query.shape
        if n != 1:
            return None
        kv = key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, kv, h // kv, d), key, value,
                                                               attn_mask=mask, scale=scale)
        return out.reshape(b, 1, h, d)


def static_supported(decoder: "Decoder") -> str:
    """Why ``decoder``'s model cannot decode over a static cache ("" when it can)."""
    config = getattr(decoder.stack, "config", None)
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        return f"the decoder has {sorted(types - {'full_attention'})} layers (static decoding masks full attention only)"
    return ""


class StaticDecoder:
    """A static-cache decode loop over ``decoder`` continuing ``prefill`` (see the module docstring).

    ``layers``: the prompt's keys/values per layer (``Decoder.kv`` of the prefill's cache, or a
    cache built from it, e.g. ASD's two rows); ``graph``: capture the step as a CUDA graph
    (None: on CUDA devices); ``check_every``: steps between reads of the ids for EOS; ``fuse``: run
    the decoder layers transformers' way (False) or, where the layer class is known, the same
    computation in fewer kernels (`interventions.runtime.fused_layers`; ``fused`` says how many layers).
    Extra device tensors a ``choose`` mutates are passed to `generate` as ``state`` so that the
    graph's warm-up can be undone.

    >>> import nnsight_av as nav
    >>> from interventions.runtime.decoder import Decoder
    >>> model = nav.testing.tiny_model()
    >>> decoder = Decoder(model)
    >>> with torch.inference_mode():
    ...     prefill = decoder.prefill(decoder.data(model.prepare(text="Hello there.")))
    ...     loop = StaticDecoder(decoder, prefill, Decoder.kv(prefill.cache), max_new_tokens=3)
    ...     ids, finished = loop.generate(prefill.logits[0].argmax(), lambda logits, step: logits[0].argmax())
    >>> len(ids) <= 3
    True
    """

    def __init__(self, decoder: "Decoder", prefill: "Prefill", layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 max_new_tokens: int, graph: bool | None = None, check_every: int = 16, fuse: bool = True) -> None:
        reason = static_supported(decoder)
        if reason:
            raise InputError(f"static decoding is not available: {reason}")
        if not isinstance(check_every, int) or check_every < 1:
            raise InputError(f"check_every must be a positive int, got {check_every!r}")
        self.decoder = decoder
        device = decoder.device
        self.graph = device.type == "cuda" if graph is None else bool(graph)
        if self.graph and device.type != "cuda":
            raise InputError(f"CUDA graphs need a CUDA device; the model is on {device}")
        self.batch = int(layers[0][0].shape[0])
        self.length = prefill.length
        self.max_new_tokens = max_new_tokens
        self.max_len = prefill.length + max_new_tokens
        self.check_every = check_every
        self.cache = StaticKV(layers, self.max_len)
        base = decoder.positions(prefill, 0, 1, batch=self.batch)
        if base is None:
            base = torch.full((self.batch, 1), prefill.length, dtype=torch.long, device=device)
        self.base = base.clone()
        self.offset = torch.zeros((), dtype=torch.long, device=device)         # steps taken
        self.count = torch.zeros((), dtype=torch.long, device=device)          # keys valid in this step
        self.token = torch.zeros(self.batch, dtype=torch.long, device=device)
        self.ids = torch.zeros(max_new_tokens, dtype=torch.long, device=device)
        self.columns = torch.arange(self.max_len, device=device)
        self.used_graph = False
        self.fuse = bool(fuse)
        self.fused = 0

    # -- one step ------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        """Feed ``token`` at the current position; the float32 logits ``[B, V]`` of the next one."""
        index = self.offset + self.length
        self.cache.index.copy_(index.reshape(1))
        self.count.copy_(index + 1)
        mask = (self.columns <= index).view(1, 1, 1, -1).expand(self.batch, 1, 1, self.max_len)
        embeds = self.decoder.embed(self.token[:, None])
        return self.decoder.run(embeds, self.base + self.offset, self.cache, mask=mask)

    def _body(self, choose: Choose) -> Callable[[], None]:
        def body() -> None:
            logits = self.forward()
            step = self.offset + 1
            token = choose(logits, step).reshape(())
            self.token.copy_(token.expand(self.batch))
            self.ids.index_copy_(0, step.reshape(1), token.reshape(1))
            self.offset.add_(1)
        return body

    def _capture(self, body: Callable[[], None], state: Sequence[torch.Tensor]) -> Callable[[], None]:
        """``body`` as a CUDA graph replay; the warm-up's changes to ``state`` are undone."""
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream(self.decoder.device)
        stream.wait_stream(torch.cuda.current_stream(self.decoder.device))
        with torch.cuda.stream(stream):
            for _ in range(2):        # kernels compile / autotune here, not while capturing
                body()
                # each warm-up step starts from the first position: two steps from there could write
                # past the cache's end when max_new_tokens is 2
                for tensor, value in zip(state, saved):
                    tensor.copy_(value)
        torch.cuda.current_stream(self.decoder.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        self._graph = graph           # keep it (and its memory pool) alive with the loop
        return graph.replay

    # -- the loop ------------------------------------------------------------------------
    def generate(self, first: torch.Tensor, choose: Choose, state: Sequence[torch.Tensor] = ()
                 ) -> tuple[list[int], bool]:
        """Greedy-style loop from the first token ``first`` (0-d, chosen on the prefill's logits).

        Returns the ids (up to and including the first EOS) and whether EOS ended them.
        """
        n = self.max_new_tokens
        self.offset.zero_()
        self.ids.zero_()
        self.ids[0] = first.reshape(())
        self.token.copy_(first.reshape(()).expand(self.batch))
        with self.decoder.hooked(GroupedDecodeAttention(self.decoder.attention)), \
                (fused_decode_layers(self.decoder.layers, self.decoder.model.adapter.fused_decode_layers)
                 if self.fuse else nullcontext(0)) as fused:
            self.fused = fused
            return self._loop(self._body(choose), state)

    def _loop(self, step: Callable[[], None], state: Sequence[torch.Tensor]) -> tuple[list[int], bool]:
        n = self.max_new_tokens
        if self.graph and n > 1:
            step = self._capture(step, [self.offset, self.token, self.ids, *state])
            self.used_graph = True
        eos = self.decoder.eos
        produced, checked = 1, 0
        while True:
            fresh = self.ids[checked:produced].tolist()
            for i, value in enumerate(fresh):
                if value in eos:
                    return self.ids[: checked + i + 1].tolist(), True
            checked = produced
            if produced == n:
                return self.ids.tolist(), False
            todo = min(self.check_every, n - produced)
            for _ in range(todo):
                step()
            produced += todo


def use_static(decoder: "Decoder", static: bool | None, blockers: dict[str, bool]) -> bool:
    """Resolve a method's ``static`` argument: None picks the static path where it applies.

    ``blockers``: options of the call that the static path does not support (name -> set);
    with ``static=True`` any of them, or a model it cannot serve, is an `InputError`.
    """
    if static not in (None, True, False):
        raise InputError(f"static must be True, False or None (auto), got {static!r}")
    if static is False:
        return False
    reasons = [f"{name} is set" for name, on in blockers.items() if on]
    model_reason = static_supported(decoder)
    if model_reason:
        reasons.append(model_reason)
    if reasons and static:
        raise InputError(f"static=True cannot be used here: {'; '.join(reasons)}")
    return not reasons
