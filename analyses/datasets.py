"""Clip data sets for the dominance and causal-tracing runs: JSON / JSONL records (docs/dataset-format.md).

One record per clip::

    {"id": "clip-001", "video": "clips/001.mp4", "audio": null,
     "prompt": "What is making the sound?\\nA. dog\\nB. cat\\nRespond with one letter.",
     "options": ["A", "B"], "label": "A",
     "objects": {"video_masks": "masks/001.npy", "audio_times": [[1.0, 3.5]]}}

Paths are relative to the data set file. ``video`` may be an mp4 (any container PyAV
reads) or a ``.npy`` of uint8 frames ``[T, H, W, 3]`` at ``fps``; ``audio`` a wav/mp3/flac,
a ``.npy`` of float32 samples at ``audio_rate``, or null (the video's own audio track).

Reading checks every record (types, ranges, annotation values) and names its line;
`check_dataset` also checks the media files (regular files, readable ``.npy`` headers of the
right shape) and, given the model, the prompt (length against the model's positions, no
special tokens), all before any forward. A record that fails becomes an `InvalidRecord`,
which a run saves as an error record without running the model on it.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from nnsight_av.errors import InputError, MediaError, NNsightAVError

from .store import require_finite

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["ClipRecord", "InvalidRecord", "DatasetCheck", "check_dataset", "read_dataset", "write_dataset",
           "build_prompt", "load_media_file", "check_media_file", "check_rates", "LETTERS", "DEFAULT_INSTRUCTION",
           "MAX_FPS", "AUDIO_RATES", "MAX_PROMPT_CHARS", "record_id"]

LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
DEFAULT_INSTRUCTION = "Respond with one letter."
#: Highest frame rate a record may give (frames of a .npy are this many per second).
MAX_FPS = 120.0
#: Lowest and highest audio sample rate a record may give.
AUDIO_RATES = (1000, 384000)
#: A prompt longer than this is refused before tokenizing (no model reads 100k characters of question).
MAX_PROMPT_CHARS = 100_000
_OBJECT_KEYS = {"positions", "video_masks", "audio_times", "min_fraction"}
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


def record_id(data: Any, index: int) -> tuple[str, str]:
    """``(id, "record '<id>'")`` of one JSON record (``id`` defaults to its zero-padded index); `InputError`
    when it is not an object or its id is not a non-empty string or int.

    >>> record_id({"id": 7}, 0), record_id({}, 3)
    (('7', "record '7'"), ('000003', "record '000003'"))
    """
    if not isinstance(data, Mapping):
        raise InputError(f"record {index}: expected a JSON object, got {type(data).__name__}")
    raw_id = data.get("id", f"{index:06d}")
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool) or str(raw_id).strip() == "":
        raise InputError(f"record {index}: 'id' must be a non-empty string or int, got {raw_id!r}")
    return str(raw_id), f"record {str(raw_id)!r}"


def _parse_options(value: Any, where: str) -> tuple[list[str], list[str] | None]:
    if value is None:
        raise InputError(f"{where}: 'options' is missing (answer letters, option names, or a letter -> name dict)")
    if isinstance(value, str):
        return list(value), None
    if isinstance(value, Mapping):
        if not value:
            raise InputError(f"{where}: 'options' is empty")
        return [str(k) for k in value], [str(v) for v in value.values()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int)) for v in value):
        raise InputError(f"{where}: 'options' must be letters (\"AB\" or a list), option names or a dict, "
                         f"got {value!r}")
    values = [str(v) for v in value]
    if not values:
        raise InputError(f"{where}: 'options' is empty")
    if all(len(v) == 1 and v.isalpha() for v in values):
        return values, None
    if len(values) > len(LETTERS):
        raise InputError(f"{where}: {len(values)} option names but only {len(LETTERS)} letters")
    return list(LETTERS[: len(values)]), values


def check_rates(data: Mapping[str, Any], where: str) -> tuple[float | None, int | None]:
    """``fps`` and ``audio_rate`` of a record, checked (finite, in range) or None when absent.

    >>> check_rates({"fps": 2, "audio_rate": 16000}, "record 'a'")
    (2.0, 16000)
    """
    fps = data.get("fps")
    rate = data.get("audio_rate")
    if fps is not None:
        fps = require_finite(f"{where}: fps", fps, low=1e-3, high=MAX_FPS)
        if fps <= 0:
            raise InputError(f"{where}: fps must be positive, got {data.get('fps')!r}")
    if rate is not None:
        rate = int(require_finite(f"{where}: audio_rate", rate, low=AUDIO_RATES[0], high=AUDIO_RATES[1],
                                  integer=True))
    return fps, rate


def _check_objects(value: Any, where: str) -> tuple[dict[str, Any] | None, list[str] | None]:
    """``objects``: an annotation dict (or bare token positions), or a list of object names (CHAIR nouns)."""
    if value is None:
        return None, None
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return None, [str(v) for v in value]           # nouns, e.g. the toy world's ground truth
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = {"positions": list(value)}
        else:
            raise InputError(f"{where}: 'objects' as a list must hold object names (strings) or token positions "
                             f"(ints), not a mix: {list(value)[:5]}")
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: 'objects' must be a dict of annotations, a list of names or of token positions, "
                         f"got {type(value).__name__}")
    unknown = sorted(set(value) - _OBJECT_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown 'objects' keys {unknown}; known: {sorted(_OBJECT_KEYS)}")
    positions = value.get("positions")
    if positions is not None:
        if not isinstance(positions, (list, tuple)) or not all(
                isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in positions):
            raise InputError(f"{where}: objects.positions must be a list of token positions (ints >= 0)")
    times = value.get("audio_times")
    if times is not None:
        if not isinstance(times, (list, tuple)):
            raise InputError(f"{where}: objects.audio_times must be a list of [start_s, end_s] pairs")
        for pair in times:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InputError(f"{where}: objects.audio_times holds {pair!r}, not a [start_s, end_s] pair")
            start, end = (require_finite(f"{where}: objects.audio_times", t, low=0.0) for t in pair)
            if end <= start:
                raise InputError(f"{where}: objects.audio_times pair {list(pair)} ends before it starts")
    if value.get("min_fraction") is not None:
        require_finite(f"{where}: objects.min_fraction", value["min_fraction"], low=0.0, high=1.0)
    masks = value.get("video_masks")
    if masks is not None and not isinstance(masks, (str, list)):
        raise InputError(f"{where}: objects.video_masks must be a .npy path or a nested list of 0/1")
    return dict(value), None


def check_media_file(path: str | os.PathLike, what: str, clip: str, kind: str | None = None) -> Path:
    """``path`` checked without decoding it: it exists, is a regular file (a FIFO or a device would
    block a reader), and a ``.npy`` has a readable header of the right shape and dtype.

    ``kind``: ``"video"`` (``[T, H, W, 3]`` frames), ``"audio"`` (1-D samples, or ``[samples,
    channels]``), ``"mask"`` or None (no shape check). Raises `MediaError` naming the clip.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError:
        raise MediaError(f"clip {clip!r}: {what} file not found: {str(path)!r}") from None
    if not stat.S_ISREG(info.st_mode):
        raise MediaError(f"clip {clip!r}: {what} {str(path)!r} is not a regular file (a folder, pipe or device)")
    if info.st_size == 0:
        raise MediaError(f"clip {clip!r}: {what} file {str(path)!r} is empty")
    if path.suffix == ".npy":
        try:
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)   # the header; data are not read
            shape, dtype = mapped.shape, mapped.dtype
            del mapped
        except (ValueError, OSError, EOFError) as error:
            raise MediaError(f"clip {clip!r}: cannot read {what} array {str(path)!r}: {error}") from None
        if dtype.hasobject:
            raise MediaError(f"clip {clip!r}: {what} array {str(path)!r} holds Python objects")
        if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            raise MediaError(f"clip {clip!r}: {what} array {str(path)!r} has dtype {dtype}, not numbers")
        if 0 in shape:
            raise MediaError(f"clip {clip!r}: {what} array {str(path)!r} is empty (shape {shape})")
        if kind == "video" and (len(shape) not in (3, 4) or shape[-1] != 3):
            raise MediaError(f"clip {clip!r}: {what} array {str(path)!r} has shape {shape}, not frames [T, H, W, 3]")
        if kind == "audio" and len(shape) not in (1, 2):
            raise MediaError(f"clip {clip!r}: {what} array {str(path)!r} has shape {shape}, not samples [N] or "
                             "[N, channels]")
    return path


