"""Qwen3-Omni: the MoE thinker, audio interleaved with video token by token by timestamp.

Differences from Qwen2.5-Omni that matter here:

* the decoder's MLP is a sparse mixture of experts (``layers[i].mlp`` is the MoE block,
  ``layers[i].router`` its top-k router);
* an audio-in-video block is ordered token by token by rope time: video token ``k`` of
  temporal patch ``p`` sits at ``p * video_second_per_grid * position_id_per_seconds``,
  audio token ``j`` at ``j``, and the video token goes first while its time is ``<=``
  the next audio token's (Qwen2.5 instead emits all video then all audio per 2 s chunk);
  chunks are therefore defined by 2 s time windows over those timestamps;
* the audio encoder emits 13 tokens per full 100-frame (1 s) window plus a
  three-convolution count for the remainder (`qwen3_audio_token_count`), and the
  rope time scale is ``position_id_per_seconds`` (13 in the released checkpoints);
* DeepStack adds vision-encoder features to the hidden states of the visual
  positions after each of the first ``len(vision_config.deepstack_visual_indexes)``
  decoder layers, so there ``layers[l].output`` (before the addition) differs from
  ``layers[l + 1].input`` at video and image positions.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch

from ..spans import MediaLayout
from .base import register_adapter
from .mrope import RopeConfig
from .qwen2_5_omni import Qwen25OmniAdapter

#: ChatML with Qwen3-Omni's media markers, for locally built processors; real checkpoints
#: ship their own template.
QWEN3_CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def _conv_stride2(length: int) -> int:
    """Output length of a kernel-3, stride-2, padding-1 convolution."""
    return (length - 1) // 2 + 1


def qwen3_audio_token_count(mel_frames: int, n_window: int = 50) -> int:
    """Audio tokens Qwen3-Omni's encoder emits for ``mel_frames`` mel frames.

    The encoder cuts the features into windows of ``2 * n_window`` frames (1 s at the
    default) and runs three stride-2 convolutions on each: a full window gives 13 tokens,
    the remainder its own three-convolution count.

    >>> qwen3_audio_token_count(400), qwen3_audio_token_count(300), qwen3_audio_token_count(150)
    (52, 39, 20)
    """
    window = 2 * n_window
    full, rest = divmod(int(mel_frames), window)
    per_window = _conv_stride2(_conv_stride2(_conv_stride2(window)))
    tail = 0 if rest == 0 else _conv_stride2(_conv_stride2(_conv_stride2(rest)))
    return full * per_window + tail


def _processor_default(key: str, fallback: float) -> float:
    """A video-kwargs default of transformers' Qwen3OmniMoeProcessor (the value it lays text out with)."""
    try:
        from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessorKwargs

        return float(Qwen3OmniMoeProcessorKwargs._defaults["videos_kwargs"][key])
    except (ImportError, KeyError, AttributeError):
        return fallback


