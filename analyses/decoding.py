"""Decoding over an `AVModel`'s thinker: greedy, VCD, FMD, and the shared KV-cache machinery ASD uses.

Every method here runs its own decode loop over the Hugging Face module (no nnsight trace
per step), so the methods can be timed against each other on an equal footing:

- the prefill is one call of the thinker (media encoders, merge, rope index) that stops
  after the decoder stack, so no full-vocabulary logits are computed for the prompt;
- each later step calls the decoder stack alone with the cached keys/values, the new
  token's embedding and its rope position, then the LM head on the last row;
- methods that need something *inside* attention (ASD's boost and statistics, FMD's merge
  weights) register one attention function with transformers' ``AttentionInterface`` and
  switch the text config to it for the duration of the call; layers they do not touch run
  SDPA exactly as before.

Public here: `greedy_generate`, `vcd_generate`, `fmd_generate`, `DecodeOutput`,
`noised_features` (VCD's contrast input), `blank_modality` (FMD's branch inputs) and
`boosted_attention` (the attention ASD's guided branch computes, written out).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Float

from nnsight_av.errors import AdapterError, InputError, LayerIndexError, SpanError
from nnsight_av.inputs import AVInputs, move_data

from .results import JsonResult, read_json

if TYPE_CHECKING:
    import pandas as pd

    from nnsight_av import AVInputs, AVModel

__all__ = ["DecodeOutput", "greedy_generate", "vcd_generate", "fmd_generate", "noised_features", "diffusion_keep",
           "NOISE_SCHEDULES", "blank_modality",
           "boosted_attention", "ATTENTION_IMPLEMENTATION"]

#: Name under which the hooked attention function is registered with transformers.
ATTENTION_IMPLEMENTATION = "nnsight_av_hooked"


# ---------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------
@dataclass
class DecodeOutput(JsonResult):
    """Generated text of one decoding method.

    ``token_ids``: the new tokens (EOS included when generation stopped on it);
    ``ms``: wall time of the whole call (prefill, sink analysis and decoding);
    ``params``: the method's settings; ``meta``: method-specific facts (e.g. FMD's merge weight).
    """

    method: str
    text: str
    token_ids: list[int]
    prompt_length: int
    ms: float
    finished: bool
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def ms_per_token(self) -> float:
        return self.ms / max(1, len(self.token_ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **asdict(self)}


    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecodeOutput":
        data = {k: v for k, v in data.items() if k != "kind"}
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "DecodeOutput":
        return cls.from_dict(read_json(text_or_path))

    def to_frame(self) -> "pd.DataFrame":
        """One row per generated token."""
        import pandas as pd

        return pd.DataFrame({"step": list(range(1, len(self.token_ids) + 1)), "token_id": self.token_ids})

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.method!r}, tokens={len(self.token_ids)}, "
                f"ms/token={self.ms_per_token:.1f}, text={self.text[:60]!r})")


# ---------------------------------------------------------------------------------------
# the attention the guided branch computes, written out
# ---------------------------------------------------------------------------------------
def boosted_attention(
    query: Float[torch.Tensor, "batch heads q dim"],
    key: Float[torch.Tensor, "batch kv_heads k dim"],
    value: Float[torch.Tensor, "batch kv_heads k dim"],
    scale: float,
    mask: torch.Tensor | None = None,
    *,
    batch: Sequence[int] = (),
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    alpha: float = 0.0,
    mode: str = "pre_softmax",
) -> tuple[Float[torch.Tensor, "batch q heads dim"], Float[torch.Tensor, "batch heads q k"]]:
    """Attention with the logits of chosen (row, column) pairs raised before the softmax.

    For batch entries ``batch``, query rows ``rows`` (indices into the ``q`` axis; all when
    None) and key ``columns``: ``a <- a + alpha * |a|`` (``mode="pre_softmax"``, METHOD.md
    section 6) or ``a <- a + log(1 + alpha)``, i.e. the probabilities of those columns
    multiplied by ``1 + alpha`` and renormalised (``mode="multiplicative"``). ``a`` is the
    scaled logit; the boost is applied before the mask, so masked keys stay masked.
    ``mask``: None (causal, queries aligned to the last keys), boolean (True = attend) or
    additive float, broadcastable to ``[B, heads, q, k]``. Grouped-query attention is handled
    without expanding the keys. Computed in float32; returns the output in the layout
    transformers' attention functions return (``[B, q, heads, dim]``, query dtype) and the
    probabilities ``[B, heads, q, k]`` (float32).

    >>> q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    >>> out, probs = boosted_attention(q, k, v, 0.5)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, 5, 4), v.expand(1, 2, 5, 4),
    ...     attn_mask=torch.ones(3, 5, dtype=torch.bool).tril(2), scale=0.5)
    >>> torch.allclose(out.transpose(1, 2), ref, atol=1e-6)
    True
    """
    b, h, n, d = query.shape
    kv, tk = key.shape[1], key.shape[2]
    if h % kv:
        raise InputError(f"query heads ({h}) must be a multiple of key/value heads ({kv})")
    g = h // kv
    logits = torch.matmul(query.float().reshape(b, kv, g * n, d), key.float().transpose(-1, -2))
    logits = logits.view(b, h, n, tk).mul_(scale)
    if alpha and columns is not None and columns.numel() and len(batch):
        if mode not in ("pre_softmax", "multiplicative"):
            raise InputError(f"boost mode must be 'pre_softmax' or 'multiplicative', got {mode!r}")
        cols = columns.to(logits.device)
        row_idx = torch.arange(n, device=logits.device) if rows is None else rows.to(logits.device)
        if row_idx.numel():
            ri, ci = row_idx[:, None], cols[None, :]
            for bi in batch:
                picked = logits[bi, :, ri, ci]
                bonus = alpha * picked.abs() if mode == "pre_softmax" else torch.full_like(picked, math.log1p(alpha))
                logits[bi, :, ri, ci] = picked + bonus
    if mask is None:
        if n > 1:
            allowed = torch.arange(tk, device=logits.device)[None, :] <= (torch.arange(n, device=logits.device)[:, None]
                                                                         + (tk - n))
            logits = logits.masked_fill(~allowed, float("-inf"))
    elif mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits + mask.float()
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs.view(b, kv, g * n, tk), value.float()).view(b, h, n, -1)
    return out.transpose(1, 2).to(query.dtype).contiguous(), probs


# ---------------------------------------------------------------------------------------
# the hooked attention function
# ---------------------------------------------------------------------------------------
class AttentionHook:
    """Base class of the per-call objects the hooked attention function consults.

    ``layer_of`` maps ``id(attention module)`` to its decoder layer; `attend` returns the
    attention output (``[B, q, heads, dim]``) to use instead of SDPA's, or None to run SDPA.
    """

    def __init__(self, attention_modules: Sequence[torch.nn.Module]) -> None:
        self.layer_of = {id(m): i for i, m in enumerate(attention_modules)}

    def attend(self, layer: int, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor | None:
        return None


_ACTIVE: ContextVar[AttentionHook | None] = ContextVar("nnsight_av_attention_hook", default=None)
_REGISTERED = False


def _hooked_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    hook = _ACTIVE.get()
    if hook is not None:
        layer = hook.layer_of.get(id(module))
        if layer is not None:
            special = [k for k in ("sliding_window", "softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
            if special:
                raise AdapterError(f"decoder layer {layer} calls attention with {special}; the hooked attention of "
                                   "ASD/FMD computes plain causal softmax attention only")
            scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
            out = hook.attend(layer, module, query, key, value, attention_mask, float(scale))
            if out is not None:
                return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


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


class StopForward(Exception):
    """Raised from the decoder stack's forward hook to skip the full-sequence LM head."""


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA only), so wall times measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data_on(data: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
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
    def data(self, inputs: "AVInputs | dict[str, Any]") -> dict[str, Any]:
        raw = inputs.data if hasattr(inputs, "data") else inputs
        return _data_on(dict(raw), self.device, self.dtype)

    def _configs(self) -> list[Any]:
        found: dict[int, Any] = {}
        for module in [self.stack, *self.attention]:
            config = getattr(module, "config", None)
            if config is not None:
                found[id(config)] = config
        return list(found.values())

    @contextmanager
    def hooked(self, hook: AttentionHook) -> Iterator[None]:
        """Route this model's decoder attention through ``hook`` (SDPA where it returns None)."""
        _register()
        configs = self._configs()
        previous = [c._attn_implementation for c in configs]
        for config in configs:
            config._attn_implementation = ATTENTION_IMPLEMENTATION
        token = _ACTIVE.set(hook)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            for config, value in zip(configs, previous):
                config._attn_implementation = value

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

    def run(self, embeds: torch.Tensor, positions: torch.Tensor | None, cache: Any) -> torch.Tensor:
        """Decoder stack over ``embeds`` with ``cache``; the LM head's float32 logits of the last row."""
        out = self.stack(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True)
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


def check_new_tokens(max_new_tokens: int) -> None:
    """An `InputError` unless ``max_new_tokens`` is a positive int."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def _greedy_loop(decoder: Decoder, prefill: Prefill, max_new_tokens: int,
                 choose: Callable[[torch.Tensor], torch.Tensor], cache: Any, batch: int) -> tuple[list[int], bool]:
    """Generic loop: ``choose(logits [B, V]) -> token (0-d)``; the token is fed to every batch row."""
    ids: list[int] = []
    token = choose(prefill.logits)
    for step in range(max_new_tokens):
        value = int(token)
        ids.append(value)
        if value in decoder.eos or step == max_new_tokens - 1:
            return ids, value in decoder.eos
        logits = decoder.step(token.reshape(1).expand(batch), prefill, step, cache)
        token = choose(logits)
    return ids, False


def as_inputs(model: "AVModel", inputs: Any) -> "AVInputs":
    """``inputs`` if it is `AVInputs`, else an `InputError` (decoding takes prepared inputs only)."""
    if not isinstance(inputs, AVInputs):
        raise InputError(f"inputs must be AVInputs (from model.prepare), got {type(inputs).__name__}")
    return inputs


# ---------------------------------------------------------------------------------------
# greedy
# ---------------------------------------------------------------------------------------
def greedy_generate(model: "AVModel", inputs: "AVInputs", max_new_tokens: int = 64) -> DecodeOutput:
    """Greedy decoding with a KV cache (the baseline every other method is timed against).

    Equal to ``model.generate(ex, do_sample=False)`` token for token; it stops at EOS.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(text="Describe what you see and hear in a single sentence.")
    >>> out = greedy_generate(model, ex, max_new_tokens=4)
    >>> out.method, out.num_new_tokens <= 4
    ('greedy', True)
    """
    check_new_tokens(max_new_tokens)
    ex = as_inputs(model, inputs)
    decoder = Decoder(model)
    start = time.perf_counter()
    with torch.inference_mode():
        prefill = decoder.prefill(decoder.data(ex))
        ids, finished = _greedy_loop(decoder, prefill, max_new_tokens, lambda lg: lg[0].argmax(), prefill.cache, 1)
    sync_device(decoder.device)
    ms = (time.perf_counter() - start) * 1000
    return DecodeOutput("greedy", decoder.decode_text(ids), ids, len(ex), ms, finished,
                        {"max_new_tokens": max_new_tokens})


# ---------------------------------------------------------------------------------------
# VCD
# ---------------------------------------------------------------------------------------
#: Feature tensors that carry the media (processor outputs of Qwen-Omni-style models).
MEDIA_FEATURES = {"video": ("pixel_values_videos", "pixel_values"), "audio": ("input_features",)}


#: Forward-diffusion schedules for VCD's contrast input (see `diffusion_keep`).
NOISE_SCHEDULES = ("sigmoid", "linear")


def diffusion_keep(noise_step: int, schedule: str = "sigmoid", steps: int = 1000) -> float:
    """``alpha_bar`` at step ``noise_step`` (0-based) of a ``steps``-step forward diffusion.

    ``schedule="sigmoid"`` (VCD's released code): ``beta = sigmoid(linspace(-6, 6, steps)) *
    (5e-3 - 1e-5) + 1e-5``. ``schedule="linear"`` (DDPM, Ho et al. 2020): ``beta`` from 1e-4
    to 0.02. ``alpha_bar = prod(1 - beta[:noise_step + 1])``; the noised input keeps
    ``sqrt(alpha_bar)`` of the signal: at step 500 about 86% (sigmoid) or 28% (linear).

    >>> round(diffusion_keep(500) ** 0.5, 3), round(diffusion_keep(500, "linear") ** 0.5, 3)
    (0.863, 0.279)
    """
    if schedule not in NOISE_SCHEDULES:
        raise InputError(f"unknown noise schedule {schedule!r}; use one of {', '.join(NOISE_SCHEDULES)}")
    if isinstance(noise_step, bool) or not isinstance(noise_step, (int, np.integer)) or not 0 <= noise_step < steps:
        raise InputError(f"noise_step must be an integer in [0, {steps}), got {noise_step!r}")
    if schedule == "sigmoid":
        betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, steps))) * (5e-3 - 1e-5) + 1e-5
    else:
        betas = np.linspace(1e-4, 0.02, steps)
    return float(np.prod(1.0 - betas[: int(noise_step) + 1]))


def noised_features(inputs: "AVInputs | dict[str, Any]", noise_step: int = 500, seed: int = 0,
                    modalities: Sequence[str] = ("video", "audio"), schedule: str = "sigmoid") -> dict[str, Any]:
    """VCD's distorted input: the media features diffused for ``noise_step`` of 1000 steps.

    ``x' = sqrt(abar) x + sqrt(1 - abar) eps`` on the processor's video pixels and audio
    mel features (the token layout is unchanged; text is untouched), the forward step VCD
    applies to images. ``schedule``: ``"sigmoid"`` (default, the betas of VCD's released
    code: about 86% of the signal kept at step 500) or ``"linear"`` (DDPM's linear betas:
    about 28% kept at step 500, a much noisier contrast); see `diffusion_keep`. Seeded, so
    the same call gives the same contrast input.

    >>> data = {"input_ids": torch.ones(1, 3, dtype=torch.long), "input_features": torch.zeros(1, 2, 4)}
    >>> noisy = noised_features(data, noise_step=999, schedule="linear")
    >>> bool(noisy["input_features"].std() > 0.9), bool((noisy["input_ids"] == 1).all())
    (True, True)
    """
    keep = diffusion_keep(noise_step, schedule)
    data = dict(inputs.data if hasattr(inputs, "data") else inputs)
    generator = torch.Generator().manual_seed(seed)
    touched = 0
    for modality in modalities:
        if modality not in MEDIA_FEATURES:
            raise InputError(f"unknown modality {modality!r}; use 'video' and/or 'audio'")
        for name in MEDIA_FEATURES[modality]:
            value = data.get(name)
            if torch.is_tensor(value) and value.is_floating_point():
                eps = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(value.device, value.dtype)
                data[name] = value * math.sqrt(keep) + eps * math.sqrt(1.0 - keep)
                touched += 1
    if touched == 0:
        raise InputError(f"these inputs carry no {'/'.join(modalities)} features to noise")
    return data


def vcd_generate(model: "AVModel", inputs: "AVInputs", max_new_tokens: int = 64, alpha: float = 1.0,
                 beta: float = 0.1, noise_step: int = 500, seed: int = 0,
                 modalities: Sequence[str] = ("video", "audio"), schedule: str = "sigmoid") -> DecodeOutput:
    """Visual contrastive decoding extended to audio and video (Leng et al., 2024).

    The clean prompt and a copy whose video and audio features are noised (`noised_features`)
    run as one batch of two sharing the decoded tokens. Per step, with ``l`` the logits:
    ``(1 + alpha) * l(x) - alpha * l(x_noised)``, restricted to the plausible tokens
    ``p(x) >= beta * max p(x)``; the argmax is taken (greedy). ``noise_step`` and
    ``schedule`` set how noisy the contrast copy is (default: step 500 of VCD's sigmoid
    schedule, as in VCD's released code; ``schedule="linear"`` is DDPM's, much noisier).

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="Describe what you see and hear in a single sentence.")
    >>> vcd_generate(model, ex, max_new_tokens=3).method
    'vcd'
    """
    check_new_tokens(max_new_tokens)
    if not (math.isfinite(alpha) and alpha >= 0) or not 0 <= beta <= 1:
        raise InputError(f"VCD needs alpha >= 0 and beta in [0, 1]; got alpha={alpha}, beta={beta}")
    diffusion_keep(noise_step, schedule)  # checks both before the model runs
    ex = as_inputs(model, inputs)
    decoder = Decoder(model)
    start = time.perf_counter()
    log_beta = math.log(beta) if beta > 0 else -math.inf

    def choose(logits: torch.Tensor) -> torch.Tensor:
        clean, noised = logits[0], logits[1]
        contrast = (1 + alpha) * clean - alpha * noised
        plausible = clean >= clean.max() + log_beta
        return contrast.masked_fill(~plausible, float("-inf")).argmax()

    with torch.inference_mode():
        clean = dict(ex.data)
        noisy = noised_features(clean, noise_step, seed, modalities, schedule)
        batch = model.adapter.collate([clean, noisy], padding_side="right", pad_id=0)
        prefill = decoder.prefill(decoder.data(batch))
        ids, finished = _greedy_loop(decoder, prefill, max_new_tokens, choose, prefill.cache, 2)
    sync_device(decoder.device)
    ms = (time.perf_counter() - start) * 1000
    return DecodeOutput("vcd", decoder.decode_text(ids), ids, len(ex), ms, finished,
                        {"max_new_tokens": max_new_tokens, "alpha": alpha, "beta": beta, "noise_step": noise_step,
                         "schedule": schedule, "seed": seed, "modalities": list(modalities)})


# ---------------------------------------------------------------------------------------
# FMD
# ---------------------------------------------------------------------------------------
def blank_modality(model: "AVModel", inputs: "AVInputs", modality: str) -> "AVInputs":
    """The same clip with ``modality`` blanked at the raw input: black frames or digital silence.

    Frame count and size, and audio length, are kept, so the token layout is identical
    (checked: a `SpanError` if the processor gives other tokens).
    """
    ex = as_inputs(model, inputs)
    request = ex.request
    if modality == "video":
        if request.video is None:
            raise InputError("this input has no video to blank")
        blanked = request.with_media(video=np.zeros_like(request.video))
    elif modality == "audio":
        if request.audio is None:
            raise InputError("this input has no audio to blank")
        blanked = request.with_media(audio=np.zeros_like(request.audio))
    else:
        raise InputError(f"modality must be 'video' or 'audio', got {modality!r}")
    out = model.prepare_request(blanked)
    if not torch.equal(out.input_ids.cpu(), ex.input_ids.cpu()):
        raise SpanError(f"blanking the {modality} changed the token layout ({len(ex)} -> {len(out)} tokens)")
    return out


class _ForkHook(AttentionHook):
    """Measures, in the fork layers of the prefill, the attention the prompt's question rows pay to
    audio tokens (row 0, the audio-only branch) and to video tokens (row 1, the video-only branch)."""

    def __init__(self, attention_modules: Sequence[torch.nn.Module], fork: int, rows: torch.Tensor,
                 audio: torch.Tensor, video: torch.Tensor) -> None:
        super().__init__(attention_modules)
        self.fork, self.rows, self.audio, self.video = fork, rows, audio, video
        self.active = True
        self.mass: list[torch.Tensor] = []

    def attend(self, layer, module, query, key, value, mask, scale):
        if not self.active or layer >= self.fork or self.rows.numel() == 0:
            return None
        rows = self.rows.to(query.device)
        b, h, _, d = query.shape
        kv = key.shape[1]
        q = query[:, :, rows].float().reshape(b, kv, (h // kv) * rows.numel(), d)
        logits = torch.matmul(q, key.float().transpose(-1, -2)).view(b, h, rows.numel(), -1) * scale
        hidden = torch.arange(key.shape[2], device=query.device)[None, :] > rows[:, None]
        probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), -1)
        audio_mass = probs[0][..., self.audio.to(query.device)].sum(-1).mean()
        video_mass = probs[1][..., self.video.to(query.device)].sum(-1).mean()
        self.mass.append(torch.stack([audio_mass, video_mass]))
        return None


def fmd_generate(model: "AVModel", inputs: "AVInputs", max_new_tokens: int = 64, fork_layer: int | None = None,
                 merge: str | float = "attention", eps: float = 1e-8) -> DecodeOutput:
    """Fork-merge decoding (Jung et al., 2025), as we read it.

    Fork: decoder layers ``0 .. fork_layer - 1`` run on two versions of the prompt, an
    audio-only one (video blanked to black frames) and a video-only one (audio blanked to
    silence), same layout (`blank_modality`). Merge: at the input of layer ``fork_layer`` the
    two hidden states are combined at every position, ``h = w h_audio_only + (1 - w) h_video_only``,
    and the remaining layers run on the merged states (both batch rows then carry the same
    values, so one batch of two serves both phases and shares one KV cache layout).
    ``merge="attention"`` (default): ``w = A / (A + V)``, where ``A`` is the attention mass the
    question rows (text after the last media token) pay to the audio tokens in the audio-only
    branch and ``V`` the mass they pay to the video tokens in the video-only branch, averaged
    over heads, those rows and the fork layers, measured once on the prompt; ``"mean"``:
    ``w = 0.5``; a float: that ``w``. Generated tokens go through the same fork and merge
    with the prompt's ``w``. ``fork_layer`` defaults to a quarter of the depth. Building the two
    blanked inputs runs the processor; its time is in ``meta["prepare_ms"]``, not in ``ms``.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="Describe what you see and hear in a single sentence.")
    >>> out = fmd_generate(model, ex, max_new_tokens=3)
    >>> out.method, 0.0 <= out.meta["merge_weight_audio"] <= 1.0
    ('fmd', True)
    """
    check_new_tokens(max_new_tokens)
    ex = as_inputs(model, inputs)
    decoder = Decoder(model)
    layers = decoder.num_layers
    fork = max(1, layers // 4) if fork_layer is None else fork_layer
    if not isinstance(fork, int) or not 1 <= fork <= layers - 1:
        raise LayerIndexError(f"fork_layer must be in [1, {layers - 1}] for this {layers}-layer model, got {fork}")
    if not (merge in ("attention", "mean") or isinstance(merge, (int, float)) and not isinstance(merge, bool)):
        raise InputError(f"merge must be 'attention', 'mean' or a weight in [0, 1], got {merge!r}")
    if isinstance(merge, (int, float)) and not 0 <= float(merge) <= 1:
        raise InputError(f"a fixed merge weight must lie in [0, 1], got {merge}")
    spans = ex.spans
    if spans.audio.numel() == 0 or spans.video.numel() == 0:
        raise InputError("fork-merge decoding needs both audio and video tokens in the input")
    last_media = int(spans.media.max())
    rows = torch.arange(last_media + 1, len(ex))
    hook = _ForkHook(decoder.attention, fork, rows, spans.audio, spans.video)
    weight: dict[str, torch.Tensor] = {}

    def merge_states(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "w" not in weight:
            if merge == "attention" and hook.mass:
                mass = torch.stack(hook.mass).mean(0)
                weight["w"] = mass[0] / (mass[0] + mass[1] + eps)
            else:
                weight["w"] = torch.tensor(0.5 if merge in ("attention", "mean") else float(merge),
                                           device=decoder.device)
            hook.active = False
        hidden = args[0] if args else kwargs["hidden_states"]
        w = weight["w"].to(hidden.dtype)
        merged = (w * hidden[0] + (1 - w) * hidden[1])[None].expand_as(hidden).contiguous()
        if args:
            return (merged, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": merged}

    # Building the branch inputs runs the processor (CPU work that belongs to input preparation, like
    # `model.prepare` for the other methods), so it is timed apart: meta["prepare_ms"].
    prepare_start = time.perf_counter()
    audio_only = blank_modality(model, ex, "video")
    video_only = blank_modality(model, ex, "audio")
    batch = model.adapter.collate([audio_only.data, video_only.data], padding_side="right", pad_id=0)
    prepare_ms = (time.perf_counter() - prepare_start) * 1000
    start = time.perf_counter()
    with torch.inference_mode():
        handle = decoder.layers[fork].register_forward_pre_hook(merge_states, with_kwargs=True)
        try:
            with decoder.hooked(hook):
                prefill = decoder.prefill(decoder.data(batch))
                ids, finished = _greedy_loop(decoder, prefill, max_new_tokens, lambda lg: lg[0].argmax(),
                                             prefill.cache, 2)
        finally:
            handle.remove()
    sync_device(decoder.device)
    ms = (time.perf_counter() - start) * 1000
    w = float(weight["w"]) if "w" in weight else float("nan")
    return DecodeOutput("fmd", decoder.decode_text(ids), ids, len(ex), ms, finished,
                        {"max_new_tokens": max_new_tokens, "fork_layer": fork,
                         "merge": merge if isinstance(merge, str) else float(merge)},
                        {"merge_weight_audio": w, "prepare_ms": prepare_ms})