def load_media_file(path: str | os.PathLike, what: str, clip: str, kind: str | None = None) -> Any:
    """A ``.npy`` decoded, or the path of another media file for the processor (checked, not decoded)."""
    path = check_media_file(path, what, clip, kind)
    if path.suffix != ".npy":
        return str(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise MediaError(f"clip {clip!r}: cannot read {what} array {str(path)!r}: {error}") from None
    return array                            # values (finite, ranges) are checked by nnsight_av.media on prepare


@dataclass
class InvalidRecord:
    """A data set record that failed its checks: a run saves it as an error record, model untouched.

    ``line``: its line in a ``.jsonl`` (its 1-based place in a ``.json`` list).
    """

    id: str
    error_type: str
    error: str
    line: int | None = None

    @classmethod
    def of(cls, clip: str, error: BaseException, line: int | None = None) -> "InvalidRecord":
        return cls(str(clip), type(error).__name__, str(error), line)


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
    object_names: list[str] | None = None
    frames: np.ndarray | None = field(default=None, repr=False)
    wave: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: str | os.PathLike | None = None, index: int = 0
                  ) -> "ClipRecord":
        """Parse one JSON record (``video_path`` / ``audio_path`` / ``answer`` are accepted aliases)."""
        clip_id, where = record_id(data, index)
        letters, names = _parse_options(data.get("options"), where)
        if len(set(letters)) != len(letters):
            raise InputError(f"{where}: 'options' repeat a letter: {letters}")
        prompt = data.get("prompt")
        if prompt is None:
            if data.get("question") is None:
                raise InputError(f"{where}: give 'prompt' (the full text) or 'question' (+ option names)")
            prompt = build_prompt(str(data["question"]), names or letters,
                                  str(data.get("instruction", DEFAULT_INSTRUCTION)))
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"{where}: the prompt has {len(prompt)} characters (at most {MAX_PROMPT_CHARS})")
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
        for name, value in (("video", video), ("audio", audio)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InputError(f"{where}: {name!r} must be a file path (a string), got {value!r}")
        fps, rate = check_rates(data, where)
        objects, object_names = _check_objects(data.get("objects"), where)
        dominant = data.get("dominant")
        if dominant not in (None, "audio", "video"):
            raise InputError(f"{where}: dominant must be 'audio', 'video' or null, got {dominant!r}")
        return cls(id=clip_id, prompt=str(prompt), options=letters, video=video, audio=audio, label=label,
                   option_names=names, objects=objects, fps=fps, audio_rate=rate, dominant=dominant,
                   object_names=object_names,
                   extra={k: v for k, v in data.items() if k not in _KNOWN},
                   root=str(root) if root is not None else None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "video": self.video, "audio": self.audio, "prompt": self.prompt,
                               "options": self.options if self.option_names is None else
                               dict(zip(self.options, self.option_names)), "label": self.label}
        for key in ("objects", "fps", "audio_rate", "dominant"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.objects is None and self.object_names is not None:
            out["objects"] = list(self.object_names)
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
        return load_media_file(self.path(value), what, self.id, kind=what)

    def check_files(self) -> None:
        """Check the media files (and a mask file) without decoding them; `MediaError` on the first problem."""
        if self.frames is None and self.video is not None:
            check_media_file(self.path(self.video), "video", self.id, kind="video")
        if self.wave is None and self.audio is not None:
            check_media_file(self.path(self.audio), "audio", self.id, kind="audio")
        masks = (self.objects or {}).get("video_masks")
        if isinstance(masks, str):
            check_media_file(self.path(masks), "objects.video_masks", self.id, kind="mask")

    def prepare(self, model: "AVModel") -> "AVInputs":
        """``model.prepare`` on this clip (its audio track when no audio is given)."""
        media = self.media()
        return model.prepare(text=self.prompt, **media)


def read_rows(path: Path) -> list[tuple[int, Any]]:
    """``(line, parsed JSON or the parse error)`` per record of a ``.json`` / ``.jsonl`` file."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise InputError(f"{path.name} is not UTF-8 text: {error}") from None
    if path.suffix == ".jsonl":
        rows: list[tuple[int, Any]] = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append((i + 1, json.loads(line)))
                except json.JSONDecodeError as error:
                    rows.append((i + 1, InputError(f"{path.name} line {i + 1} is not JSON: {error}")))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path.name} is not JSON: {error}") from None
    if isinstance(data, Mapping) and "clips" in data:
        data = data["clips"]
    if not isinstance(data, list):
        raise InputError("a JSON data set must be a list of clip records (or {'clips': [...]})")
    return [(i + 1, row) for i, row in enumerate(data)]


def parse_record(parse: Any, row: Any, root: Any, index: int) -> Any:
    """``parse(row, root, index)`` with any failure of a hostile record made an `InputError`."""
    try:
        return parse(row, root, index)
    except NNsightAVError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as error:
        clip = row.get("id") if isinstance(row, Mapping) else index
        raise InputError(f"record {clip!r}: {type(error).__name__}: {error}") from None


def read_dataset(
    source: "str | os.PathLike | Iterable[Mapping[str, Any] | ClipRecord]",
    *,
    on_error: str = "raise",
) -> "list[ClipRecord] | list[ClipRecord | InvalidRecord]":
    """Clip records from a ``.json`` / ``.jsonl`` file or an iterable of dicts / `ClipRecord`.

    Every record is checked (types, ranges, annotation values). ``on_error="raise"``: the
    first bad record raises `InputError` naming its line; ``"record"``: it is kept as an
    `InvalidRecord` in its place (a run saves it as an error record). Ids must be unique
    (they key the resumable result files); an empty data set is refused.

    >>> recs = read_dataset([{"id": "a", "video": "a.mp4", "question": "Which?", "options": ["dog", "cat"],
    ...                       "label": "cat"}])
    >>> recs[0].options, recs[0].label, recs[0].prompt.splitlines()[1]
    (['A', 'B'], 'B', 'A. dog')
    >>> read_dataset([{"id": "b", "video": "b.mp4", "prompt": "Q", "options": "AB", "fps": "abc"}],
    ...              on_error="record")[0].error
    "record 'b': fps must be a number, got 'abc'"
    """
    if on_error not in ("raise", "record"):
        raise InputError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    root: Path | None = None
    place = "record"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"data set file not found: {str(path)!r}" if not path.exists() else
                             f"the data set {str(path)!r} is not a regular file")
        rows = read_rows(path)
        root = path.resolve().parent
        place = f"{path.name} line" if path.suffix == ".jsonl" else f"{path.name} record"
    else:
        rows = [(i + 1, r) for i, r in enumerate(source)]
    records: list[Any] = []
    for line, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            record = row if isinstance(row, ClipRecord) else parse_record(ClipRecord.from_dict, row, root, len(records))
        except NNsightAVError as error:
            if on_error == "raise":
                text = str(error)
                raise type(error)(text if text.startswith(place.split()[0]) else f"{place} {line}: {text}") from None
            clip = row.get("id") if isinstance(row, Mapping) else None
            clip = str(clip) if isinstance(clip, (str, int)) and not isinstance(clip, bool) else f"{place} {line}"
            message = str(error) if str(error).startswith(place.split()[0]) else f"{place} {line}: {error}"
            records.append(InvalidRecord(clip, type(error).__name__, message, line))
            continue
        records.append(record)
    seen: dict[str, int] = {}
    for (line, _), record in zip(rows, records):
        if record.id in seen:
            raise InputError(f"clip id {record.id!r} appears twice in the data set ({place}s {seen[record.id]} "
                             f"and {line})")
        seen[record.id] = line
    if not records:
        raise InputError("the data set holds no clips")
    return records


@dataclass
class DatasetCheck:
    """The records of a data set after `check_dataset`: valid `ClipRecord` s and `InvalidRecord` s, in order."""

    records: list[Any]

    @property
    def invalid(self) -> list[InvalidRecord]:
        return [r for r in self.records if isinstance(r, InvalidRecord)]

    @property
    def valid(self) -> list[Any]:
        return [r for r in self.records if not isinstance(r, InvalidRecord)]

    def report(self, limit: int = 10) -> str:
        """A few lines for the console: how many records are invalid, and the first ``limit`` reasons."""
        bad = self.invalid
        if not bad:
            return f"{len(self.records)} records, all valid"
        lines = [f"{len(bad)} of {len(self.records)} records are invalid (saved as error records, not run):"]
        lines += [f"  {r.error}" for r in bad[:limit]]
        if len(bad) > limit:
            lines.append(f"  ... and {len(bad) - limit} more")
        return "\n".join(lines)

    def check_model(self, model: "AVModel") -> "DatasetCheck":
        """Also check each prompt against the model: no special tokens, text within its positions."""
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            return self
        special = sorted({str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
                         | {str(t) for t in getattr(tokenizer, "get_added_vocab", dict)()}, key=len, reverse=True)
        limit = max_positions(model)
        out = []
        for record in self.records:
            if isinstance(record, InvalidRecord):
                out.append(record)
                continue
            try:
                check_prompt(record.prompt, tokenizer, special, limit, record.id)
            except InputError as error:
                record = InvalidRecord.of(record.id, error)
            out.append(record)
        return DatasetCheck(out)


def max_positions(model: "AVModel") -> int | None:
    """The most positions the model's language model takes (its config's ``max_position_embeddings``)."""
    config = model.adapter.text_config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def check_prompt(prompt: str, tokenizer: Any, special: Sequence[str], limit: int | None, clip: str) -> int:
    """Tokens of ``prompt`` (text only), checked: no special token inside, fewer than ``limit``."""
    for token in special:
        if token and token in prompt:
            raise InputError(f"clip {clip!r}: the prompt holds the special token {token!r}; media tokens and chat "
                             "markers are added by the processor, so the prompt must be plain text")
    count = len(tokenizer.encode(prompt, add_special_tokens=False))
    if limit is not None and count >= limit:
        raise InputError(f"clip {clip!r}: the prompt alone is {count} tokens; the model takes {limit} positions in "
                         "all (media tokens come on top)")
    return count


def check_dataset(
    source: "str | os.PathLike | Iterable[Mapping[str, Any] | ClipRecord | InvalidRecord] | DatasetCheck",
    model: "AVModel | None" = None,
) -> DatasetCheck:
    """Read and check a data set before any model work: records (`read_dataset`), media files, and
    with ``model`` the prompts. Each failing record becomes an `InvalidRecord` with its reason.

    >>> check = check_dataset([{"id": "a", "video": "missing.mp4", "prompt": "Q", "options": "AB"}])
    >>> check.invalid[0].error_type, "not found" in check.invalid[0].error
    ('MediaError', True)
    """
    if isinstance(source, DatasetCheck):
        records = list(source.records)
    else:
        items = source if isinstance(source, (str, os.PathLike)) else list(source)
        if not isinstance(items, (str, os.PathLike)) and any(isinstance(r, InvalidRecord) for r in items):
            records = list(items)
        else:
            records = read_dataset(items, on_error="record")
    return checked_files(records, ClipRecord, model)


def checked_files(records: Sequence[Any], record_type: type, model: "AVModel | None" = None) -> DatasetCheck:
    """`DatasetCheck` of ``records`` after each ``record_type`` record's ``check_files()``; a failing
    one becomes an `InvalidRecord` (shared by the clip and caption data sets)."""
    out: list[Any] = []
    for record in records:
        if isinstance(record, record_type):
            try:
                record.check_files()
            except NNsightAVError as error:
                record = InvalidRecord.of(record.id, error)
        out.append(record)
    check = DatasetCheck(out)
    return check.check_model(model) if model is not None else check


def write_dataset(records: Sequence[ClipRecord | Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as JSONL (``.jsonl``) or a JSON list."""
    path = Path(path)
    rows = [r.to_dict() if isinstance(r, ClipRecord) else dict(r) for r in records]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return path
