"""The fast runtime's forward passes: prefill and cached decode steps over the plain modules.

Every decoding method and the analyses that need many forwards run here instead of in an
nnsight trace (nnsight's per-module host cost is what this avoids):

- the prefill is one call of the thinker (media encoders, merge, rope index) that stops
  after the decoder stack, so no full-vocabulary logits are computed for the prompt;
- each later step calls the decoder stack alone with the cached keys/values, the new
  token's embedding and its rope position, then the LM head on the last row;
- code that needs something *inside* attention goes through `Decoder.hooked` (the routed
  attention function of `interventions.runtime.routing`); interventions on activations
  and attention run with `interventions.runtime.hooks.applied`.

The modules come from ``model.raw(...)`` (the one accessor past `AVModel`'s envoys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import torch

from nnsight_av.errors import InputError
from nnsight_av.inputs import move_data

from .routing import AttentionHook, route_attention

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["Decoder", "Prefill", "StopForward", "sync_device", "data_on"]


class StopForward(Exception):
    """Raised from the decoder stack's forward hook to skip the full-sequence LM head."""


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA only), so wall times measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_on(data: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``data`` with its tensors on ``device`` (floating-point ones also cast to ``dtype``)."""
    return move_data(data, device, dtype)


@dataclass
class Prefill:
    """What a prefill leaves behind: the cache, the last row's logits and the prompt's embeddings/positions."""

    cache: Any
    logits: torch.Tensor                  # [B, vocab] float32, last prompt position
    embeds: torch.Tensor                  # [B, T, hidden] input of decoder layer 0
    positions: torch.Tensor | None        # as the decoder stack received them
    length: int

    @property
    def next_position(self) -> torch.Tensor:
        """Per batch row, the rope position of the first generated token."""
        if self.positions is None:
            return torch.full((self.embeds.shape[0],), self.length, dtype=torch.long, device=self.embeds.device)
        pos = self.positions
        if pos.dim() == 3:
            pos = pos[1:] if pos.shape[0] == 4 else pos       # a leading text-position row is not a rope axis
            return pos.amax(dim=(0, 2)) + 1
        return pos.amax(dim=-1) + 1


class Decoder:
    """Prefill and cached decode steps over an `AVModel`'s Hugging Face module.

    The decoder stack is the parent module of the adapter's ``layers``; the prefill runs the
    whole thinker (so media are encoded and merged by the model's own code) and stops after
    the decoder stack; steps call the decoder stack with embeddings and positions.
    """

    def __init__(self, model: "AVModel") -> None:
        from transformers import DynamicCache  # noqa: F401  (fail early if missing)

        self.model = model
        self.module = model.raw()
        self.stack = model.raw("stack")
        self.layers = model.raw("layers")
        self.embed = model.raw("embed")
        self.lm_head = model.raw("lm_head")
        self.attention = [model.raw("self_attn", layer=i) for i in range(len(self.layers))]
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.num_layers = len(self.layers)
        config = getattr(self.module, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))

    # -- inputs ------------------------------------------------------------------------
    def data(self, inputs: "AVInputs | dict[str, Any] | list[AVInputs]") -> dict[str, Any]:
        """The module's keyword arguments for ``inputs`` on this model's device (`AVModel.module_inputs`).

        A prepared input brings its media plan and cached positions, so the prefill makes no host sync.
        """
        return data_on(self.model.module_inputs(inputs), self.device, self.dtype)

    def _configs(self) -> list[Any]:
        found: dict[int, Any] = {}
        for module in [self.stack, *self.attention]:
            config = getattr(module, "config", None)
            if config is not None:
                found[id(config)] = config
        return list(found.values())

    def hooked(self, hook: AttentionHook) -> ContextManager[None]:
        """Route this model's decoder attention through ``hook`` (SDPA where it returns None)."""
        return route_attention(self._configs(), hook)

    # -- forward -----------------------------------------------------------------------
    def new_cache(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
        from transformers import DynamicCache

        if layers is None:
            return DynamicCache(config=self.module.config.get_text_config())
        return DynamicCache(ddp_cache_data=list(layers))

    @staticmethod
    def kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def prefill(self, data: dict[str, Any], pre_layer: Callable | None = None) -> Prefill:
        """Run the prompt (batch as in ``data``) and keep its KV cache and last-row logits."""
        cache = self.new_cache()
        captured: dict[str, Any] = {}

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured["embeds"] = kwargs.get("inputs_embeds")
            captured["positions"] = kwargs.get("position_ids")
            if captured["embeds"] is None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                captured["embeds"] = self.embed(ids)

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state
            raise StopForward

        handles = [self.stack.register_forward_pre_hook(before, with_kwargs=True),
                   self.stack.register_forward_hook(after, with_kwargs=True)]
        try:
            self.module(**data, past_key_values=cache, use_cache=True)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "hidden" not in captured:
            raise InputError("the prefill did not reach the decoder stack; check the inputs")
        logits = self.lm_head(captured["hidden"][:, -1]).float()
        positions = captured["positions"]
        return Prefill(cache, logits, captured["embeds"], positions, int(captured["embeds"].shape[1]))

    def positions(self, prefill: Prefill, offset: int | torch.Tensor, count: int = 1,
                  batch: int | None = None) -> torch.Tensor | None:
        """Rope positions of ``count`` tokens starting ``offset`` tokens after the prompt."""
        pos = prefill.positions
        if pos is None:
            return None
        start = prefill.next_position
        if batch is not None and start.shape[0] != batch:
            start = start[:1].expand(batch)
        steps = torch.arange(count, device=start.device) + offset
        new = start[:, None] + steps[None, :]                                   # [B, count]
        if pos.dim() == 2:
            return new
        rows = [new] * pos.shape[0]
        if pos.shape[0] == 4:
            rows[0] = (torch.arange(count, device=start.device) + prefill.length + offset)[None].expand_as(new)
        return torch.stack(rows)

    def run(self, embeds: torch.Tensor, positions: torch.Tensor | None, cache: Any,
            mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder stack over ``embeds`` with ``cache``; the LM head's float32 logits of the last row.

        ``mask``: a ready 4D attention mask (transformers uses it as is and builds none; the static
        decode path passes its own).
        """
        out = self.stack(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True,
                         attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return self.lm_head(hidden[:, -1]).float()

    def step(self, tokens: torch.Tensor, prefill: Prefill, offset: int, cache: Any) -> torch.Tensor:
        """One decode step: ``tokens [B]`` placed ``offset`` tokens after the prompt."""
        embeds = self.embed(tokens[:, None])
        return self.run(embeds, self.positions(prefill, offset, 1, batch=tokens.shape[0]), cache)

    def decode_text(self, ids: Sequence[int]) -> str:
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            return ""
        return tokenizer.decode(list(ids), skip_special_tokens=True)
