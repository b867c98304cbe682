"""`AVInputs`: one prepared audio-visual prompt (processor tensors + spans + the raw media)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import InputError, MediaError
from .media import load_audio, load_image, load_video
from .spans import MODALITY_CODES, Spans

if TYPE_CHECKING:
    from .model import AVModel

__all__ = ["AVInputs", "MediaRequest", "prepare", "move_data"]

#: Keys of ``AVInputs.data`` that are never cast to the model's dtype: rope positions are exact
#: (Qwen3-Omni's are float32 and may be fractional; bf16 would round 1601 to 1600).
EXACT_KEYS = frozenset({"position_ids"})


def move_data(data: dict[str, Any], device: str | torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``data`` with its tensors on ``device`` and float features cast to ``dtype`` (positions keep theirs).

    >>> moved = move_data({"input_features": torch.zeros(1, 2), "position_ids": torch.zeros(3, 1, 2)}, "cpu",
    ...                   torch.bfloat16)
    >>> moved["input_features"].dtype, moved["position_ids"].dtype
    (torch.bfloat16, torch.float32)
    """
    def move(key: str, value: Any) -> Any:
        if not torch.is_tensor(value):
            return value
        if dtype is not None and value.is_floating_point() and key not in EXACT_KEYS:
            return value.to(device=device, dtype=dtype)
        return value.to(device)

    return {key: move(key, value) for key, value in data.items()}


@dataclass
class MediaRequest:
    """The decoded media and text an `AVInputs` was built from (kept for ablations and re-runs)."""

    text: str = ""
    system: str | None = None
    video: np.ndarray | None = None          # uint8 [T, H, W, 3], sampled at fps
    audio: np.ndarray | None = None          # float32 mono at the processor's rate
    images: list[Any] = field(default_factory=list)
    fps: float = 2.0
    use_audio_in_video: bool = True
    source: dict[str, str] = field(default_factory=dict)

    def with_media(self, **changes: Any) -> "MediaRequest":
        return replace(self, **changes)


@dataclass
class AVInputs:
    """Model inputs for one prompt.

    ``data`` holds the processor's tensors (batch of one) and, for models with
    multimodal rope, the ``position_ids`` computed once at preparation (every forward
    passes them, so the model never recomputes them); ``spans`` the named token
    positions, ``request`` the decoded media it came from, ``prompt_text`` the
    rendered chat prompt; ``plan`` what the adapter computed once so that a traced
    forward never reads device data on the host (`Adapter.forward_plan`; None when it
    has none). Pass it to ``model.trace(ex)`` or ``tracer.invoke(ex)``.
    """

    data: dict[str, Any]
    spans: Spans
    request: MediaRequest
    prompt_text: str
    adapter: str
    plan: Any = None

    @property
    def input_ids(self) -> torch.Tensor:
        return self.data["input_ids"]

    @property
    def use_audio_in_video(self) -> bool:
        return bool(self.data.get("use_audio_in_video", False))

    @property
    def position_ids(self) -> torch.Tensor | None:
        """The cached rope positions ``[3, 1, T]`` (None when the model's own are plain ``0..T-1``)."""
        return self.data.get("position_ids")

    @property
    def rope_deltas(self) -> torch.Tensor | None:
        """``[1, 1]``: the largest position + 1 - T; generated token ``k`` (from 0) sits at ``T + k + rope_deltas``."""
        pos = self.position_ids
        return None if pos is None else (pos.max() + 1 - pos.shape[-1]).reshape(1, 1)

    def __len__(self) -> int:
        return int(self.data["input_ids"].shape[-1])

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "AVInputs":
        """A copy with the tensors on ``device`` (float features cast to ``dtype`` if given).

        Moving once up front saves the host-to-device copy of pixel/mel features on every trace.
        The cached ``position_ids`` move too and keep their dtype; so do the plan's index tensors.
        """
        plan = self.plan.to(device) if self.plan is not None else None
        return replace(self, data=move_data(self.data, device, dtype), plan=plan)

    def layout(self) -> str:
        """One character per token: V video, A audio, I image, . text."""
        return "".join(MODALITY_CODES[m] for m in self.spans.modality_of())

    def __repr__(self) -> str:
        return f"AVInputs(adapter={self.adapter!r}, {self.spans!r})"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in self.spans.summary().items())
        return f"<b>AVInputs</b> ({self.adapter})<table>{rows}</table><pre>{self.layout()[:400]}</pre>"


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def prepare(
    model: "AVModel",
    video: Any = None,
    audio: Any = None,
    images: Any = None,
    text: str | None = None,
    system: str | None = "default",
    use_audio_in_video: bool = True,
    fps: float | None = None,
    audio_rate: int | None = None,
) -> AVInputs:
    """Decode media, apply the chat template and the processor; see `AVModel.prepare`."""
    adapter = model.adapter
    fps = float(fps or adapter.video_fps)
    text = text or ""
    source: dict[str, str] = {}
    if video is None and audio is None and not _as_list(images) and not text.strip():
        raise InputError("nothing to prepare: the prompt is empty and no video, audio or image was given")

    frames = None
    if video is not None:
        if isinstance(video, (str, os.PathLike)):
            source["video"] = str(video)
        frames = load_video(video, fps=fps).frames
    if video is None:
        use_audio_in_video = False
    wave = None
    if audio is not None:
        if isinstance(audio, (str, os.PathLike)):
            source["audio"] = str(audio)
        wave = load_audio(audio, adapter.sampling_rate, source_rate=audio_rate)
    elif use_audio_in_video:
        if "video" not in source:
            raise InputError("use_audio_in_video=True but the video was given as frames, which carry no "
                             "audio track: pass audio= or use_audio_in_video=False")
        wave = load_audio(source["video"], adapter.sampling_rate)
    image_list = [load_image(img) for img in _as_list(images)]
    if system == "default":
        system = model.default_system
    request = MediaRequest(text=text, system=system, video=frames, audio=wave, images=image_list, fps=fps,
                           use_audio_in_video=use_audio_in_video, source=source)
    return prepare_request(model, request)


