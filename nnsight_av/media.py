"""Decoding audio, video and images into the arrays a processor takes.

PyAV (FFmpeg) decodes every container and codec; soxr resamples arrays given at
another rate. Audio always comes out as float32 mono at the requested rate
(16 kHz for Whisper-style encoders); video as uint8 frames ``[T, H, W, 3]``
sampled at a fixed frame rate (2 fps for Qwen-Omni).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from jaxtyping import Float, UInt8

from .errors import MediaError, MissingAudioError

PathLike = Union[str, os.PathLike]

__all__ = ["Video", "load_audio", "load_video", "load_image", "video_has_audio"]


@dataclass
class Video:
    """Decoded frames sampled at ``fps``, with the clip's duration in seconds."""

    frames: UInt8[np.ndarray, "time height width 3"]
    fps: float
    duration: float
    path: str | None = None


def _open(path: PathLike):
    import av

    path = str(path)
    if not Path(path).exists():
        raise MediaError(f"media file not found: {path!r}")
    try:
        return av.open(path)
    except Exception as error:  # PyAV raises several FFmpeg error types
        raise MediaError(f"cannot decode {path!r}: {error}") from None


def video_has_audio(path: PathLike) -> bool:
    """Whether the container at ``path`` holds an audio stream."""
    with _open(path) as container:
        return len(container.streams.audio) > 0


def load_audio(
    source: PathLike | np.ndarray | Any,
    sampling_rate: int = 16000,
    source_rate: int | None = None,
) -> Float[np.ndarray, "samples"]:
    """Decode ``source`` to float32 mono at ``sampling_rate``.

    ``source`` is a file path (wav, mp3, flac, or a video's audio track), or an
    array/tensor of samples at ``source_rate`` (default: already at
    ``sampling_rate``). Multi-channel arrays ``[channels, samples]`` are averaged.

    >>> import numpy as np
    >>> load_audio(np.ones(8000, dtype=np.float32), source_rate=8000).shape
    (16000,)
    """
    if isinstance(source, (str, os.PathLike)):
        return _decode_audio_file(source, sampling_rate)
    array = np.asarray(source.detach().cpu() if hasattr(source, "detach") else source, dtype=np.float32)
    if array.ndim == 2:
        array = array.mean(axis=0 if array.shape[0] < array.shape[1] else 1)
    if array.ndim != 1:
        raise MediaError(f"audio array must be 1-D (samples) or 2-D (channels, samples), got shape {array.shape}")
    if array.size == 0:
        raise MediaError("audio array is empty")
    if source_rate is not None and source_rate != sampling_rate:
        import soxr

        array = soxr.resample(array, source_rate, sampling_rate).astype(np.float32)
    return array


def _decode_audio_file(path: PathLike, sampling_rate: int) -> np.ndarray:
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise MissingAudioError(
                f"{str(path)!r} has no audio track; pass audio= explicitly or use use_audio_in_video=False"
            )
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        chunks = []
        try:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except Exception as error:
            raise MediaError(f"cannot decode the audio of {str(path)!r}: {error}") from None
    if not chunks:
        raise MediaError(f"{str(path)!r} has an audio track with no samples")
    return np.concatenate(chunks).astype(np.float32)


def load_video(source: PathLike | np.ndarray | Any, fps: float = 2.0, max_frames: int | None = None) -> Video:
    """Decode a video file (or wrap frames) and sample it at ``fps``.

    Frames are taken at ``t = k / fps`` (nearest decoded frame), so a 10 s clip
    at 2 fps gives 20 frames. Arrays ``[T, H, W, 3]`` (uint8) or lists of PIL
    images are taken as already sampled at ``fps``.
    """
    if not isinstance(source, (str, os.PathLike)):
        frames = _frames_from_arrays(source)
        return Video(frames=frames, fps=fps, duration=len(frames) / fps)
    with _open(source) as container:
        if not container.streams.video:
            raise MediaError(f"{str(source)!r} has no video stream")
        stream = container.streams.video[0]
        decoded, times = [], []
        try:
            for frame in container.decode(video=0):
                decoded.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.pts * stream.time_base) if frame.pts is not None else len(times) / float(stream.average_rate or 25))
        except Exception as error:
            raise MediaError(f"cannot decode the video of {str(source)!r}: {error}") from None
    if not decoded:
        raise MediaError(f"{str(source)!r} has a video stream with no frames")
    rate = float(stream.average_rate or 25)
    duration = max(times[-1] - times[0] + 1.0 / rate, 1.0 / rate)
    count = max(1, int(np.floor(duration * fps + 1e-6)))
    if max_frames is not None:
        count = min(count, max_frames)
    times_array = np.asarray(times) - times[0]
    picks = [int(np.argmin(np.abs(times_array - k / fps))) for k in range(count)]
    return Video(frames=np.stack([decoded[i] for i in picks]), fps=fps, duration=duration, path=str(source))


def _frames_from_arrays(source: Any) -> np.ndarray:
    if hasattr(source, "detach"):
        source = source.detach().cpu().numpy()
    if isinstance(source, (list, tuple)):
        source = np.stack([np.asarray(frame.convert("RGB") if hasattr(frame, "convert") else frame) for frame in source])
    frames = np.asarray(source)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"video frames must have shape [time, height, width, 3], got {frames.shape}")
    if frames.dtype != np.uint8:
        frames = np.clip(frames, 0, 255).astype(np.uint8)
    return frames


def load_image(source: PathLike | np.ndarray | Any):
    """Open an image file (or pass a PIL image / array through) as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():
            raise MediaError(f"image file not found: {str(source)!r}")
        try:
            return Image.open(source).convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise MediaError(f"cannot decode image {str(source)!r}: {error}") from None
    if hasattr(source, "convert"):
        return source.convert("RGB")
    array = np.asarray(source.detach().cpu() if hasattr(source, "detach") else source)
    if array.ndim != 3:
        raise MediaError(f"image array must have shape [height, width, 3], got {array.shape}")
    return Image.fromarray(array.astype(np.uint8))
