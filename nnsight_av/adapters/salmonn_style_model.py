"""A tiny audio-visual LLM built outside transformers, the way video-SALMONN-style models are.

An audio encoder (log-spectrogram frames, pooled per 0.25 s window by a learned query,
in the spirit of a window-level Q-Former) and a vision encoder (16-pixel patches of
32x32 frames, 4 tokens per frame) feed linear projectors whose outputs replace
placeholder tokens in the input embeddings of a generic decoder LM (a transformers
``LlamaForCausalLM``, whose attention goes through transformers' attention interface).

Its processor renders a ChatML prompt and interleaves audio with video frame by frame:
each frame's visual tokens are followed by the audio tokens that start during that
frame (``<vision><audio> V V V V A A V V V V A A ... </audio></vision>``); audio-only,
video-only and image blocks are ``<audio> A.. </audio>``, ``<vision> V.. </vision>``,
``<vision> I.. </vision>``. ``nnsight_av.adapters.salmonn_style`` is its adapter and
the worked example of docs/adapters.md.

>>> import nnsight_av as nav
>>> model = nav.testing.tiny_model("salmonn_style")
>>> ex = model.prepare(video=nav.testing.synthetic_frames(1.0, 2, 32), audio=nav.testing.synthetic_tone(1.0), text="Hi")
>>> ex.layout().count("V"), ex.layout().count("A")
(8, 4)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn

from ..errors import InputError, MediaError

MODEL_TYPE = "salmonn_style"
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<audio>", "</audio>", "<AudioHere>",
    "<vision>", "</vision>", "<VideoHere>", "<ImageHere>",
)
NAMED_SPECIALS = {
    "audio_token": "<AudioHere>", "video_token": "<VideoHere>", "image_token": "<ImageHere>",
    "audio_bos_token": "<audio>", "audio_eos_token": "</audio>",
    "vision_bos_token": "<vision>", "vision_eos_token": "</vision>",
}
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<audio><AudioHere></audio>' -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<vision><ImageHere></vision>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<vision><VideoHere></vision>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
#: Audio features: 10 ms hop at 16 kHz.
HOP = 160
SAMPLING_RATE = 16000


@dataclass
class SalmonnStyleConfig:
    """Everything the model and its processor share (saved as config.json)."""

    text_config: Any = None                 # a transformers LlamaConfig (or its dict)
    n_mels: int = 32
    audio_dim: int = 32
    audio_window: int = 25                  # feature frames (10 ms each) pooled into one audio token
    vision_dim: int = 32
    image_size: int = 32
    patch_size: int = 16
    audio_token_id: int = 0
    video_token_id: int = 0
    image_token_id: int = 0
    audio_start_token_id: int = 0
    audio_end_token_id: int = 0
    vision_start_token_id: int = 0
    vision_end_token_id: int = 0
    model_type: str = field(default=MODEL_TYPE)

    def __post_init__(self) -> None:
        from transformers import LlamaConfig

        if isinstance(self.text_config, dict):
            self.text_config = LlamaConfig(**self.text_config)

    def get_text_config(self, *args: Any, **kwargs: Any) -> Any:
        return self.text_config

    @property
    def tokens_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def audio_token_seconds(self) -> float:
        return self.audio_window * HOP / SAMPLING_RATE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self) | {"text_config": self.text_config.to_dict()}
        return data


def audio_token_count(feature_frames: int, window: int) -> int:
    """Audio tokens for ``feature_frames`` frames: one per started window."""
    return -(-int(feature_frames) // window)


def audio_frame_of_token(count: int, frames: int, fps: float, token_seconds: float) -> list[int]:
    """Frame each of ``count`` audio tokens is placed after: the frame during which it starts.

    Tokens that start after the last frame stay with the last frame.

    >>> audio_frame_of_token(5, 2, 2.0, 0.25)
    [0, 0, 1, 1, 1]
    """
    per_frame = Fraction(fps).limit_denominator(1000) * Fraction(token_seconds).limit_denominator(1000)
    return [min(frames - 1, math.floor(j * per_frame)) for j in range(count)]


# -- encoders ------------------------------------------------------------------------------------
class WindowAudioEncoder(nn.Module):
    """Frame MLP, then one learned query pools each window of ``window`` frames into a token."""

    def __init__(self, n_mels: int, dim: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.inp = nn.Linear(n_mels, dim)
        self.mix = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.key = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.randn(dim) * 0.5)

    def forward(self, features: Float[torch.Tensor, "batch frames mels"],
                lengths: Int[torch.Tensor, "batch"]) -> Float[torch.Tensor, "positions hidden"]:
        x = self.inp(features)
        x = x + self.mix(x)
        tokens = []
        for i, n in enumerate(lengths.tolist()):
            pad = (-n) % self.window
            xi = torch.nn.functional.pad(x[i, :n], (0, 0, 0, pad)).view(-1, self.window, x.shape[-1])
            valid = (torch.arange(n + pad, device=x.device) < n).view(-1, self.window)
            scores = (self.key(xi) @ self.query) / math.sqrt(x.shape[-1])
            weights = scores.masked_fill(~valid, float("-inf")).softmax(-1)
            tokens.append((weights[..., None] * xi).sum(1))
        return torch.cat(tokens, 0)


class PatchVisionEncoder(nn.Module):
    """Non-overlapping patches of each frame, a position embedding and one MLP block."""

    def __init__(self, dim: int, image_size: int, patch_size: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.randn((image_size // patch_size) ** 2, dim) * 0.5)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, pixel_values: Float[torch.Tensor, "frames 3 height width"]) -> Float[torch.Tensor, "positions hidden"]:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2) + self.pos
        x = x + self.mlp(x)
        return x.reshape(-1, x.shape[-1])


# -- the model ------------------------------------------------------------------------------------
class SalmonnStyleModel(nn.Module):
    """Encoders + projectors + a decoder LM; media placeholder embeddings are replaced by features.

    ``forward`` takes the processor's tensors and returns the LM's output (logits, cache, and
    attentions / hidden states when asked); ``generate`` runs the LM's generation from the
    merged embeddings and returns prompt + new token ids.
    """

    def __init__(self, config: SalmonnStyleConfig) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.config = config
        hidden = config.text_config.hidden_size
        self.audio_encoder = WindowAudioEncoder(config.n_mels, config.audio_dim, config.audio_window)
        self.vision_encoder = PatchVisionEncoder(config.vision_dim, config.image_size, config.patch_size)
        self.audio_projector = nn.Linear(config.audio_dim, hidden)
        self.vision_projector = nn.Sequential(nn.Linear(config.vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.lm = LlamaForCausalLM(config.text_config)

    @property
    def generation_config(self) -> Any:
        return self.lm.generation_config

    # transformers-style accessors, which generic code calls on any model
    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def embed(self, input_ids: Int[torch.Tensor, "batch seq"], audio_features: torch.Tensor | None = None,
              audio_feature_lengths: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
              pixel_values: torch.Tensor | None = None) -> Float[torch.Tensor, "batch seq hidden"]:
        """Token embeddings with every placeholder replaced by its projected media feature."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        media = []
        if audio_features is not None:
            media.append(("audio", self.config.audio_token_id,
                          self.audio_projector(self.audio_encoder(audio_features, audio_feature_lengths))))
        if pixel_values_videos is not None:
            media.append(("video", self.config.video_token_id, self.vision_projector(self.vision_encoder(pixel_values_videos))))
        if pixel_values is not None:
            media.append(("image", self.config.image_token_id, self.vision_projector(self.vision_encoder(pixel_values))))
        given = {name for name, _, _ in media}
        for name, token, features in media:
            mask = input_ids == token
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(f"{int(mask.sum())} {name} placeholder tokens but the {name} encoder produced "
                                 f"{features.shape[0]} features")
            embeds = embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))
        for name, token in (("audio", self.config.audio_token_id), ("video", self.config.video_token_id),
                            ("image", self.config.image_token_id)):
            if name not in given and bool((input_ids == token).any()):
                raise ValueError(f"the input ids hold {name} placeholders but no {name} features were given")
        return embeds

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                audio_features: torch.Tensor | None = None, audio_feature_lengths: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_frame_counts: torch.Tensor | None = None,
                video_fps: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, use_audio_in_video: bool | None = None,
                **lm_kwargs: Any) -> Any:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, audio_features, audio_feature_lengths, pixel_values_videos,
                                       pixel_values)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **lm_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 audio_features: torch.Tensor | None = None, audio_feature_lengths: torch.Tensor | None = None,
                 pixel_values_videos: torch.Tensor | None = None, video_frame_counts: torch.Tensor | None = None,
                 video_fps: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 use_audio_in_video: bool | None = None, **generate_kwargs: Any) -> torch.Tensor:
        embeds = self.embed(input_ids, audio_features, audio_feature_lengths, pixel_values_videos, pixel_values)
        # input_ids ride along so the result starts with the prompt, as transformers' own VLMs return it.
        return self.lm.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                                **generate_kwargs)

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        attn_implementation: str | None = None, **unused: Any) -> "SalmonnStyleModel":
        from safetensors.torch import load_file

        path = Path(path)
        config = SalmonnStyleConfig(**json.loads((path / "config.json").read_text()))
        if attn_implementation is not None:
            config.text_config._attn_implementation = attn_implementation
        model = cls(config)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.to(dtype) if dtype is not None else model


