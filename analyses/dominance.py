"""The unimodal-dominance test (METHOD.md section 4).

Each clip is answered three times with exactly the same prompt text: ``av`` (both
modalities), ``a`` (video removed: black frames) and ``v`` (audio removed: silence).

- audio-dominant: ``answer(av) == answer(a) != answer(v)``;
- video-dominant: ``answer(av) == answer(v) != answer(a)``;
- otherwise neither. With ``correctness=True`` a dominant clip must also have
  ``answer(av) == label``.

Answers are the argmax of `option_probs` (one forward, no ``generate``); the three runs
of a clip share one batched forward.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from nnsight_av.errors import InputError
from nnsight_av.inputs import AVInputs

from .ablation import ablate
from .clips import error_record, run_clips
from .datasets import ClipRecord, InvalidRecord, check_dataset
from .options import normalize_options, option_probs
from .plots import plot_dominance
from .results import RecordsResult
from .store import model_identity

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["dominance", "dominance_label", "clip_dominance", "DominanceResult", "LABELS"]

LABELS = ("audio", "video", "neither")


def dominance_label(answers: Mapping[str, str], label: str | None = None, correctness: bool = False) -> str:
    """``"audio"``, ``"video"`` or ``"neither"`` from the ``av`` / ``a`` / ``v`` answers.

    >>> dominance_label({"av": "B", "a": "B", "v": "C"}), dominance_label({"av": "B", "a": "C", "v": "B"})
    ('audio', 'video')
    >>> dominance_label({"av": "B", "a": "B", "v": "B"}), dominance_label({"av": "B", "a": "B", "v": "C"}, "A", True)
    ('neither', 'neither')
    """
    missing = [k for k in ("av", "a", "v") if k not in answers]
    if missing:
        raise InputError(f"answers need the keys av, a and v; missing {missing}")
    av, a, v = answers["av"], answers["a"], answers["v"]
    if correctness:
        if label is None:
            raise InputError("correctness=True needs the clip's label")
        if av != label:
            return "neither"
    if av == a and av != v:
        return "audio"
    if av == v and av != a:
        return "video"
    return "neither"


def clip_dominance(
    model: "AVModel",
    clip: "ClipRecord | AVInputs",
    options: Any = None,
    *,
    label: str | None = None,
    correctness: bool = False,
    method: str = "raw",
) -> dict[str, Any]:
    """The dominance record of one clip: letter probabilities and answers of av / a / v, and the label."""
    if isinstance(clip, ClipRecord):
        clean = clip.prepare(model)
        options = clip.options if options is None else options
        label = clip.label if label is None else label
    elif isinstance(clip, AVInputs):
        clean = clip
        if options is None:
            raise InputError("pass options= (the answer letters) for prepared inputs")
    else:
        raise InputError(f"a clip must be a ClipRecord or AVInputs, got {type(clip).__name__}")
    letters = normalize_options(options)
    runs = [clean, ablate(clean, "video", model, method=method), ablate(clean, "audio", model, method=method)]
    probs = option_probs(model, runs, letters)
    answers = {name: letters[int(p.argmax())] for name, p in zip(("av", "a", "v"), probs)}
    return {"status": "ok", "dominance": dominance_label(answers, label, correctness), "answers": answers,
            "probs": {name: p.tolist() for name, p in zip(("av", "a", "v"), probs)}, "options": letters,
            "label": label, "correct": {k: a == label for k, a in answers.items()} if label is not None else None,
            "method": method}


@dataclass
class DominanceResult(RecordsResult):
    """Per-clip dominance records (as saved in the JSONL), with a pandas view and counts."""

    records: list[dict[str, Any]]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status", "ok") == "ok" and "dominance" in r]

    def ids(self, which: str) -> list[str]:
        """Clip ids labelled ``which`` ("audio", "video" or "neither")."""
        if which not in LABELS:
            raise InputError(f"which must be one of {LABELS}, got {which!r}")
        return [str(r["id"]) for r in self.ok if r["dominance"] == which]

    def counts(self) -> dict[str, int]:
        out = {name: 0 for name in LABELS}
        for r in self.ok:
            out[r["dominance"]] += 1
        out["error"] = len(self.records) - len(self.ok)
        return out

    @property
    def frame(self) -> "pd.DataFrame":
        """One row per clip: id, status, dominance, the three answers, P(answer) per run, label."""
        import pandas as pd

        rows = []
        for r in self.records:
            row = {"id": r.get("id"), "status": r.get("status", "ok"), "dominance": r.get("dominance"),
                   "label": r.get("label"), "error": r.get("error")}
            for run in ("av", "a", "v"):
                answer = (r.get("answers") or {}).get(run)
                row[f"answer_{run}"] = answer
                probs, options = (r.get("probs") or {}).get(run), r.get("options")
                row[f"p_{run}"] = probs[options.index(answer)] if probs and answer in (options or []) else None
            rows.append(row)
        return pd.DataFrame(rows).set_index("id")

    def to_frame(self) -> "pd.DataFrame":
        """The tidy table: one row per clip (``frame`` with ``id`` as a column)."""
        return self.frame.reset_index()

    def summary(self) -> "pd.DataFrame":
        """One row per label (audio, video, neither, error) with its clip count."""
        import pandas as pd

        return pd.DataFrame(list(self.counts().items()), columns=["dominance", "clips"])

    def plot(self, ax: Any = None) -> "Figure":
        """Clips per dominance label; see `analyses.plots.plot_dominance`."""
        return plot_dominance(self, ax=ax)

    def __repr__(self) -> str:
        return f"DominanceResult({self.counts()})"


def dominance(
    model: "AVModel",
    dataset: "str | os.PathLike | Iterable[Any] | Sequence[AVInputs]",
    options: Any = None,
    *,
    out: str | os.PathLike | None = None,
    correctness: bool = False,
    method: str = "raw",
    labels: Sequence[str | None] | None = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> DominanceResult:
    """Label each clip audio-dominant, video-dominant or neither (three runs per clip, same prompt).

    ``dataset``: a JSON / JSONL file, clip records (dicts or `ClipRecord`), or prepared
    `AVInputs` (then give ``options``, and ``labels`` for the correctness switch).
    ``out``: a JSONL file; each clip's record is appended as soon as it is done and a rerun
    resumes (see `analyses.runner.run_clips`, which also shards over ``RANK``/``WORLD_SIZE``).
    ``method``: ``"raw"`` (black frames / silence) or ``"encoder"`` (zeroed encoder outputs).

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="What is making the sound?")
    >>> res = dominance(model, [ex], "ABCD", progress=False)
    >>> sorted(res.records[0]["answers"]), res.records[0]["dominance"] in LABELS
    (['a', 'av', 'v'], True)
    """
    items = list(dataset) if not isinstance(dataset, (str, os.PathLike)) else None
    if items is not None and items and all(isinstance(x, AVInputs) for x in items):
        if labels is not None and len(labels) != len(items):
            raise InputError(f"labels has {len(labels)} entries for {len(items)} inputs")
        records = []
        for i, item in enumerate(items):
            label = labels[i] if labels is not None else None
            records.append({"id": f"clip{i}", **clip_dominance(model, item, options, label=label,
                                                               correctness=correctness, method=method)})
        if out is not None:
            DominanceResult(records).save(out)
        return DominanceResult(records)
    clips = check_dataset(dataset if items is None else items, model).records

    def one(record: ClipRecord) -> dict[str, Any]:
        return clip_dominance(model, record, options, correctness=correctness, method=method)

    if out is None:
        from tqdm.auto import tqdm

        results = []
        for record in tqdm(clips, desc="dominance", disable=not progress or len(clips) < 2):
            if isinstance(record, InvalidRecord):
                results.append(error_record(record.id, InputError(record.error)) | {"error_type": record.error_type})
                continue
            try:
                results.append({"id": record.id, **one(record)})
            except Exception as error:                      # noqa: BLE001 - a clip's failure is its record
                results.append(error_record(record.id, error))
        return DominanceResult(results)
    settings = {"kind": "dominance", "method": method, "correctness": correctness,
                "options": json.loads(json.dumps(options, default=str)), "model": model_identity(model)}
    return DominanceResult(run_clips(clips, one, out, rank=rank, world_size=world_size, progress=progress,
                                     desc="dominance", settings=settings))
