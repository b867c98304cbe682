"""Decoding audio, video and images into the arrays a processor takes.

PyAV (FFmpeg) decodes every container and codec; soxr resamples arrays given at
another rate. Audio always comes out as float32 mono at the requested rate
(16 kHz for Whisper-style encoders); video as uint8 frames ``[T, H, W, 3]``
sampled at a fixed frame rate (2 fps for Qwen-Omni).
"""

from __future__ import annotations

import numbers
import os
import stat
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from jaxtyping import Float, UInt8

from .errors import MediaError, MissingAudioError

PathLike = Union[str, os.PathLike]

__all__ = ["Video", "load_audio", "load_video", "load_image", "video_has_audio"]


@dataclass
class Video:
    """Decoded frames sampled at ``fps``, with the clip's duration in seconds."""

    frames: UInt8[np.ndarray, "frames height width 3"]
    fps: float
    duration: float
    path: str | None = None


def _open(path: PathLike):
    import av

    path = str(path)
    _check_regular_file(path, "media")
    try:
        return av.open(path)
    except Exception as error:  # PyAV raises several FFmpeg error types
        raise MediaError(f"cannot decode {path!r}: {error}") from None


def _check_regular_file(path: str, what: str) -> None:
    """Refuse a missing path, a folder, a FIFO or a device at once (decoding a FIFO blocks for ever)."""
    if not os.path.exists(path):
        raise MediaError(f"{what} file not found: {path!r}")
    if not os.path.isfile(path):
        kind = "a folder" if os.path.isdir(path) else "a FIFO" if stat.S_ISFIFO(os.stat(path).st_mode) else \
            "not a regular file"
        raise MediaError(f"{what} path {path!r} is {kind}; give a regular file")


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
    Integer PCM (int16, int32, uint8) is rescaled to [-1, 1]; float samples are taken as
    they are. NaN or infinite samples are a `MediaError`. A file's audio is cut to the
    stream's declared duration, dropping the codec's end padding (AAC pads its last frame).

    >>> import numpy as np
    >>> load_audio(np.ones(8000, dtype=np.float32), source_rate=8000).shape
    (16000,)
    >>> float(load_audio(np.array([-32768, 16384], dtype=np.int16)).max())
    0.5
    """
    if isinstance(source, (str, os.PathLike)):
        return _finite_audio(_decode_audio_file(source, sampling_rate), repr(str(source)))
    array = _pcm_to_float(np.asarray(source.detach().cpu() if hasattr(source, "detach") else source))
    if array.ndim == 2:
        array = array.mean(axis=0 if array.shape[0] < array.shape[1] else 1)
    if array.ndim != 1:
        raise MediaError(f"audio array must be 1-D (samples) or 2-D (channels, samples), got shape {array.shape}")
    if array.size == 0:
        raise MediaError("audio array is empty")
    _finite_audio(array, "the audio array")
    if source_rate is not None and source_rate != sampling_rate:
        import soxr

        array = soxr.resample(array, source_rate, sampling_rate).astype(np.float32)
    return array


def _pcm_to_float(array: np.ndarray) -> np.ndarray:
    """float32 samples; integer PCM scaled by its full range (int16 / 32768, uint8 centred on 128)."""
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise MediaError(f"audio samples must be real numbers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.unsignedinteger):
        half = float(np.iinfo(array.dtype).max // 2 + 1)
        return ((array.astype(np.float64) - half) / half).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return (array.astype(np.float64) / float(-np.iinfo(array.dtype).min)).astype(np.float32)
    return array.astype(np.float32, copy=False)


def _finite_audio(array: np.ndarray, what: str) -> np.ndarray:
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - finite.sum())
        raise MediaError(f"{what} has {bad} NaN or infinite samples of {array.size}"
                         f"{' (all of them)' if bad == array.size else ''}")
    return array


def _decode_audio_file(path: PathLike, sampling_rate: int) -> np.ndarray:
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise MissingAudioError(
                f"{str(path)!r} has no audio track; pass audio= explicitly or use use_audio_in_video=False"
            )
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        chunks, first = [], None
        try:
            for frame in container.decode(audio=0):
                if first is None and frame.pts is not None and frame.time_base is not None:
                    first = float(frame.pts * frame.time_base)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except Exception as error:
            raise MediaError(f"cannot decode the audio of {str(path)!r}: {error}") from None
    if not chunks:
        raise MediaError(f"{str(path)!r} has an audio track with no samples")
    return _trim_padding(np.concatenate(chunks).astype(np.float32), stream, first, sampling_rate)


def _trim_padding(samples: np.ndarray, stream: Any, first: float | None, sampling_rate: int) -> np.ndarray:
    """Cut decoded audio to the stream's declared end.

    An AAC encoder pads its last frame to a full 1024 samples, and FFmpeg does not drop that
    padding when it demuxes an mp4 (it does drop the start priming): a 4 s clip decodes to
    4.032 s and gains an audio token. The declared duration (mp4 edit list / ``mdhd``) is the
    real one. Only an excess of at most two codec frames is cut, since some containers (mp3
    without a header, say) only estimate their duration.
    """
    if stream.duration is None or stream.time_base is None:
        return samples
    end = float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    keep = int(round((end - (first or 0.0)) * sampling_rate))
    frame = stream.codec_context.frame_size or 1024
    limit = int(np.ceil(2 * frame * sampling_rate / (stream.sample_rate or sampling_rate)))
    if 0 < keep < len(samples) <= keep + limit:
        return samples[:keep]
    return samples


def load_video(source: PathLike | np.ndarray | Any, fps: float = 2.0, max_frames: int | None = None) -> Video:
    """Decode a video file (or wrap frames) and sample it at ``fps``.

    Frames are taken at ``t = k / fps`` (nearest decoded frame), so a 10 s clip
    at 2 fps gives 20 frames. Only the sampled frames are converted and kept: memory
    grows with the frames kept, not with the clip's frame rate or length. Arrays
    ``[T, H, W, 3]`` or lists of PIL images are taken as already sampled at ``fps``:
    uint8 (or other integers) in 0..255, floats in [0, 1] (scaled by 255); other
    values, NaN or infinities are a `MediaError`.

    >>> import numpy as np
    >>> load_video(np.full((2, 4, 4, 3), 0.5, dtype=np.float32)).frames[0, 0, 0].tolist()
    [128, 128, 128]
    """
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not np.isfinite(fps) or fps <= 0:
        raise MediaError(f"fps must be a positive number, got {fps!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, numbers.Integral)
                                   or max_frames < 1):
        raise MediaError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    if not isinstance(source, (str, os.PathLike)):
        frames = _frames_from_arrays(source)
        return Video(frames=frames, fps=fps, duration=len(frames) / fps)
    with _open(source) as container:
        if not container.streams.video:
            raise MediaError(f"{str(source)!r} has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 25)
        sampler = _NearestSampler(fps, max_frames)
        try:
            for index, frame in enumerate(container.decode(video=0)):
                time = float(frame.pts * stream.time_base) if frame.pts is not None else index / rate
                sampler.push(time, frame)
        except Exception as error:
            raise MediaError(f"cannot decode the video of {str(source)!r}: {error}") from None
    if sampler.last is None:
        raise MediaError(f"{str(source)!r} has a video stream with no frames")
    duration = max(sampler.last[0] - sampler.start + 1.0 / rate, 1.0 / rate)
    count = max(1, int(np.floor(duration * fps + 1e-6)))
    if max_frames is not None:
        count = min(count, max_frames)
    return Video(frames=np.stack(sampler.finish(count)), fps=fps, duration=duration, path=str(source))


class _NearestSampler:
    """For targets ``k / fps`` after the first frame, the nearest decoded frame (ties: the earlier one).

    Frames arrive in presentation order; each target is settled once a frame at or after it
    arrives, so only the previous frame (undecoded to RGB) and the chosen ones are held.
    """

    def __init__(self, fps: float, limit: int | None = None) -> None:
        self.fps, self.limit = fps, limit if limit is not None else float("inf")
        self.start: float = 0.0
        self.last: tuple[float, Any] | None = None
        self.kept: list[np.ndarray] = []
        self._rgb: tuple[int, np.ndarray] | None = None  # the last frame converted, for repeats
        self._count = 0

    def _target(self) -> float:
        return self.start + len(self.kept) / self.fps

    def _keep(self, index: int, frame: Any) -> None:
        if self._rgb is None or self._rgb[0] != index:
            self._rgb = (index, frame.to_ndarray(format="rgb24"))
        self.kept.append(self._rgb[1])

    def push(self, time: float, frame: Any) -> None:
        if self.last is None:
            self.start = time
        index = self._count
        self._count += 1
        while len(self.kept) < self.limit and time >= self._target():
            target = self._target()
            if self.last is not None and abs(self.last[0] - target) <= abs(time - target):
                self._keep(index - 1, self.last[1])
            else:
                self._keep(index, frame)
        self.last = (time, frame)

    def finish(self, count: int) -> list[np.ndarray]:
        """The first ``count`` picks; targets after the last frame take the last frame."""
        while len(self.kept) < min(count, self.limit):
            self._keep(self._count - 1, self.last[1])
        return self.kept[:count]


def _frames_from_arrays(source: Any) -> np.ndarray:
    if hasattr(source, "detach"):
        source = source.detach().cpu().numpy()
    if isinstance(source, (list, tuple)):
        source = np.stack([np.asarray(frame.convert("RGB") if hasattr(frame, "convert") else frame) for frame in source])
    frames = np.asarray(source)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"video frames must have shape [time, height, width, 3], got {frames.shape}")
    if frames.size == 0:
        raise MediaError(f"video frames are empty (shape {frames.shape})")
    if frames.dtype == np.uint8:
        return frames
    if frames.dtype == np.bool_ or not np.issubdtype(frames.dtype, np.number) or np.iscomplexobj(frames):
        raise MediaError(f"video frames must be uint8 (0..255) or float (0..1), got dtype {frames.dtype}")
    low, high = float(frames.min()), float(frames.max())
    if np.issubdtype(frames.dtype, np.floating):
        if not np.isfinite(frames).all():
            bad = int(frames.size - np.isfinite(frames).sum())
            raise MediaError(f"video frames hold {bad} NaN or infinite values of {frames.size}")
        if low < 0 or high > 1:
            raise MediaError(f"float video frames must be in [0, 1] (they are scaled by 255), got values in "
                             f"[{low:g}, {high:g}]; pass uint8 frames for 0..255")
        return np.round(frames * 255.0).astype(np.uint8)
    if low < 0 or high > 255:
        raise MediaError(f"integer video frames must be in 0..255, got values in [{low:g}, {high:g}]")
    return frames.astype(np.uint8)


def load_image(source: PathLike | np.ndarray | Any):
    """Open an image file (or pass a PIL image / array through) as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        _check_regular_file(str(source), "image")
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
