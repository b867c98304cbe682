"""Toy clips and prompts: records for the multiple-choice and caption tasks, JSONL + media files.

>>> records = make_dataset(4, seed=0, task="mc")
>>> [r.task for r in records], records[0].frames.shape, records[0].audio.shape
(['mc', 'mc', 'mc', 'mc'], (8, 112, 112, 3), (64000,))
>>> records[0].answer == LETTERS[ENTITY_NAMES.index(records[0].entity)]
True
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from jaxtyping import Float, UInt8

from ..errors import InputError, MediaError
from .world import (DISTRACTOR_COLOUR, ENTITIES, ENTITY_NAMES, FPS, FRAME_SIZE, SAMPLE_RATE, SECONDS, SHAPES,
                    entity as get_entity, render_audio, render_frames)

if TYPE_CHECKING:
    from ..inputs import AVInputs
    from ..model import AVModel

__all__ = ["ToyRecord", "make_clip", "make_dataset", "write_dataset", "read_dataset", "mc_prompt", "CAPTION_PROMPT",
           "MC_QUESTION", "LETTERS", "caption_for", "caption_objects", "parse_caption", "OBJECT_WORDS", "TASKS",
           "clip_seed"]

TASKS = ("mc", "caption")
LETTERS = tuple("ABCDEFGHIJKLMNOPQRST")
MC_QUESTION = "What is making the sound?"
MC_INSTRUCTION = "Respond with one letter."
CAPTION_PROMPT = "Describe what you see and hear in a single sentence."
#: Nouns CHAIR counts as objects: the shapes one can see and the entities one can hear.
OBJECT_WORDS = frozenset(SHAPES) | frozenset(ENTITY_NAMES)


def mc_prompt(options: Sequence[str] = ENTITY_NAMES) -> str:
    """The multiple-choice prompt: the question, one lettered option per line, the instruction.

    >>> print(mc_prompt(["bell", "horn"]))
    What is making the sound?
    A. bell
    B. horn
    Respond with one letter.
    """
    if not 2 <= len(options) <= len(LETTERS):
        raise InputError(f"a multiple-choice prompt needs 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [MC_QUESTION] + [f"{LETTERS[i]}. {name}" for i, name in enumerate(options)] + [MC_INSTRUCTION]
    return "\n".join(lines)


def caption_for(colour: str, shape: str, entity: str, distractor: str | None = None) -> str:
    """The reference caption: what is seen (the moving shape, then the grey one) and what is heard.

    >>> caption_for("yellow", "triangle", "bell", "circle")
    'I see a yellow triangle and a grey circle and hear a bell.'
    """
    seen = f"a {colour} {shape}" + (f" and a {DISTRACTOR_COLOUR[0]} {distractor}" if distractor else "")
    return f"I see {seen} and hear a {entity}."


def caption_objects(text: str) -> list[str]:
    """The object nouns (shapes and entities) a caption mentions, in order, repeats kept.

    >>> caption_objects("I see a red circle and a grey circle and hear a box.")
    ['circle', 'circle', 'box']
    """
    return [word for word in re.findall(r"[a-z]+", text.lower()) if word in OBJECT_WORDS]


def parse_caption(text: str) -> dict[str, list]:
    """Split a caption into ``seen`` ((colour, shape) pairs, in order) and ``heard`` (entities).

    Words after "hear" count as heard; a shape word takes the colour word just before it, if any.

    >>> parse_caption("I see a yellow triangle and hear a bell.")
    {'seen': [('yellow', 'triangle')], 'heard': ['bell']}
    """
    words = re.findall(r"[a-z]+", text.lower())
    colours = {e.colour for e in ENTITIES} | {DISTRACTOR_COLOUR[0]}
    seen: list[tuple[str | None, str]] = []
    heard: list[str] = []
    hearing = False
    for i, word in enumerate(words):
        if word == "hear":
            hearing = True
        elif hearing and word in ENTITY_NAMES:
            heard.append(word)
        elif not hearing and word in SHAPES:
            seen.append((words[i - 1] if i and words[i - 1] in colours else None, word))
    return {"seen": seen, "heard": heard}


def clip_seed(seed: int, index: int) -> int:
    """The seed of clip ``index`` of a data set drawn with ``seed`` (independent streams per clip)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