# -- the processor --------------------------------------------------------------------------------
def log_spectrogram(wave: np.ndarray, n_mels: int) -> Float[torch.Tensor, "frames mels"]:
    """Log power in ``n_mels`` equal-width bands, one frame per 10 ms (``len(wave) // 160`` frames)."""
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    frames = len(x) // HOP
    if frames == 0:
        raise MediaError(f"audio of {len(x)} samples is shorter than one {HOP}-sample frame")
    spec = torch.stft(x, n_fft=400, hop_length=HOP, window=torch.hann_window(400), center=True,
                      return_complex=True).abs().pow(2)[:, :frames]
    bands = torch.stack([b.mean(0) for b in torch.tensor_split(spec, n_mels, dim=0)], dim=-1)
    logs = bands.clamp_min(1e-10).log10()
    return ((logs.clamp_min(logs.max() - 8.0) + 4.0) / 4.0).float()


class SalmonnStyleProcessor:
    """Tokenizer + media preprocessing + placeholder expansion for `SalmonnStyleModel`.

    Called like a transformers processor: ``processor(text=..., audio=[wave], videos=[frames],
    images=[...], fps=2.0, use_audio_in_video=True, return_tensors="pt")``.
    """

    #: Keyword arguments transformers-style callers pass that have no meaning here.
    ignored_kwargs = frozenset({"do_sample_frames", "return_tensors", "padding"})

    def __init__(self, tokenizer: Any, config: SalmonnStyleConfig, chat_template: str = CHAT_TEMPLATE) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.sampling_rate = SAMPLING_RATE

    def apply_chat_template(self, conversation: list[dict[str, Any]], chat_template: str | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False, **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(conversation, chat_template=chat_template or self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                                  **kwargs)

    def _frames(self, frames: Any) -> Float[torch.Tensor, "frames 3 height width"]:
        array = np.asarray(frames)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise MediaError(f"frames must be uint8 [T, H, W, 3] (or one [H, W, 3] image), got shape {array.shape}")
        x = torch.tensor(array).permute(0, 3, 1, 2).float() / 255.0
        size = self.config.image_size
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x - 0.5) / 0.5

    def __call__(self, text: str, audio: Sequence[np.ndarray] | None = None, videos: Sequence[Any] | None = None,
                 images: Sequence[Any] | None = None, fps: float = 2.0, use_audio_in_video: bool = False,
                 **kwargs: Any) -> dict[str, Any]:
        unknown = set(kwargs) - self.ignored_kwargs
        if unknown:
            raise InputError(f"SalmonnStyleProcessor got unknown arguments {sorted(unknown)}")
        if not isinstance(text, str):
            raise InputError("SalmonnStyleProcessor takes one prompt string per call")
        cfg, out = self.config, {}
        features = [log_spectrogram(w, cfg.n_mels) for w in (audio or [])]
        audio_counts = iter([audio_token_count(f.shape[0], cfg.audio_window) for f in features])
        frames = [self._frames(v) for v in (videos or [])]
        video_iter = iter(frames)
        pictures = [self._frames(i) for i in (images or [])]
        tpf = cfg.tokens_per_frame
        a, v, i = "<AudioHere>", "<VideoHere>", "<ImageHere>"

        def expand(match: re.Match) -> str:
            try:
                if match.group(0) == a:
                    return a * next(audio_counts)
                if match.group(0) == i:
                    return i * tpf
                count = next(video_iter).shape[0]
                if not use_audio_in_video:
                    return v * (count * tpf)
                n_audio = next(audio_counts)
            except StopIteration:
                raise InputError(f"the prompt has more {match.group(0)} placeholders than media were given") from None
            owner = audio_frame_of_token(n_audio, count, fps, cfg.audio_token_seconds)
            per_frame = [v * tpf + a * owner.count(f) for f in range(count)]
            return "<audio>" + "".join(per_frame) + "</audio>"

        expanded = re.sub("|".join(re.escape(t) for t in (a, v, i)), expand, text)
        if next(audio_counts, None) is not None or next(video_iter, None) is not None:
            raise InputError("more audio or video inputs were given than the prompt has placeholders for")
        ids = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        out["input_ids"] = torch.tensor([ids], dtype=torch.long)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        if features:
            longest = max(f.shape[0] for f in features)
            out["audio_features"] = torch.stack([torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[0]))
                                                 for f in features])
            out["audio_feature_lengths"] = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
        if frames:
            out["pixel_values_videos"] = torch.cat(frames, 0)
            out["video_frame_counts"] = torch.tensor([f.shape[0] for f in frames], dtype=torch.long)
            out["video_fps"] = torch.full((len(frames),), float(fps))
        if pictures:
            out["pixel_values"] = torch.cat(pictures, 0)
        return out

    def save_pretrained(self, path: str | Path) -> None:
        # A subfolder, so transformers' tokenizer loader never reads the model's config.json.
        self.tokenizer.save_pretrained(str(Path(path) / "tokenizer"))
        (Path(path) / "processor_config.json").write_text(json.dumps({"chat_template": self.chat_template}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SalmonnStyleProcessor":
        from transformers import AutoTokenizer

        path = Path(path)
        config = SalmonnStyleConfig(**json.loads((path / "config.json").read_text()))
        extra = json.loads((path / "processor_config.json").read_text())
        return cls(AutoTokenizer.from_pretrained(str(path / "tokenizer")), config, chat_template=extra["chat_template"])
