"""Qwen2.5-Omni: the thinker only, audio-in-video interleaved per 2-second chunk."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..spans import MediaLayout
from .base import Adapter, register_adapter
from .media_plan import PLAN_KEY, MediaPlan, collate_plans, install_plan_paths, plan_media
from .mrope import RopeConfig, collate_positions, generation_positions, rope_index

#: The ChatML layout the Qwen-Omni processors render, written for our tiny processors;
#: real checkpoints use the template their processor ships with.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<|audio_bos|><|AUDIO|><|audio_eos|>' -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|vision_bos|><|IMAGE|><|vision_eos|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_bos|><|VIDEO|><|vision_eos|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def whisper_token_count(feature_lengths: torch.Tensor) -> torch.Tensor:
    """Audio tokens per stream from mel-frame counts (two stride-2 stages: conv, then pooling)."""
    after_conv = (feature_lengths - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def pad_cat(tensors: list[torch.Tensor], dim: int, value: float | int = 0) -> torch.Tensor:
    """Concatenate along dim 0 after right-padding dimension ``dim`` to the longest."""
    longest = max(t.shape[dim] for t in tensors)
    padded = []
    for t in tensors:
        if t.shape[dim] < longest:
            shape = list(t.shape)
            shape[dim] = longest - t.shape[dim]
            t = torch.cat([t, t.new_full(shape, value)], dim=dim)
        padded.append(t)
    return torch.cat(padded, dim=0)


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The boolean ``[B, 1, T, T]`` mask SDPA gets for a padded 2-D ``attention_mask``: causal and not padding.

    >>> padded_causal_mask(torch.tensor([[1, 1, 0]]))[0, 0].int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 0]], dtype=torch.int32)
    """
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