@dataclass
class ToyRecord:
    """One toy clip with one prompt about it.

    Media are held as arrays (``frames`` uint8 ``[T, H, W, 3]`` at ``fps``; ``audio``
    float32 mono at ``sample_rate``) and/or as files (``video_path`` mp4 with an audio
    track, ``audio_path`` wav). ``answer`` is the letter of ``entity`` among ``options``;
    ``caption`` the reference caption; ``objects`` the ground-truth object nouns (CHAIR).
    """

    id: str
    task: str
    seed: int
    entity: str
    colour: str
    shape: str
    sound: str
    identified_by: str
    distractor: str | None
    prompt: str
    options: list[str]
    answer: str
    caption: str
    objects: list[str]
    fps: float = FPS
    sample_rate: int = SAMPLE_RATE
    video_path: str | None = None
    audio_path: str | None = None
    frames: UInt8[np.ndarray, "frames height width 3"] | None = field(default=None, repr=False)
    audio: Float[np.ndarray, "samples"] | None = field(default=None, repr=False)

    @property
    def label(self) -> int:
        """Index of the answer among the options."""
        return self.options.index(self.entity) if self.options else ENTITY_NAMES.index(self.entity)

    def media(self) -> tuple[np.ndarray, np.ndarray]:
        """``(frames, audio)`` as arrays, decoding the files when the arrays are not held."""
        from ..media import load_audio, load_video

        frames = self.frames
        if frames is None:
            if self.video_path is None:
                raise MediaError(f"toy record {self.id!r} holds neither frames nor a video path")
            frames = load_video(self.video_path, fps=self.fps).frames
        audio = self.audio
        if audio is None:
            source = self.audio_path or self.video_path
            if source is None:
                raise MediaError(f"toy record {self.id!r} holds neither audio nor an audio/video path")
            audio = load_audio(source, self.sample_rate)
        return frames, audio

    def prepare(self, model: "AVModel", ablate: str | None = None, **kwargs: Any) -> "AVInputs":
        """``model.prepare`` on this clip and prompt; ``ablate="video"`` blacks the frames out,
        ``ablate="audio"`` silences the audio (same shapes, so token positions are unchanged)."""
        frames, audio = self.media()
        if ablate == "video":
            frames = np.zeros_like(frames)
        elif ablate == "audio":
            audio = np.zeros_like(audio)
        elif ablate is not None:
            raise InputError(f"ablate must be None, 'video' or 'audio', got {ablate!r}")
        return model.prepare(video=frames, audio=audio, text=self.prompt, fps=self.fps, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (arrays left out; media are referenced by path)."""
        out = asdict(self)
        out.pop("frames")
        out.pop("audio")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToyRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def make_clip(
    entity: str,
    seed: int,
    distractor: str | None | bool = True,
    seconds: float = SECONDS,
    fps: float = FPS,
    size: int = FRAME_SIZE,
    rate: int = SAMPLE_RATE,
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Render one clip of ``entity``: ``(frames, audio, distractor_shape)``.

    ``distractor=True`` lets the seed decide (half the clips show one), ``False``/``None``
    never shows one, a shape name always shows that shape. The picture depends only on
    the entity's look and the seed, the sound only on its sound kind and the seed.
    """
    item = get_entity(entity)
    layout = np.random.default_rng([seed, 2])
    drawn = SHAPES[int(layout.integers(len(SHAPES)))] if layout.random() < 0.5 else None
    if distractor is True:
        distractor = drawn
    elif distractor is False:
        distractor = None
    elif distractor is not None and distractor not in SHAPES:
        raise InputError(f"distractor must be True, False, None or a shape in {list(SHAPES)}, got {distractor!r}")
    frames = render_frames(item.colour, item.shape, np.random.default_rng([seed, 0]), distractor=distractor,
                           seconds=seconds, fps=fps, size=size)
    audio = render_audio(item.sound, np.random.default_rng([seed, 1]), seconds=seconds, rate=rate)
    return frames, audio, distractor


def _record(index: int, seed: int, name: str, task: str, options: Sequence[str], keep_arrays: bool,
            distractor: str | None | bool, prefix: str, seconds: float = SECONDS) -> ToyRecord:
    item = get_entity(name)
    cseed = clip_seed(seed, index)
    frames, audio, shown = make_clip(name, cseed, distractor=distractor, seconds=seconds)
    prompt = mc_prompt(options) if task == "mc" else CAPTION_PROMPT
    options = list(options) if task == "mc" else []
    objects = [item.shape] + ([shown] if shown else []) + [name]
    return ToyRecord(
        id=f"{prefix}{seed}-{index:05d}", task=task, seed=cseed, entity=name, colour=item.colour, shape=item.shape,
        sound=item.sound, identified_by=item.identified_by, distractor=shown, prompt=prompt, options=options,
        answer=LETTERS[list(options).index(name)] if name in options else "",
        caption=caption_for(item.colour, item.shape, name, shown), objects=objects,
        frames=frames if keep_arrays else None, audio=audio if keep_arrays else None,
    )


def make_dataset(
    n: int,
    seed: int = 0,
    task: str = "mc",
    entities: Sequence[str] | None = None,
    distractor: str | None | bool = True,
    keep_arrays: bool = True,
    prefix: str = "toy-",
    progress: bool = False,
    seconds: float = SECONDS,
) -> list[ToyRecord]:
    """``n`` toy clips with prompts for ``task`` ("mc" or "caption"), balanced over ``entities``.

    Each entity appears ``n // len(entities)`` or one more times, in a seeded random
    order; the same ``(n, seed)`` always gives the same clips, and clip ``i`` does not
    depend on ``task``, so an "mc" and a "caption" set with equal seeds show the same
    clips. The multiple-choice options are always all ten entities, in the world's
    order (A. bell ... J. phone), which is how the toy model was trained.

    ``seconds`` sets the clip length (the shipped models were trained on the default, 4 s,
    two 2-second chunks; other lengths are for length controls). A clip's seed, entity and
    distractor do not depend on it, and its motion is a function of time, so the frames of a
    longer clip start with the default clip's frames (its sound has the same kind and pitch
    range but is drawn anew).

    >>> [r.frames.shape[0] for r in make_dataset(1, seconds=6.0) + make_dataset(1)]
    [12, 8]
    """
    if not np.isfinite(seconds) or seconds <= 0:
        raise InputError(f"seconds must be a positive clip length, got {seconds!r}")
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {task!r}")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive int, got {n!r}")
    names = list(ENTITY_NAMES if entities is None else entities)
    for name in names:
        get_entity(name)
    order = [names[i % len(names)] for i in range(n)]
    order = [order[i] for i in np.random.default_rng(seed).permutation(n)]
    indices: Iterable[int] = range(n)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"toy clips ({task})")
    return [_record(i, seed, order[i], task, ENTITY_NAMES, keep_arrays, distractor, prefix, seconds) for i in indices]


