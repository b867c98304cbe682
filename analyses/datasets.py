"""Clip data sets for the dominance and causal-tracing runs: JSON / JSONL records (docs/dataset-format.md).

One record per clip::

    {"id": "clip-001", "video": "clips/001.mp4", "audio": null,
     "prompt": "What is making the sound?\\nA. dog\\nB. cat\\nRespond with one letter.",
     "options": ["A", "B"], "label": "A",
     "objects": {"video_masks": "masks/001.npy", "audio_times": [[1.0, 3.5]]}}

Paths are relative to the data set file. ``video`` may be an mp4 (any container PyAV
reads) or a ``.npy`` of uint8 frames ``[T, H, W, 3]`` at ``fps``; ``audio`` a wav/mp3/flac,
a ``.npy`` of float32 samples at ``audio_rate``, or null (the video's own audio track).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from nnsight_av.errors import InputError, MediaError

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["ClipRecord", "read_dataset", "write_dataset", "build_prompt", "LETTERS", "DEFAULT_INSTRUCTION"]

LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
DEFAULT_INSTRUCTION = "Respond with one letter."
_KNOWN = {"id", "video", "video_path", "audio", "audio_path", "prompt", "question", "instruction", "options", "label",
          "answer", "objects", "fps", "audio_rate", "dominant"}


def build_prompt(question: str, names: Sequence[str], instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The question, one lettered option per line, the instruction (the same text in every run).

    >>> print(build_prompt("What is making the sound?", ["dog", "cat"]))
    What is making the sound?
    A. dog
    B. cat
    Respond with one letter.
    """
    lines = [question] + [f"{LETTERS[i]}. {name}" for i, name in enumerate(names)] + ([instruction] if instruction else [])
    return "\n".join(lines)


def _parse_options(value: Any, where: str) -> tuple[list[str], list[str] | None]:
    if value is None:
        raise InputError(f"{where}: 'options' is missing (answer letters, option names, or a letter -> name dict)")
    if isinstance(value, str):
        return list(value), None
    if isinstance(value, Mapping):
        return [str(k) for k in value], [str(v) for v in value.values()]
    values = [str(v) for v in value]
    if not values:
        raise InputError(f"{where}: 'options' is empty")
    if all(len(v) == 1 and v.isalpha() for v in values):
        return values, None
    if len(values) > len(LETTERS):
        raise InputError(f"{where}: {len(values)} option names but only {len(LETTERS)} letters")
    return list(LETTERS[: len(values)]), values