@register_adapter
class Qwen25OmniAdapter(Adapter):
    """Qwen2.5-Omni 3B/7B thinker (transformers' ``Qwen2_5OmniThinkerForConditionalGeneration``)."""

    name = "qwen2_5_omni"
    fallback_chat_template = CHATML_TEMPLATE
    model_types = ("qwen2_5_omni", "qwen2_5_omni_thinker")
    fused_decode_layers = ("Qwen2_5OmniDecoderLayer", "Qwen2DecoderLayer")
    roles = {
        "embed": ("model.embed_tokens", "model.language_model.embed_tokens"),
        "layers": ("model.layers", "model.language_model.layers"),
        "final_norm": ("model.norm", "model.language_model.norm"),
        "lm_head": ("lm_head",),
        "rotary": ("model.rotary_emb", "model.language_model.rotary_emb"),
        "audio_encoder": ("audio_tower", "model.audio_tower"),
        "vision_encoder": ("visual", "model.visual"),
    }
    token_config = {
        "audio": ("audio_token_id", "audio_token_index"),
        "video": ("video_token_id", "video_token_index"),
        "image": ("image_token_id", "image_token_index"),
        "audio_bos": ("audio_start_token_id",),
        "audio_eos": ("audio_end_token_id",),
        "vision_bos": ("vision_start_token_id",),
        "vision_eos": ("vision_end_token_id",),
    }
    #: Whether prepared inputs carry a `media_plan.MediaPlan` (the Qwen2.5-Omni thinker's encoders).
    plans_media: bool = True
    sink_dims = {3584: [458, 2570]}
    sink_tau = {3584: 25.0}
    default_system = (
        "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
        "auditory and visual inputs, as well as generating text and speech."
    )

    def __init__(self, module: torch.nn.Module, processor: Any = None) -> None:
        super().__init__(module, processor)
        # The thinker's encoder paths take a prepared input's media plan (no host reads of device data).
        self.plans_media = self.plans_media and install_plan_paths(module)

    def token_id(self, role: str) -> int:
        # Checkpoints saved before transformers 4.52 left the vision boundary ids off the thinker config.
        fallback = {"vision_bos": 151652, "vision_eos": 151653}
        try:
            return super().token_id(role)
        except Exception:
            if role in fallback and int(getattr(self.text_config, "vocab_size", 0)) > fallback[role]:
                return fallback[role]
            raise

    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def media_layout(self, data: Mapping[str, Any]) -> MediaLayout:
        merge = self.merge_size() ** 2
        grids = data.get("video_grid_thw")
        seconds = data.get("video_second_per_grid")
        video_per_patch, video_patches, video_seconds = [], [], []
        if grids is not None:
            for k, (t, h, w) in enumerate(torch.as_tensor(grids).tolist()):
                video_per_patch.append(h * w // merge)
                video_patches.append(t)
                video_seconds.append(float(torch.as_tensor(seconds).reshape(-1)[k]) if seconds is not None else 1.0)
        mask = data.get("feature_attention_mask")
        audio = whisper_token_count(torch.as_tensor(mask).sum(-1)).tolist() if mask is not None else []
        images = data.get("image_grid_thw")
        image_counts = [int(t * h * w // merge) for t, h, w in torch.as_tensor(images).tolist()] if images is not None else []
        return MediaLayout(video_per_patch, video_patches, video_seconds, [int(a) for a in audio], image_counts,
                           float(getattr(self.config, "position_id_per_seconds", 25)),
                           float(getattr(self.config, "seconds_per_chunk", 2)))

    def audio_token_counts(self, data: Mapping[str, Any]) -> list[int]:
        return self.media_layout(data).audio_token_counts

    # -- rope positions -------------------------------------------------------------
    def rope_config(self) -> RopeConfig:
        """The config values the thinker's ``get_rope_index`` reads."""
        config = self.config
        return RopeConfig("qwen2_5", image=self.token_id("image"), video=self.token_id("video"),
                          audio=self.token_id("audio"), vision_bos=self.token_id("vision_bos"),
                          audio_bos=self.token_id("audio_bos"), merge=self.merge_size(),
                          position_id_per_seconds=config.position_id_per_seconds,
                          audio_tokens=whisper_token_count, seconds_per_chunk=config.seconds_per_chunk)

    def position_ids(self, data: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The thinker's M-RoPE ``(position_ids, rope_deltas)`` for ``data``, vectorised (`mrope.rope_index`)."""
        return rope_index(self.rope_config(), data)

    def collate_position_ids(self, items: Sequence[Mapping[str, Any]], padding_side: str) -> torch.Tensor | None:
        cached = [item.get("position_ids") for item in items]
        if any(pos is None for pos in cached):
            return None
        multimodal = any(item.get(k) is not None for item in items for k in ("image_grid_thw", "video_grid_thw"))
        return collate_positions(self.rope_config(), cached, padding_side, multimodal)[0]

    def generation_position_ids(self, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The thinker's generate keeps a text-position row above the three rope rows and extends all four.
        return generation_positions(position_ids, attention_mask) if position_ids.shape[0] == 3 else position_ids

    # -- forward inputs -------------------------------------------------------------
    def forward_plan(self, data: Mapping[str, Any]) -> MediaPlan | None:
        """The encoders' index tensors and lengths for ``data``, computed once (`media_plan.plan_media`)."""
        if not self.plans_media:
            return None
        return plan_media(self.config, data, {m: self.token_id(m) for m in ("audio", "image", "video")})

    def forward_inputs(self, kwargs: dict[str, Any], generating: bool = False) -> dict[str, Any]:
        plan = kwargs.get(PLAN_KEY)
        if plan is None:
            return kwargs
        if generating or not (isinstance(plan, MediaPlan) and plan.fits(kwargs)):
            # generate() rejects keyword arguments its forward does not name; a plan made for other
            # inputs (edited after prepare) must not be used: the model derives everything itself.
            return {k: v for k, v in kwargs.items() if k != PLAN_KEY}
        device = next(self.module.parameters()).device
        if plan.device is not None and plan.device != device:
            # Inputs not moved up front: nnsight moves the tensors to the model, the plan goes with them.
            kwargs = {**kwargs, PLAN_KEY: plan.to(device, non_blocking=True)}
        mask = kwargs.get("attention_mask")
        if (generating or not torch.is_tensor(kwargs.get("position_ids")) or kwargs.get("past_key_values") is not None
                or not torch.is_tensor(mask) or mask.dim() != 2):
            return kwargs
        # transformers' SDPA mask code asks the host whether the 2-D mask has padding (a read of
        # device data), its eager one copies a host scalar to the device; the plan knows the
        # padding, so the mask is passed ready-made. The rope ids are cached: nothing else reads it.
        implementation = str(getattr(self.text_config, "_attn_implementation", None) or "sdpa")
        if plan.full_mask and implementation != "eager":
            return {k: v for k, v in kwargs.items() if k != "attention_mask"}
        if implementation == "sdpa":
            return {**kwargs, "attention_mask": padded_causal_mask(mask)}
        if implementation == "eager":
            dtype = self.module.dtype
            allowed = padded_causal_mask(mask)
            additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
            return {**kwargs, "attention_mask": additive.masked_fill_(~allowed, torch.finfo(dtype).min)}
        return kwargs

    # -- loading -----------------------------------------------------------------
    @classmethod
    def load_module(cls, path: str, **hf_kwargs: Any) -> torch.nn.Module:
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        # The thinker class reads the "thinker." weights of a full Omni checkpoint; the talker is never built.
        return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, **hf_kwargs)

    @classmethod
    def load_processor(cls, path: str) -> Any:
        from transformers import Qwen2_5OmniProcessor

        return Qwen2_5OmniProcessor.from_pretrained(path)

    # -- batching ----------------------------------------------------------------
    def collate(self, items: list[Mapping[str, Any]], padding_side: str = "right", pad_id: int = 0) -> dict[str, Any]:
        flags = {bool(item.get("use_audio_in_video", False)) for item in items}
        if len(flags) > 1:
            from ..errors import InputError

            raise InputError("inputs batched in one trace must agree on use_audio_in_video "
                             "(the rope index takes one flag for the whole batch)")
        lengths = [item["input_ids"].shape[-1] for item in items]
        longest = max(lengths)
        ids, masks = [], []
        for item, n in zip(items, lengths):
            pad = longest - n
            row_ids = item["input_ids"].reshape(1, -1)
            row_mask = item["attention_mask"].reshape(1, -1)
            filler_ids = row_ids.new_full((1, pad), pad_id)
            filler_mask = row_mask.new_zeros((1, pad))
            if padding_side == "left":
                ids.append(torch.cat([filler_ids, row_ids], 1)); masks.append(torch.cat([filler_mask, row_mask], 1))
            else:
                ids.append(torch.cat([row_ids, filler_ids], 1)); masks.append(torch.cat([row_mask, filler_mask], 1))
        out: dict[str, Any] = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
        with_audio = [i for i in items if i.get("input_features") is not None]
        if with_audio:
            out["input_features"] = pad_cat([i["input_features"] for i in with_audio], dim=-1, value=0.0)
            out["feature_attention_mask"] = pad_cat([i["feature_attention_mask"] for i in with_audio], dim=-1, value=0)
        for key in ("pixel_values_videos", "video_grid_thw", "video_second_per_grid", "pixel_values", "image_grid_thw"):
            parts = [torch.as_tensor(i[key]) for i in items if i.get(key) is not None]
            if parts:
                out[key] = torch.cat(parts, 0)
        out["use_audio_in_video"] = flags.pop()
        positions = self.collate_position_ids(items, padding_side)
        if positions is not None:
            out["position_ids"] = positions
        plan = collate_plans([item.get(PLAN_KEY) for item in items], self.config, longest, len(set(lengths)) > 1)
        if plan is not None:
            out[PLAN_KEY] = plan
        return out
