"""The toy audio-visual world: entities with a look (colour + shape) and a sound.

Ten entities, each a coloured shape that moves over a dark background while its
sound plays. The table is built so the unimodal-dominance framework has something
to find:

* ``bell``/``horn`` and ``bird``/``frog`` look identical (same colour and shape):
  only the sound tells them apart (``identified_by == "audio"``);
* ``drum``/``box`` and ``car``/``fan`` sound identical (same sound kind): only the
  look tells them apart (``identified_by == "video"``);
* ``clock`` and ``phone`` are unique in both (``identified_by == "both"``).

Every look has its own colour (and a shape), so a look can be told from the others
by colour alone; the shapes matter for captions and for the grey distractor.

A clip is rendered from two independent random streams, one for the picture and
one for the sound, both derived from the clip's seed; so two entities that share a
look give *bit-identical* frames for the same seed, and two that share a sound give
bit-identical audio. Half of the clips also show a static grey *distractor* shape,
which makes no sound (captions must mention it; the class question must ignore it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from jaxtyping import Float, UInt8

from ..errors import InputError

__all__ = ["Entity", "ENTITIES", "ENTITY_NAMES", "COLOURS", "SHAPES", "SOUNDS", "DISTRACTOR_COLOUR", "entity",
           "render_frames", "render_audio", "SECONDS", "FPS", "FRAME_SIZE", "SAMPLE_RATE"]

#: Clip length in seconds: two 2-second Omni chunks, so later video tokens can attend to earlier audio.
SECONDS = 4.0
#: Frames per second of the arrays the generator returns (the Omni sampling rate).
FPS = 2.0
#: Frame side in pixels: 112 px = 8x8 patches of 14 px = 16 merged video tokens per temporal patch.
FRAME_SIZE = 112
#: Audio sampling rate (the Whisper feature extractor's).
SAMPLE_RATE = 16000

#: One colour per look: a tiny vision encoder learns colour in a few hundred steps, shape much later
#: (shape is still drawn, named in captions, and needed for the grey distractor).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 40), "orange": (240, 140, 30), "yellow": (235, 210, 45), "green": (45, 195, 70),
    "cyan": (40, 200, 210), "blue": (55, 95, 235), "purple": (150, 60, 210), "pink": (240, 110, 180),
}
DISTRACTOR_COLOUR = ("grey", (150, 150, 150))
SHAPES = ("circle", "square", "triangle", "diamond", "cross")


@dataclass(frozen=True)
class Entity:
    """One class of the toy world: its name, its look and its sound kind."""

    name: str
    colour: str
    shape: str
    sound: str
    identified_by: str  # "audio", "video" or "both": which modality alone tells it from every other entity


ENTITIES: tuple[Entity, ...] = (
    Entity("bell", "yellow", "triangle", "ring", "audio"),
    Entity("horn", "yellow", "triangle", "honk", "audio"),
    Entity("bird", "green", "diamond", "chirp", "audio"),
    Entity("frog", "green", "diamond", "croak", "audio"),
    Entity("drum", "blue", "square", "thump", "video"),
    Entity("box", "orange", "circle", "thump", "video"),
    Entity("car", "red", "cross", "hum", "video"),
    Entity("fan", "purple", "square", "hum", "video"),
    Entity("clock", "cyan", "circle", "tick", "both"),
    Entity("phone", "pink", "square", "beep", "both"),
)
ENTITY_NAMES: tuple[str, ...] = tuple(e.name for e in ENTITIES)


def entity(name: str) -> Entity:
    """The entity called ``name``; `InputError` listing the valid names otherwise.

    >>> entity("bell").shape
    'triangle'
    """
    for item in ENTITIES:
        if item.name == name:
            return item
    raise InputError(f"unknown toy entity {name!r}; the toy world has {list(ENTITY_NAMES)}")


# -- pictures ------------------------------------------------------------------------------------------------


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean ``[size, size]`` mask of ``shape`` centred at (cx, cy) with half-extent ``radius``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        side = 0.85 * radius
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * radius
    if shape == "cross":
        arm = radius / 3.0
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    if shape == "triangle":
        # Apex up: inside when below the two slanted edges and above the base.
        top, base = cy - radius, cy + 0.8 * radius
        half_width = (dy + radius) * (radius / (1.8 * radius)) * 1.15
        return (y >= top) & (y <= base) & (np.abs(dx) <= half_width)
    raise InputError(f"unknown toy shape {shape!r}; shapes are {list(SHAPES)}")


def render_frames(
    colour: str,
    shape: str,
    rng: np.random.Generator,
    distractor: str | None = None,
    seconds: float = SECONDS,
    fps: float = FPS,
    size: int = FRAME_SIZE,
) -> UInt8[np.ndarray, "frames height width 3"]:
    """Frames of one coloured ``shape`` moving (bouncing) over a dark background.

    All randomness (background tint, colour jitter, size, start, velocity, the
    distractor's place) is drawn from ``rng`` in a fixed order that does not depend
    on the colour or shape, so two looks rendered with equal generators move alike.
    Positions are a function of continuous time, so frames at 8 fps contain the
    frames at 2 fps.
    """
    if colour not in COLOURS:
        raise InputError(f"unknown toy colour {colour!r}; colours are {list(COLOURS)}")
    background = rng.uniform(8, 45, size=3)
    jitter = rng.uniform(-15, 15, size=3)
    radius = rng.uniform(0.11, 0.16) * size
    start = rng.uniform(radius, size - radius, size=2)
    speed = rng.uniform(0.08, 0.16) * size  # pixels per second
    angle = rng.uniform(0, 2 * np.pi)
    velocity = speed * np.array([np.cos(angle), np.sin(angle)])
    d_radius = rng.uniform(0.12, 0.15) * size
    d_centre = rng.uniform(d_radius, size - d_radius, size=2)
    d_jitter = rng.uniform(-10, 10)
    count = int(round(seconds * fps))
    frames = np.empty((count, size, size, 3), dtype=np.uint8)
    rgb = np.clip(np.asarray(COLOURS[colour], dtype=np.float32) + jitter, 0, 255)
    grey = np.clip(np.asarray(DISTRACTOR_COLOUR[1], dtype=np.float32) + d_jitter, 0, 255)
    low, high = radius, size - radius
    for k in range(count):
        t = k / fps
        centre = []
        for axis in range(2):
            # Bounce: reflect the unconstrained path into [low, high].
            span = high - low
            position = (start[axis] - low + velocity[axis] * t) % (2 * span)
            centre.append(low + (position if position <= span else 2 * span - position))
        image = np.empty((size, size, 3), dtype=np.float32)
        image[:] = background
        if distractor is not None:
            image[shape_mask(distractor, size, d_centre[0], d_centre[1], d_radius)] = grey
        image[shape_mask(shape, size, centre[0], centre[1], radius)] = rgb
        frames[k] = image.astype(np.uint8)
    return frames


# -- sounds ----------------------------------------------------------------------------------------------------


def _onsets(rng: np.random.Generator, period: float, seconds: float) -> np.ndarray:
    phase = rng.uniform(0, period)
    times = np.arange(phase - period, seconds, period)
    return times + rng.uniform(-0.04, 0.04, size=len(times)) * period


def _ring(t, rng, seconds):
    f0 = 1100 * rng.uniform(0.95, 1.05)
    out = np.zeros_like(t)
    for t0 in _onsets(rng, 0.5, seconds):
        local = t - t0
        on = local >= 0
        envelope = np.exp(-np.where(on, local, 0) / 0.18) * on
        for ratio, amp in ((1.0, 1.0), (2.0, 0.5), (2.76, 0.35)):
            out += amp * envelope * np.sin(2 * np.pi * ratio * f0 * local)
    return out


def _honk(t, rng, seconds):
    f0 = 260 * rng.uniform(0.95, 1.05)
    phase = rng.uniform(0, 0.75)
    gate = ((t + phase) % 0.75) < 0.5
    tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 9))
    return tone * gate


def _chirp(t, rng, seconds):
    lo, hi = 2200 * rng.uniform(0.95, 1.05), 3600 * rng.uniform(0.95, 1.05)
    out = np.zeros_like(t)
    length = 0.09
    for t0 in _onsets(rng, 0.3, seconds):
        local = t - t0
        on = (local >= 0) & (local < length)
        u = np.clip(local / length, 0, 1)
        # Exponential sweep: phase is the integral of the instantaneous frequency.
        ratio = hi / lo
        phase = 2 * np.pi * lo * length * (ratio ** u - 1) / np.log(ratio)
        out += on * np.sin(phase) * np.sin(np.pi * u) ** 2
    return out


def _croak(t, rng, seconds):
    f0 = 120 * rng.uniform(0.95, 1.05)
    phase = rng.uniform(0, 0.8)
    gate = ((t + phase) % 0.8) < 0.35
    tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))
    return tone * np.abs(np.sin(2 * np.pi * 15 * t)) * gate


def _thump(t, rng, seconds):
    f0 = 70 * rng.uniform(0.95, 1.05)
    out = np.zeros_like(t)
    noise = rng.standard_normal(len(t))
    smooth = np.convolve(noise, np.ones(8) / 8, mode="same")  # low-passed noise for the skin's slap
    for t0 in _onsets(rng, 0.5, seconds):
        local = t - t0
        on = local >= 0
        safe = np.where(on, local, 0)
        out += on * (np.exp(-safe / 0.09) * np.sin(2 * np.pi * f0 * local) + 0.6 * np.exp(-safe / 0.02) * smooth)
    return out


def _hum(t, rng, seconds):
    f0 = 100 * rng.uniform(0.95, 1.05)
    vibrato = 0.004 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * f0 * (t + np.cumsum(vibrato) / SAMPLE_RATE)
    return sum(np.sin(k * phase) / k for k in range(1, 7)) + 0.1 * rng.standard_normal(len(t))


def _tick(t, rng, seconds):
    f0 = 3000 * rng.uniform(0.95, 1.05)
    out = np.zeros_like(t)
    noise = rng.standard_normal(len(t))
    for t0 in _onsets(rng, 0.5, seconds):
        local = t - t0
        on = local >= 0
        envelope = on * np.exp(-np.where(on, local, 0) / 0.008)
        out += envelope * (np.sin(2 * np.pi * f0 * local) + 0.5 * noise)
    return out


def _beep(t, rng, seconds):
    f0 = 880 * rng.uniform(0.95, 1.05)
    phase = rng.uniform(0, 0.3)
    gate = ((t + phase) % 0.3) < 0.15
    return np.sin(2 * np.pi * f0 * t) * gate


SOUNDS: dict[str, Callable[[np.ndarray, np.random.Generator, float], np.ndarray]] = {
    "ring": _ring, "honk": _honk, "chirp": _chirp, "croak": _croak, "thump": _thump, "hum": _hum,
    "tick": _tick, "beep": _beep,
}


def render_audio(
    sound: str,
    rng: np.random.Generator,
    seconds: float = SECONDS,
    rate: int = SAMPLE_RATE,
) -> Float[np.ndarray, "samples"]:
    """Mono float32 audio of one ``sound`` kind with jittered pitch, rhythm phase, level and noise floor.

    >>> wave = render_audio("beep", np.random.default_rng(0))
    >>> wave.shape, wave.dtype
    ((64000,), dtype('float32'))
    """
    if sound not in SOUNDS:
        raise InputError(f"unknown toy sound {sound!r}; sounds are {list(SOUNDS)}")
    t = np.arange(int(round(seconds * rate)), dtype=np.float64) / rate
    level = rng.uniform(0.25, 0.6)
    noise_level = rng.uniform(0.002, 0.015)
    noise_seed = int(rng.integers(2**31))
    wave = SOUNDS[sound](t, rng, seconds)
    wave = level * wave / (np.max(np.abs(wave)) + 1e-9)
    wave = wave + noise_level * np.random.default_rng(noise_seed).standard_normal(len(t))
    return np.clip(wave, -1, 1).astype(np.float32)