#: Passed to Qwen video processors as ``cap_pixels_per_frame`` (transformers >= 5.17 warns on
#: every run while it is unset). True is the reference behaviour (qwen-vl-utils /
#: qwen-omni-utils, and transformers' default from v5.22): a video's total pixels are bounded
#: by ``max_video_tokens``. It changes no token count below that bound (about 108k video tokens,
#: past any model's context), so clips that fit a model get the same tokens either way;
#: docs/gotchas.md has the counts.
VIDEO_PIXEL_CAP = True


def _video_pixel_cap(processor: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"cap_pixels_per_frame": VIDEO_PIXEL_CAP}`` where the video processor takes it and nobody set it."""
    video_processor = getattr(processor, "video_processor", None)
    if not hasattr(type(video_processor), "cap_pixels_per_frame"):
        return {}
    chosen = (kwargs.get("cap_pixels_per_frame"), (kwargs.get("videos_kwargs") or {}).get("cap_pixels_per_frame"),
              video_processor.cap_pixels_per_frame)
    if any(value is not None for value in chosen):
        return {}
    return {"cap_pixels_per_frame": VIDEO_PIXEL_CAP}


def prepare_request(model: "AVModel", request: MediaRequest) -> AVInputs:
    """Build `AVInputs` from already-decoded media (used by ablations to swap media in place)."""
    adapter, processor = model.adapter, model.processor
    if processor is None:
        raise InputError("this model has no processor; load one with nav.load(..., processor=...)")
    content: list[dict[str, Any]] = []
    if request.video is not None:
        content.append({"type": "video"})
    if request.audio is not None and not request.use_audio_in_video:
        content.append({"type": "audio"})
    content += [{"type": "image"} for _ in request.images]
    if request.text:
        content.append({"type": "text", "text": request.text})
    conversation = []
    if request.system:
        conversation.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    conversation.append({"role": "user", "content": content})
    prompt_text = model.render_chat(conversation)

    kwargs: dict[str, Any] = dict(model.processor_kwargs)
    if request.video is not None:
        kwargs.update(videos=[request.video], fps=request.fps, do_sample_frames=False)
        kwargs.update(_video_pixel_cap(processor, kwargs))
    if request.audio is not None:
        kwargs["audio"] = [request.audio]
    if request.images:
        kwargs["images"] = request.images
    try:
        data = dict(processor(text=prompt_text, return_tensors="pt", use_audio_in_video=request.use_audio_in_video,
                              **kwargs))
    except (ValueError, RuntimeError, IndexError) as error:
        raise MediaError(f"the processor rejected these inputs: {error}") from error
    data["use_audio_in_video"] = request.use_audio_in_video
    if "video_second_per_grid" in data:
        data["video_second_per_grid"] = torch.as_tensor(data["video_second_per_grid"], dtype=torch.float32)
    spans = adapter.spans(data["input_ids"][0].tolist(), data)
    # Rope positions never change for a prepared input: computed here once, passed to every forward.
    rope = adapter.position_ids(data)
    if rope is not None:
        data["position_ids"] = rope[0]
    # So are the encoders' index tensors: no forward has to read them off the device.
    return AVInputs(data=data, spans=spans, request=request, prompt_text=prompt_text, adapter=adapter.name,
                    plan=adapter.forward_plan(data))
