"""Hallucination evaluation: captions per decoding method, CHAIR and ms per token, resumable.

Data set: JSON (a list, or ``{"clips": [...]}``) or JSONL, one record per clip::

    {"id": "clip-001", "video": "clips/001.mp4", "audio": null, "objects": ["dog"],
     "prompt": "Describe what you see and hear in a single sentence."}

``video``: an mp4 (its audio track is used when ``audio`` is null) or a ``.npy`` of uint8
frames ``[T, H, W, 3]`` at ``fps`` (default 2); ``audio``: a wav/mp3/flac or a ``.npy`` of
float32 samples at ``audio_rate`` (default 16 kHz); paths are relative to the data set file.
``prompt`` defaults to the paper's captioning prompt; ``objects`` are the ground-truth
objects for CHAIR (vocabulary names or synonyms).

`evaluate` writes one JSON line per (clip, method) as soon as it is done, so an interrupted
run resumes where it stopped; `EvalResult.table` gives CHAIR_s, CHAIR_i and ms per token
per method (CHAIR is computed from the stored captions, so another vocabulary needs no rerun).
The output follows the rules of every run file (`analyses.store`): append-only, one writer,
its settings kept beside it; a record or clip that fails becomes an error line
(``status: "error"``) and the run goes on.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from nnsight_av.errors import InputError, NNsightAVError

from .asd import ASDConfig, asd_generate
from .decoding import fmd_generate, greedy_generate, vcd_generate
from .chair import ChairResult, Vocabulary, as_vocabulary, chair, example_vocabulary
from .datasets import (MAX_PROMPT_CHARS, DatasetCheck, InvalidRecord, checked_files, check_media_file, check_rates, load_media_file,
                       parse_record, read_rows, record_id)
from .plots import plot_eval
from .results import RecordsResult
from .store import (OutputLock, append_jsonl, check_settings, model_identity, read_jsonl, remove_output, repair_tail)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["CAPTION_PROMPT", "METHODS", "CaptionRecord", "read_caption_dataset", "check_caption_dataset",
           "write_caption_dataset", "EvalResult", "evaluate", "run_method", "fell_back", "check_eval_settings"]

CAPTION_PROMPT = "Describe what you see and hear in a single sentence."
METHODS = ("greedy", "vcd", "fmd", "asd")


@dataclass
class CaptionRecord:
    """One clip to caption: media (paths relative to ``root``), prompt and ground-truth objects."""

    id: str
    objects: list[str]
    video: str | None = None
    audio: str | None = None
    prompt: str = CAPTION_PROMPT
    fps: float | None = None
    audio_rate: int | None = None
    root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: str | Path | None = None, index: int = 0) -> "CaptionRecord":
        """Parse and check one record (types, rates, object names); `InputError` naming the clip."""
        clip_id, where = record_id(data, index)
        objects = data.get("objects", data.get("ground_truth"))
        if objects is None:
            raise InputError(f"{where}: 'objects' (the ground-truth objects) is missing")
        if isinstance(objects, str):
            objects = [objects]
        if not isinstance(objects, (list, tuple)) or not all(isinstance(o, str) for o in objects):
            raise InputError(f"{where}: 'objects' must be a list of object names (strings), got {objects!r}")
        video, audio = data.get("video", data.get("video_path")), data.get("audio", data.get("audio_path"))
        if video is None and audio is None:
            raise InputError(f"{where}: no 'video' and no 'audio'")
        for name, value in (("video", video), ("audio", audio)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InputError(f"{where}: {name!r} must be a file path (a string), got {value!r}")
        prompt = data.get("prompt") or CAPTION_PROMPT
        if not isinstance(prompt, str):
            raise InputError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"{where}: the prompt has {len(prompt)} characters (at most {MAX_PROMPT_CHARS})")
        fps, rate = check_rates(data, where)
        known = {"id", "objects", "ground_truth", "video", "audio", "video_path", "audio_path", "prompt", "fps",
                 "audio_rate"}
        return cls(clip_id, list(objects), video, audio, prompt, fps, rate, str(root) if root is not None else None,
                   {k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "video": self.video, "audio": self.audio, "prompt": self.prompt, "objects": self.objects}
        for key in ("fps", "audio_rate"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **self.extra}

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() or self.root is None else Path(self.root) / path

    def _media(self, value: str, what: str) -> Any:
        return load_media_file(self._path(value), what, self.id, kind=what)

    def check_files(self) -> None:
        """Check the media files without decoding them (regular files, ``.npy`` headers); `MediaError`."""
        for value, what in ((self.video, "video"), (self.audio, "audio")):
            if value is not None:
                check_media_file(self._path(value), what, self.id, kind=what)

    def prepare(self, model: "AVModel") -> "AVInputs":
        """``model.prepare`` on this clip (the video's audio track when no audio is given)."""
        kwargs: dict[str, Any] = {"text": self.prompt}
        if self.video is not None:
            kwargs["video"] = self._media(self.video, "video")
        if self.audio is not None:
            kwargs["audio"] = self._media(self.audio, "audio")
        if self.fps is not None:
            kwargs["fps"] = float(self.fps)
        if self.audio_rate is not None:
            kwargs["audio_rate"] = int(self.audio_rate)
        return model.prepare(**kwargs)


def read_caption_dataset(path: str | Path, *, on_error: str = "raise") -> "list[CaptionRecord | InvalidRecord]":
    """Records of a JSON / JSONL data set (see the module text), each checked; ids must be unique.

    ``on_error="raise"``: the first bad record raises `InputError` naming its line;
    ``"record"``: it is kept as an `analyses.datasets.InvalidRecord` (saved as error lines).
    """
    if on_error not in ("raise", "record"):
        raise InputError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no data set file at {path}" if not path.exists() else f"{path} is not a regular file")
    place = f"{path.name} line" if path.suffix == ".jsonl" else f"{path.name} record"
    records: list[Any] = []
    lines: dict[str, int] = {}
    duplicates = []
    for line, row in read_rows(path):
        try:
            if isinstance(row, Exception):
                raise row
            record: Any = parse_record(CaptionRecord.from_dict, row, path.parent, len(records))
        except NNsightAVError as error:
            if on_error == "raise":
                raise type(error)(f"{place} {line}: {error}") from None
            clip = row.get("id") if isinstance(row, Mapping) else None
            clip = str(clip) if isinstance(clip, (str, int)) and not isinstance(clip, bool) else f"{place} {line}"
            record = InvalidRecord(clip, type(error).__name__, f"{place} {line}: {error}", line)
        if record.id in lines:
            duplicates.append(record.id)
        lines.setdefault(record.id, line)
        records.append(record)
    if duplicates:
        raise InputError(f"{path}: duplicate clip ids {sorted(set(duplicates))[:5]}")
    if not records:
        raise InputError(f"{path}: the data set holds no clips")
    return records


def check_caption_dataset(
    dataset: "str | Path | Sequence[CaptionRecord | InvalidRecord | Mapping[str, Any]]",
    model: "AVModel | None" = None,
) -> DatasetCheck:
    """Read and check a caption data set before any model work (records, media files, and with
    ``model`` the prompts); each failing record becomes an `InvalidRecord`."""
    if isinstance(dataset, DatasetCheck):
        records = list(dataset.records)
    elif isinstance(dataset, (str, Path)):
        records = read_caption_dataset(dataset, on_error="record")
    else:
        records = []
        for i, r in enumerate(dataset):
            try:
                records.append(r if isinstance(r, (CaptionRecord, InvalidRecord)) else
                               parse_record(CaptionRecord.from_dict, r, None, i))
            except NNsightAVError as error:
                clip = r.get("id") if isinstance(r, Mapping) else None
                records.append(InvalidRecord.of(str(clip) if clip is not None else f"record {i + 1}", error, i + 1))
    return checked_files(records, CaptionRecord, model)


def write_caption_dataset(records: Sequence[CaptionRecord | Mapping[str, Any]], path: str | Path) -> Path:
    """Write records as JSONL."""
    path = Path(path)
    lines = [json.dumps(r.to_dict() if isinstance(r, CaptionRecord) else dict(r)) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def decoding_kwargs(method: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` of one method as its generator takes them (an ASD ``config`` dict becomes an `ASDConfig`)."""
    kwargs = dict(kwargs)
    if method == "asd" and isinstance(kwargs.get("config"), Mapping):
        kwargs["config"] = ASDConfig.from_dict(kwargs["config"])
    return kwargs


def run_method(model: "AVModel", inputs: "AVInputs", method: str, max_new_tokens: int = 64, **kwargs: Any) -> Any:
    """One decoding method by name ("greedy", "vcd", "fmd", "asd") on one prepared input."""
    functions = _generators()
    if method not in functions:
        raise InputError(f"unknown decoding method {method!r}; choose from {sorted(functions)}")
    return functions[method](model, inputs, max_new_tokens, **decoding_kwargs(method, kwargs))


def _record(record: CaptionRecord, method: str, output: Any) -> dict[str, Any]:
    row = {"id": record.id, "method": method, "caption": output.text, "token_ids": output.token_ids,
           "num_new_tokens": output.num_new_tokens, "ms": output.ms, "ms_per_token": output.ms_per_token,
           "finished": output.finished, "objects": record.objects, "prompt_length": output.prompt_length,
           "meta": output.meta}
    if method == "asd":
        steps = output.steps
        row["asd"] = {"mean_strength": float(np.mean(steps["s"])) if steps["s"] else 0.0,
                      "fallback_steps": int(sum(steps["fallback"])), "changed_steps": int(sum(steps["changed"])),
                      "sinks": {k: len(v) for k, v in output.sinks.items()},
                      "reason": next((r for r in steps["reason"] if r and r != "first token"), "")}
    return row


def _pair(record: Mapping[str, Any]) -> tuple[str, str]:
    return str(record["id"]), str(record["method"])


def _error_row(clip: str, method: str, error_type: str, message: str) -> dict[str, Any]:
    return {"id": clip, "method": method, "status": "error", "error_type": error_type, "error": message}


def fell_back(row: Mapping[str, Any]) -> bool:
    """Whether an ASD caption fell back to greedy at every step (no sink set to boost): it is greedy's caption."""
    info = row.get("asd")
    return bool(info) and int(info.get("fallback_steps", 0)) >= max(1, int(row.get("num_new_tokens", 0)))


@dataclass
class EvalResult(RecordsResult):
    """Captions of every (clip, method) pair and the CHAIR / speed table.

    ``records``: one dict per pair (``id``, ``method``, ``caption``, ``objects``, ``ms``,
    ``num_new_tokens``, ...); ``vocabulary``: the CHAIR vocabulary used by `table`.
    """

    records: list[dict[str, Any]]
    vocabulary: Vocabulary
    path: str | None = None
    record_key: ClassVar[Any] = staticmethod(_pair)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.records))

    @property
    def ok(self) -> list[dict[str, Any]]:
        """The captioned pairs (error lines left out)."""
        return [r for r in self.records if r.get("status", "ok") != "error"]

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The (clip, method) pairs that failed, with ``error_type`` and ``error``."""
        return [r for r in self.records if r.get("status") == "error"]

    def chair(self, method: str, vocabulary: Any = None, per_mention: bool = False) -> ChairResult:
        rows = [r for r in self.ok if r["method"] == method]
        if not rows:
            raise InputError(f"no captions for method {method!r}; have {self.methods}")
        vocab = self.vocabulary if vocabulary is None else as_vocabulary(vocabulary, None)
        return chair([r["caption"] for r in rows], [r["objects"] for r in rows], vocab, per_mention=per_mention)

    def table(self, vocabulary: Any = None, per_mention: bool = False) -> "pd.DataFrame":
        """Per method: clips, CHAIR_s, CHAIR_i, mentions, mean new tokens, ms per token (total ms / tokens),
        ``failed`` (pairs saved as errors) and ``fell_back`` (ASD captions that fell back to greedy at every
        step, so they are greedy's captions; 0 for other methods)."""
        import pandas as pd

        rows = []
        for method in self.methods:
            mine = [r for r in self.ok if r["method"] == method]
            failed = sum(1 for r in self.errors if r["method"] == method)
            if not mine:
                rows.append({"method": method, "clips": 0, "CHAIR_s": float("nan"), "CHAIR_i": float("nan"),
                             "mentions": 0, "tokens_per_caption": float("nan"), "ms_per_token": float("nan"),
                             "failed": failed, "fell_back": 0})
                continue
            res = self.chair(method, vocabulary, per_mention)
            tokens = sum(r["num_new_tokens"] for r in mine)
            rows.append({"method": method, "clips": len(mine), "CHAIR_s": res.chair_s, "CHAIR_i": res.chair_i,
                         "mentions": res.num_mentions, "tokens_per_caption": tokens / len(mine),
                         "ms_per_token": sum(r["ms"] for r in mine) / max(1, tokens), "failed": failed,
                         "fell_back": sum(fell_back(r) for r in mine)})
        return pd.DataFrame(rows)

    def notes(self) -> list[str]:
        """Footnotes for a printed table: ASD captions that are greedy's, and failed pairs."""
        lines = []
        for method in self.methods:
            mine = [r for r in self.ok if r["method"] == method]
            back = [r for r in mine if fell_back(r)]
            if back:
                reason = next((r["asd"].get("reason") for r in back if r["asd"].get("reason")), "") or "no sinks"
                lines.append(f"{method}: {len(back)} of {len(mine)} captions fell back to greedy at every step "
                             f"({reason}); they are greedy's captions, not {method}'s")
        if self.errors:
            lines.append(f"{len(self.errors)} (clip, method) pairs failed; see the 'error' field of their lines")
        return lines

    def captions(self) -> "pd.DataFrame":
        """One row per clip, one column per method."""
        import pandas as pd

        if not self.ok:
            return pd.DataFrame(index=pd.Index([], name="id"))
        frame = pd.DataFrame(self.ok)
        return frame.pivot(index="id", columns="method", values="caption")

    def to_frame(self) -> "pd.DataFrame":
        """One row per (clip, method) pair: its record (``id``, ``method``, ``caption``, ``ms`` ...; failed pairs too)."""
        import pandas as pd

        return pd.DataFrame(self.records)

    def summary(self, vocabulary: Any = None, per_mention: bool = False) -> "pd.DataFrame":
        """The CHAIR / speed table per method: `table`."""
        return self.table(vocabulary, per_mention)

    def plot(self, ax: Any = None) -> "Figure":
        """CHAIR_s and CHAIR_i per method; see `analyses.plots.plot_eval`."""
        return plot_eval(self, ax)

    @classmethod
    def load(cls, path: str | Path, vocabulary: Any = None) -> "EvalResult":
        """Read a `save` file or an `evaluate` output: bad lines skipped with a warning, one record per
        (clip, method) (the last); ``vocabulary`` for CHAIR (default: the shipped example)."""
        return super().load(path, vocabulary=vocabulary)

    @classmethod
    def _from_saved(cls, records: list[dict[str, Any]], path: Path, vocabulary: Any = None) -> "EvalResult":
        vocab = example_vocabulary() if vocabulary is None else as_vocabulary(vocabulary, None)
        return cls(records, vocab, str(path))

    def _repr_html_(self) -> str:
        return self.table().to_html(index=False, float_format=lambda v: f"{v:.4f}")


def check_eval_settings(methods: Sequence[str], method_kwargs: Mapping[str, Any] | None = None,
                        max_new_tokens: int = 64, limit: int | None = None) -> list[str]:
    """Check `evaluate`'s settings without a model (names, arguments, ranges); returns the methods, once each.

    >>> check_eval_settings(["greedy", "asdd"])
    Traceback (most recent call last):
    ...
    nnsight_av.errors.InputError: unknown decoding methods ['asdd'] (did you mean 'asd'?); choose from \
['greedy', 'vcd', 'fmd', 'asd']
    """
    import difflib

    methods = list(dict.fromkeys(methods))
    if not methods:
        raise InputError("no decoding method given")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown decoding methods {unknown}{hint}; choose from {list(METHODS)}")
    if method_kwargs is not None and not isinstance(method_kwargs, Mapping):
        raise InputError(f"method_kwargs must map a method to its keyword arguments, got {method_kwargs!r}")
    extra = dict(method_kwargs or {})
    bad = sorted(set(extra) - set(methods))
    if bad:
        raise InputError(f"method_kwargs for methods that are not run: {bad}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive int, got {limit!r}")
    for method in methods:
        kwargs = extra.get(method, {})
        if not isinstance(kwargs, Mapping):
            raise InputError(f"method_kwargs[{method!r}] must be a dict, got {kwargs!r}")
        _check_arguments(method, decoding_kwargs(method, kwargs))   # a bad argument fails here, not per clip
    return methods


def _generators() -> dict[str, Callable[..., Any]]:
    return {"greedy": greedy_generate, "vcd": vcd_generate, "fmd": fmd_generate, "asd": asd_generate}


def _check_arguments(method: str, kwargs: Mapping[str, Any]) -> None:
    import inspect

    try:
        inspect.signature(_generators()[method]).bind(None, None, 1, **kwargs)
    except TypeError as error:
        raise InputError(f"method_kwargs[{method!r}]: {error}") from None


def _merge_settings(saved: Mapping[str, Any], now: Mapping[str, Any]
                    ) -> tuple[tuple[dict[str, Any], dict[str, Any]], dict[str, Any]]:
    """Compare the model, the token budget and the methods both runs have; store the union of methods."""
    common = set(saved.get("methods", {})) & set(now.get("methods", {}))
    pick = lambda d: {**{k: v for k, v in d.items() if k != "methods"},  # noqa: E731
                      "methods": {m: d["methods"][m] for m in sorted(common)}}
    store = {**dict(now), "methods": {**dict(saved.get("methods", {})), **dict(now.get("methods", {}))}}
    return (pick(dict(saved)), pick(dict(now))), store


def evaluate(
    model: "AVModel",
    dataset: "str | Path | Sequence[CaptionRecord | Mapping[str, Any]] | DatasetCheck",
    methods: Sequence[str] = METHODS,
    out: str | Path | None = None,
    *,
    max_new_tokens: int = 64,
    vocabulary: Any = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    limit: int | None = None,
    progress: bool = True,
    retry_errors: bool = False,
    overwrite: bool = False,
) -> EvalResult:
    """Caption every clip with every method; write/resume ``out`` (JSONL); return the `EvalResult`.

    ``dataset``: a file (see the module text) or records. ``method_kwargs``: per method,
    keyword arguments of its ``*_generate`` function (ASD's ``config`` may be a dict of
    `ASDConfig` fields). ``vocabulary``: for CHAIR (default: the shipped VGGSound-animals
    example). Pairs already in ``out`` are skipped, so rerunning the same call resumes it
    (``retry_errors`` recomputes the failed ones). Each clip is prepared once and shared by
    its methods; timing covers decoding only. A record that fails its checks, a clip that
    cannot be prepared or a method that fails gives error lines and the run goes on.
    ``out`` keeps the model, token budget and each method's arguments beside it
    (``<out>.settings.json``); resuming under others raises
    `analyses.store.SettingsMismatchError` unless ``overwrite=True``, which starts it again.
    """
    from tqdm.auto import tqdm

    methods = check_eval_settings(methods, method_kwargs, max_new_tokens, limit)
    extra = dict(method_kwargs or {})
    vocab = example_vocabulary() if vocabulary is None else as_vocabulary(vocabulary, None)
    records = check_caption_dataset(dataset, model).records
    if limit is not None:
        records = records[:limit]

    path = Path(out) if out is not None else None
    with contextlib.ExitStack() as stack:
        done: list[dict[str, Any]] = []
        if path is not None:
            stack.enter_context(OutputLock(path))
            if overwrite:
                remove_output(path)
            repair_tail(path)
            done = read_jsonl(path, key=_pair)
            settings = {"model": model_identity(model), "max_new_tokens": max_new_tokens,
                        "methods": {m: json.loads(json.dumps(extra.get(m, {}), default=str)) for m in methods}}
            check_settings(path, settings, has_records=bool(done), merge=_merge_settings)
        finished = {_pair(r) for r in done if not (retry_errors and r.get("status") == "error")}
        wanted = {(r.id, m) for r in records for m in methods}
        kept = {_pair(r): r for r in done if _pair(r) in wanted and _pair(r) in finished}
        todo = [(r, [m for m in methods if (r.id, m) not in finished]) for r in records]
        todo = [(r, ms) for r, ms in todo if ms]
        bar = tqdm(total=sum(len(ms) for _, ms in todo), desc="captions", disable=not progress)

        def save(row: dict[str, Any]) -> None:
            kept[_pair(row)] = row
            if path is not None:
                append_jsonl(path, row)
            bar.update(1)

        try:
            for record, pending in todo:
                if isinstance(record, InvalidRecord):
                    for method in pending:
                        save(_error_row(record.id, method, record.error_type, record.error))
                    continue
                try:
                    ex = record.prepare(model)
                except Exception as error:                      # noqa: BLE001 - the clip's failure is its record
                    for method in pending:
                        save(_error_row(record.id, method, type(error).__name__, str(error)))
                    continue
                for method in pending:
                    bar.set_postfix_str(f"{record.id} / {method}")
                    try:
                        output = run_method(model, ex, method, max_new_tokens, **extra.get(method, {}))
                        row = _record(record, method, output)
                    except Exception as error:                  # noqa: BLE001
                        row = _error_row(record.id, method, type(error).__name__, str(error))
                    save(row)
        finally:
            bar.close()
    order = {(r.id, m): i for i, (r, m) in enumerate((r, m) for r in records for m in methods)}
    rows = sorted(kept.values(), key=lambda r: order[_pair(r)])
    return EvalResult(rows, vocab, str(path) if path is not None else None)