def write_dataset(
    records: Sequence[ToyRecord],
    folder: str | os.PathLike,
    name: str = "records.jsonl",
    mp4: bool = True,
    wav: bool = True,
) -> Path:
    """Write ``records`` to ``folder/name`` (JSONL) with their media as ``<id>.mp4`` (video with an
    AAC audio track) and ``<id>.wav`` (the exact samples). Paths in the JSONL are relative to
    ``folder``. Returns the JSONL path. Records without arrays keep their existing paths."""
    from ..testing.media import write_mp4

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in records:
        data = record.to_dict()
        if record.frames is not None and record.audio is not None:
            if mp4:
                write_mp4(folder / f"{record.id}.mp4", fps=int(record.fps), frames=record.frames,
                          audio=record.audio, audio_rate=record.sample_rate)
                data["video_path"] = f"{record.id}.mp4"
            if wav:
                import soundfile

                # 32-bit float keeps the samples exact (the default 16-bit PCM would round them).
                soundfile.write(str(folder / f"{record.id}.wav"), record.audio, record.sample_rate, subtype="FLOAT")
                data["audio_path"] = f"{record.id}.wav"
            if not mp4 and not wav:
                raise InputError("write_dataset needs mp4=True or wav=True to store the media")
        lines.append(json.dumps(data))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def read_dataset(path: str | os.PathLike, load_media: bool = False) -> list[ToyRecord]:
    """Records from a JSONL written by `write_dataset` (media paths made absolute; decoded if ``load_media``)."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"toy data set not found: {str(path)!r}")
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = ToyRecord.from_dict(json.loads(line))
        for key in ("video_path", "audio_path"):
            value = getattr(record, key)
            if value is not None and not Path(value).is_absolute():
                setattr(record, key, str(path.parent / value))
        if load_media:
            record.frames, record.audio = record.media()
        records.append(record)
    return records
