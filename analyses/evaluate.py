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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from nnsight_av.errors import InputError, MediaError

from .asd import ASDConfig, asd_generate
from .decoding import fmd_generate, greedy_generate, vcd_generate
from .chair import ChairResult, Vocabulary, as_vocabulary, chair, example_vocabulary

if TYPE_CHECKING:
    import pandas as pd

    from nnsight_av import AVInputs, AVModel

__all__ = ["CAPTION_PROMPT", "METHODS", "CaptionRecord", "read_caption_dataset", "write_caption_dataset",
           "EvalResult", "evaluate", "run_method"]

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
        if not isinstance(data, Mapping):
            raise InputError(f"record {index}: expected a JSON object, got {type(data).__name__}")
        clip_id = str(data.get("id", f"{index:06d}"))
        objects = data.get("objects", data.get("ground_truth"))
        if objects is None:
            raise InputError(f"record {clip_id!r}: 'objects' (the ground-truth objects) is missing")
        objects = [objects] if isinstance(objects, str) else [str(o) for o in objects]
        video, audio = data.get("video"), data.get("audio")
        if video is None and audio is None:
            raise InputError(f"record {clip_id!r}: no 'video' and no 'audio'")
        known = {"id", "objects", "ground_truth", "video", "audio", "prompt", "fps", "audio_rate"}
        return cls(clip_id, objects, video, audio, str(data.get("prompt") or CAPTION_PROMPT), data.get("fps"),
                   data.get("audio_rate"), str(root) if root is not None else None,
                   {k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "video": self.video, "audio": self.audio, "prompt": self.prompt, "objects": self.objects}
        for key in ("fps", "audio_rate"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **self.extra}

    def _media(self, value: str, what: str) -> Any:
        path = Path(value)
        if not path.is_absolute() and self.root is not None:
            path = Path(self.root) / path
        if not path.exists():
            raise MediaError(f"clip {self.id!r}: {what} file not found: {str(path)!r}")
        return np.load(path, allow_pickle=False) if path.suffix == ".npy" else str(path)

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


def read_caption_dataset(path: str | Path) -> list[CaptionRecord]:
    """Records of a JSON / JSONL data set (see the module text); ids must be unique."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no data set file at {path}")
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        rows = data["clips"] if isinstance(data, Mapping) and "clips" in data else data
        if not isinstance(rows, list):
            raise InputError(f"{path}: a JSON data set is a list of records or {{'clips': [...]}}")
    records = [CaptionRecord.from_dict(row, path.parent, i) for i, row in enumerate(rows)]
    ids = [r.id for r in records]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(f"{path}: duplicate clip ids {duplicates[:5]}")
    return records


def write_caption_dataset(records: Sequence[CaptionRecord | Mapping[str, Any]], path: str | Path) -> Path:
    """Write records as JSONL."""
    path = Path(path)
    lines = [json.dumps(r.to_dict() if isinstance(r, CaptionRecord) else dict(r)) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def _method_kwargs(method: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if method == "asd" and isinstance(kwargs.get("config"), Mapping):
        kwargs["config"] = ASDConfig.from_dict(kwargs["config"])
    return kwargs


def run_method(model: "AVModel", inputs: "AVInputs", method: str, max_new_tokens: int = 64, **kwargs: Any) -> Any:
    """One decoding method by name ("greedy", "vcd", "fmd", "asd") on one prepared input."""
    functions: dict[str, Callable[..., Any]] = {"greedy": greedy_generate, "vcd": vcd_generate,
                                                "fmd": fmd_generate, "asd": asd_generate}
    if method not in functions:
        raise InputError(f"unknown decoding method {method!r}; choose from {sorted(functions)}")
    return functions[method](model, inputs, max_new_tokens, **_method_kwargs(method, kwargs))


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break                                   # a line cut off by an interruption: redo that pair
    return rows


@dataclass
class EvalResult:
    """Captions of every (clip, method) pair and the CHAIR / speed table.

    ``records``: one dict per pair (``id``, ``method``, ``caption``, ``objects``, ``ms``,
    ``num_new_tokens``, ...); ``vocabulary``: the CHAIR vocabulary used by `table`.
    """

    records: list[dict[str, Any]]
    vocabulary: Vocabulary
    path: str | None = None

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.records))

    def chair(self, method: str, vocabulary: Any = None, per_mention: bool = False) -> ChairResult:
        rows = [r for r in self.records if r["method"] == method]
        if not rows:
            raise InputError(f"no captions for method {method!r}; have {self.methods}")
        vocab = self.vocabulary if vocabulary is None else as_vocabulary(vocabulary, None)
        return chair([r["caption"] for r in rows], [r["objects"] for r in rows], vocab, per_mention=per_mention)

    def table(self, vocabulary: Any = None, per_mention: bool = False) -> "pd.DataFrame":
        """Per method: clips, CHAIR_s, CHAIR_i, mentions, mean new tokens, ms per token (total ms / tokens)."""
        import pandas as pd

        rows = []
        for method in self.methods:
            mine = [r for r in self.records if r["method"] == method]
            res = self.chair(method, vocabulary, per_mention)
            tokens = sum(r["num_new_tokens"] for r in mine)
            rows.append({"method": method, "clips": len(mine), "CHAIR_s": res.chair_s, "CHAIR_i": res.chair_i,
                         "mentions": res.num_mentions, "tokens_per_caption": tokens / len(mine),
                         "ms_per_token": sum(r["ms"] for r in mine) / max(1, tokens)})
        return pd.DataFrame(rows)

    def captions(self) -> "pd.DataFrame":
        """One row per clip, one column per method."""
        import pandas as pd

        frame = pd.DataFrame(self.records)
        return frame.pivot(index="id", columns="method", values="caption")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        return path

    @classmethod
    def load(cls, path: str | Path, vocabulary: Any = None) -> "EvalResult":
        vocab = example_vocabulary() if vocabulary is None else as_vocabulary(vocabulary, None)
        return cls(_read_jsonl(Path(path)), vocab, str(path))

    def _repr_html_(self) -> str:
        return self.table().to_html(index=False, float_format=lambda v: f"{v:.4f}")


def evaluate(
    model: "AVModel",
    dataset: str | Path | Sequence[CaptionRecord | Mapping[str, Any]],
    methods: Sequence[str] = METHODS,
    out: str | Path | None = None,
    *,
    max_new_tokens: int = 64,
    vocabulary: Any = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Caption every clip with every method; write/resume ``out`` (JSONL); return the `EvalResult`.

    ``dataset``: a file (see the module text) or records. ``method_kwargs``: per method,
    keyword arguments of its ``*_generate`` function (ASD's ``config`` may be a dict of
    `ASDConfig` fields). ``vocabulary``: for CHAIR (default: the shipped VGGSound-animals
    example). Pairs already in ``out`` are skipped, so rerunning the same call resumes it.
    Each clip is prepared once and shared by its methods; timing covers decoding only.
    """
    from tqdm.auto import tqdm

    if isinstance(dataset, (str, Path)):
        records = read_caption_dataset(dataset)
    else:
        records = [r if isinstance(r, CaptionRecord) else CaptionRecord.from_dict(r, None, i)
                   for i, r in enumerate(dataset)]
    if limit is not None:
        records = records[:limit]
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise InputError("no decoding method given")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown decoding methods {unknown}; choose from {list(METHODS)}")
    extra = dict(method_kwargs or {})
    bad = sorted(set(extra) - set(methods))
    if bad:
        raise InputError(f"method_kwargs for methods that are not run: {bad}")
    vocab = example_vocabulary() if vocabulary is None else as_vocabulary(vocabulary, None)

    path = Path(out) if out is not None else None
    done = _read_jsonl(path) if path is not None else []
    if path is not None and path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in done))       # drop a cut-off last line
    finished = {(r["id"], r["method"]) for r in done}
    wanted = {(r.id, m) for r in records for m in methods}
    rows = [r for r in done if (r["id"], r["method"]) in wanted]
    todo = [(r, [m for m in methods if (r.id, m) not in finished]) for r in records]
    todo = [(r, ms) for r, ms in todo if ms]
    bar = tqdm(total=sum(len(ms) for _, ms in todo), desc="captions", disable=not progress)
    handle = path.open("a") if path is not None else None
    try:
        for record, pending in todo:
            ex = record.prepare(model)
            for method in pending:
                bar.set_postfix_str(f"{record.id} / {method}")
                output = run_method(model, ex, method, max_new_tokens, **extra.get(method, {}))
                row = _record(record, method, output)
                rows.append(row)
                if handle is not None:
                    handle.write(json.dumps(row) + "\n")
                    handle.flush()
                bar.update(1)
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    order = {(r.id, m): i for i, (r, m) in enumerate((r, m) for r in records for m in methods)}
    rows.sort(key=lambda r: order[(r["id"], r["method"])])
    return EvalResult(rows, vocab, str(path) if path is not None else None)