@register_adapter
class Qwen3OmniAdapter(Qwen25OmniAdapter):
    """Qwen3-Omni MoE thinker (transformers' ``Qwen3OmniMoeThinkerForConditionalGeneration``).

    Module paths and batching are those of Qwen2.5-Omni; the media layout, audio token
    count, tokens and loading differ. Sink dimensions are not known for any Qwen3-Omni
    checkpoint yet (``known_sink_dims()`` is None): find them from data.
    """

    name = "qwen3_omni"
    model_types = ("qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni")
    layer_roles = {
        **Qwen25OmniAdapter.layer_roles,
        "router": ("mlp.gate",),
    }
    roles = {
        **Qwen25OmniAdapter.roles,
        "audio_projector": ("audio_tower.proj2", "model.audio_tower.proj2"),
        "vision_projector": ("visual.merger", "model.visual.merger"),
    }
    token_config = {
        **Qwen25OmniAdapter.token_config,
        "audio": ("audio_token_id",),
        "video": ("video_token_id",),
        "image": ("image_token_id",),
    }
    #: The tokenizer's names for the same tokens, used when a config leaves an id out.
    token_names = {
        "audio": "audio_token", "video": "video_token", "image": "image_token",
        "audio_bos": "audio_bos_token", "audio_eos": "audio_eos_token",
        "vision_bos": "vision_bos_token", "vision_eos": "vision_eos_token",
    }
    sink_dims: dict[int, list[int]] = {}
    sink_tau: dict[int, float] = {}
    default_system = None
    #: Its encoders compute their own layout differently; no media plan for them yet.
    plans_media = False

    def token_id(self, role: str) -> int:
        # The released thinker config names only some boundary ids; the tokenizer knows them all.
        try:
            return super().token_id(role)
        except Exception:
            tokenizer = getattr(self.processor, "tokenizer", None)
            text = getattr(tokenizer, self.token_names.get(role, ""), None) if tokenizer is not None else None
            if text is not None:
                token = tokenizer.convert_tokens_to_ids(text)
                if token is not None and token != tokenizer.unk_token_id:
                    return int(token)
            raise

    # -- time scales -----------------------------------------------------------------
    def position_id_per_seconds(self) -> float:
        """Rope time units per second: the config's, which the model's rope index uses."""
        return float(getattr(self.config, "position_id_per_seconds", 13))

    def processor_position_id_per_seconds(self) -> float:
        """The time scale the processor interleaves text with (its call default unless overridden)."""
        override = self.processor_kwargs.get("position_id_per_seconds")
        return float(override) if override is not None else _processor_default("position_id_per_seconds", 13.0)

    def seconds_per_chunk(self) -> float:
        override = self.processor_kwargs.get("seconds_per_chunk")
        if override is not None:
            return float(override)
        return float(getattr(self.config, "seconds_per_chunk", None) or _processor_default("seconds_per_chunk", 2.0))

    def config_problems(self) -> list[str]:
        problems = []
        config_pps, processor_pps = self.position_id_per_seconds(), self.processor_position_id_per_seconds()
        if config_pps != processor_pps:
            problems.append(f"the config's position_id_per_seconds ({config_pps:g}) differs from the one the "
                            f"processor lays audio-in-video out with ({processor_pps:g}): the rope order would "
                            "not match the token order")
        return problems

    def rope_config(self) -> RopeConfig:
        """The config values the thinker's ``get_rope_index`` reads (float positions, timestamp merge)."""
        config = self.config
        return RopeConfig("qwen3", image=self.token_id("image"), video=self.token_id("video"),
                          audio=self.token_id("audio"), vision_bos=self.token_id("vision_bos"),
                          audio_bos=self.token_id("audio_bos"), merge=self.merge_size(),
                          position_id_per_seconds=config.position_id_per_seconds,
                          audio_tokens=partial(qwen3_audio_token_count, n_window=int(config.audio_config.n_window)))

    # -- media layout ----------------------------------------------------------------
    def audio_token_counts(self, data: Mapping[str, Any]) -> list[int]:
        mask = data.get("feature_attention_mask")
        if mask is None:
            return []
        n_window = int(getattr(self.config.audio_config, "n_window", 50))
        return [qwen3_audio_token_count(int(n), n_window) for n in torch.as_tensor(mask).sum(-1).tolist()]

    def media_layout(self, data: Mapping[str, Any]) -> MediaLayout:
        merge = self.merge_size() ** 2
        video_per_patch, video_patches, video_seconds = [], [], []
        grids, seconds = data.get("video_grid_thw"), data.get("video_second_per_grid")
        if grids is not None:
            for k, (t, h, w) in enumerate(torch.as_tensor(grids).tolist()):
                video_per_patch.append(h * w // merge)
                video_patches.append(t)
                video_seconds.append(float(torch.as_tensor(seconds).reshape(-1)[k]) if seconds is not None else 1.0)
        images = data.get("image_grid_thw")
        image_counts = [int(t * h * w // merge) for t, h, w in torch.as_tensor(images).tolist()] if images is not None else []
        return MediaLayout(video_per_patch, video_patches, video_seconds, self.audio_token_counts(data), image_counts,
                           position_id_per_seconds=self.processor_position_id_per_seconds(),
                           seconds_per_chunk=self.seconds_per_chunk(), interleave="timestamp")

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def load_module(cls, path: str, **hf_kwargs: Any) -> torch.nn.Module:
        from transformers import AutoConfig, Qwen3OmniMoeThinkerForConditionalGeneration

        # A full Omni checkpoint nests the thinker's config; only the thinker is built (never the talker).
        config = AutoConfig.from_pretrained(path)
        thinker_config = getattr(config, "thinker_config", None) or config
        return Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(path, config=thinker_config, **hf_kwargs)

    @classmethod
    def load_processor(cls, path: str) -> Any:
        from transformers import Qwen3OmniMoeProcessor

        return Qwen3OmniMoeProcessor.from_pretrained(path)