@dataclass
class ClipRecord:
    """One clip of a data set: media (paths or arrays), the prompt, the answer letters and the label.

    ``options`` are the answer letters; ``option_names`` what they stand for (if given);
    ``label`` the correct letter (or None); ``objects`` object annotations for the
    ``object`` token set (see `analyses.tracing.object_positions`); ``dominant`` skips the
    dominance test when given. ``frames`` / ``wave`` hold in-memory media instead of files.
    """

    id: str
    prompt: str
    options: list[str]
    video: str | None = None
    audio: str | None = None
    label: str | None = None
    option_names: list[str] | None = None
    objects: dict[str, Any] | None = None
    fps: float | None = None
    audio_rate: int | None = None
    dominant: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    root: str | None = None
    frames: np.ndarray | None = field(default=None, repr=False)
    wave: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: str | os.PathLike | None = None, index: int = 0
                  ) -> "ClipRecord":
        """Parse one JSON record (``video_path`` / ``audio_path`` / ``answer`` are accepted aliases)."""
        if not isinstance(data, Mapping):
            raise InputError(f"record {index}: expected a JSON object, got {type(data).__name__}")
        clip_id = str(data.get("id", f"{index:06d}"))
        where = f"record {clip_id!r}"
        letters, names = _parse_options(data.get("options"), where)
        prompt = data.get("prompt")
        if prompt is None:
            if data.get("question") is None:
                raise InputError(f"{where}: give 'prompt' (the full text) or 'question' (+ option names)")
            prompt = build_prompt(str(data["question"]), names or letters,
                                  str(data.get("instruction", DEFAULT_INSTRUCTION)))
        label = data.get("label", data.get("answer"))
        if label is not None and label != "":
            if isinstance(label, int) and not isinstance(label, bool):
                if not 0 <= label < len(letters):
                    raise InputError(f"{where}: label index {label} is outside the {len(letters)} options")
                label = letters[label]
            label = str(label)
            if label not in letters:
                if names and label in names:
                    label = letters[names.index(label)]
                else:
                    raise InputError(f"{where}: label {label!r} is neither an option letter {letters} nor a name")
        else:
            label = None
        video = data.get("video", data.get("video_path"))
        audio = data.get("audio", data.get("audio_path"))
        if video is None and audio is None:
            raise InputError(f"{where}: no 'video' and no 'audio'")
        dominant = data.get("dominant")
        if dominant not in (None, "audio", "video"):
            raise InputError(f"{where}: dominant must be 'audio', 'video' or null, got {dominant!r}")
        return cls(id=clip_id, prompt=str(prompt), options=letters, video=video, audio=audio, label=label,
                   option_names=names, objects=data.get("objects"), fps=data.get("fps"),
                   audio_rate=data.get("audio_rate"), dominant=dominant,
                   extra={k: v for k, v in data.items() if k not in _KNOWN},
                   root=str(root) if root is not None else None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "video": self.video, "audio": self.audio, "prompt": self.prompt,
                               "options": self.options if self.option_names is None else
                               dict(zip(self.options, self.option_names)), "label": self.label}
        for key in ("objects", "fps", "audio_rate", "dominant"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() or self.root is None else Path(self.root) / p

    def resolved_objects(self) -> dict[str, Any] | None:
        """``objects`` with a relative ``video_masks`` path made absolute."""
        if self.objects is None:
            return None
        objects = dict(self.objects) if isinstance(self.objects, Mapping) else {"positions": self.objects}
        masks = objects.get("video_masks")
        if isinstance(masks, str):
            objects["video_masks"] = str(self.path(masks))
        return objects

    def media(self) -> dict[str, Any]:
        """Arguments for ``model.prepare``: decoded arrays or file paths (checked to exist)."""
        out: dict[str, Any] = {}
        if self.frames is not None:
            out["video"] = self.frames
        elif self.video is not None:
            out["video"] = self._load(self.video, "video")
        if self.wave is not None:
            out["audio"] = self.wave
        elif self.audio is not None:
            out["audio"] = self._load(self.audio, "audio")
        if self.fps is not None:
            out["fps"] = float(self.fps)
        if self.audio_rate is not None:
            out["audio_rate"] = int(self.audio_rate)
        return out

    def _load(self, value: str, what: str) -> Any:
        path = self.path(value)
        if not path.exists():
            raise MediaError(f"clip {self.id!r}: {what} file not found: {str(path)!r}")
        if path.suffix == ".npy":
            try:
                return np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:
                raise MediaError(f"clip {self.id!r}: cannot read {what} array {str(path)!r}: {error}") from None
        return str(path)

    def prepare(self, model: "AVModel") -> "AVInputs":
        """``model.prepare`` on this clip (its audio track when no audio is given)."""
        media = self.media()
        return model.prepare(text=self.prompt, **media)


def _records_from_json(data: Any, root: Path | None) -> list[ClipRecord]:
    if isinstance(data, Mapping) and "clips" in data:
        data = data["clips"]
    if not isinstance(data, list):
        raise InputError("a JSON data set must be a list of clip records (or {'clips': [...]})")
    return [ClipRecord.from_dict(r, root, i) for i, r in enumerate(data)]


def read_dataset(source: "str | os.PathLike | Iterable[Mapping[str, Any] | ClipRecord]") -> list[ClipRecord]:
    """Clip records from a ``.json`` / ``.jsonl`` file or an iterable of dicts / `ClipRecord`.

    Ids must be unique (they key the resumable result files).

    >>> recs = read_dataset([{"id": "a", "video": "a.mp4", "question": "Which?", "options": ["dog", "cat"],
    ...                       "label": "cat"}])
    >>> recs[0].options, recs[0].label, recs[0].prompt.splitlines()[1]
    (['A', 'B'], 'B', 'A. dog')
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"data set file not found: {str(path)!r}")
        text = path.read_text()
        root = path.resolve().parent
        if path.suffix == ".jsonl":
            records = []
            for i, line in enumerate(text.splitlines()):
                if line.strip():
                    try:
                        records.append(ClipRecord.from_dict(json.loads(line), root, len(records)))
                    except json.JSONDecodeError as error:
                        raise InputError(f"{path.name} line {i + 1} is not JSON: {error}") from None
        else:
            try:
                records = _records_from_json(json.loads(text), root)
            except json.JSONDecodeError as error:
                raise InputError(f"{path.name} is not JSON: {error}") from None
    else:
        records = [r if isinstance(r, ClipRecord) else ClipRecord.from_dict(r, None, i)
                   for i, r in enumerate(source)]
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise InputError(f"clip id {record.id!r} appears twice in the data set")
        seen.add(record.id)
    if not records:
        raise InputError("the data set holds no clips")
    return records


def write_dataset(records: Sequence[ClipRecord | Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as JSONL (``.jsonl``) or a JSON list."""
    path = Path(path)
    rows = [r.to_dict() if isinstance(r, ClipRecord) else dict(r) for r in records]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return path
