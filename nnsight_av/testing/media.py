"""Synthetic media files for tests and docs: an mp4 with an audio track, a wav, a png."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_frames(seconds: float = 4.0, fps: int = 8, size: int = 64, seed: int = 0) -> np.ndarray:
    """A moving coloured square on a dark background, uint8 ``[T, size, size, 3]``."""
    rng = np.random.default_rng(seed)
    count = int(round(seconds * fps))
    colour = rng.integers(80, 255, size=3)
    frames = np.zeros((count, size, size, 3), dtype=np.uint8)
    side = size // 4
    for t in range(count):
        x = int((size - side) * t / max(count - 1, 1))
        frames[t, size // 3: size // 3 + side, x: x + side] = colour
    return frames


def synthetic_tone(seconds: float = 4.0, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_mp4(path: str | Path, seconds: float = 4.0, fps: int = 8, size: int = 64, with_audio: bool = True,
              freq: float = 440.0, seed: int = 0, frames: np.ndarray | None = None,
              audio: np.ndarray | None = None, audio_rate: int = 16000) -> Path:
    """Write an H.264/AAC mp4 (PyAV) with a moving square and, optionally, a sine tone."""
    import av

    path = Path(path)
    frames = synthetic_frames(seconds, fps, size, seed) if frames is None else frames
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        stream_audio = None
        if with_audio:
            stream_audio = container.add_stream("aac", rate=audio_rate)
            stream_audio.layout = "mono"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if stream_audio is not None:
            samples = synthetic_tone(seconds, audio_rate, freq) if audio is None else audio.astype(np.float32)
            step = 1024
            for start in range(0, len(samples), step):
                block = samples[start:start + step].reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(block, format="flt", layout="mono")
                frame.sample_rate = audio_rate
                frame.pts = start
                for packet in stream_audio.encode(frame):
                    container.mux(packet)
            for packet in stream_audio.encode():
                container.mux(packet)
    return path


def write_wav(path: str | Path, seconds: float = 2.0, rate: int = 16000, freq: float = 440.0) -> Path:
    import soundfile

    path = Path(path)
    soundfile.write(str(path), synthetic_tone(seconds, rate, freq), rate)
    return path


def write_png(path: str | Path, size: int = 64, seed: int = 0) -> Path:
    from PIL import Image

    path = Path(path)
    Image.fromarray(synthetic_frames(1.0, 1, size, seed)[0]).save(path)
    return path
