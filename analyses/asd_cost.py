"""What ASD costs besides hallucinations: answer accuracy, caption coverage and the errors it introduces.

CHAIR rewards captions that name fewer wrong objects, which a method can also reach by
naming fewer objects, or by changing answers it should not touch. `asd_cost` measures, for
ASD against greedy decoding (and VCD / FMD if asked):

- **multiple-choice accuracy**: the answer letter read from one next-token distribution
  (``P[o] = max(P["o"], P[" o"])``, as `option_probs`). ASD's distribution at the first
  generated position is ``log p + s (log p_guided - log p)``; its schedule starts at
  ``s_1 = first_strength`` (0 by default: **ASD never changes a one-token answer**). So the
  letter is read under several strengths (`MC_MODES`): ``greedy`` (s = 0), ``asd`` (s = s_1,
  what ASD does), ``asd_target`` (s = the schedule's target from the prompt's statistics
  ``w_1``, ``m_1``: what ASD would apply if the first token were not exempt) and ``guided``
  (s = 1, the boosted pass alone). Other methods (``vcd``, ``fmd``) answer with their first
  generated token.
- **caption coverage**: the fraction of a clip's ground-truth objects its caption names
  (mentions found with a CHAIR `Vocabulary`), beside CHAIR_s / CHAIR_i;
- **the errors a method introduces** against a baseline (greedy): answers greedy got right
  and the method gets wrong, ground-truth objects greedy named and the method drops, and
  hallucinations the method adds; the reverse (errors it fixes) is counted too.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from nnsight_av.errors import InputError

from .asd import ASDConfig, asd_generate, strength_target
from .chair import Vocabulary, as_vocabulary, chair, example_vocabulary
from .evaluate import METHODS, decoding_kwargs, run_method
from .options import letter_probs, normalize_options, option_token_ids
from .plots import plot_asd_cost
from .results import JsonResult, frame_from_records, frame_to_records

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["MC_MODES", "mixed_letter_probs", "asd_cost", "ASDCostResult"]

#: How the ASD letter is read (module text): strength 0, s_1, the first target, 1.
MC_MODES = ("greedy", "asd", "asd_target", "guided")
_MC_COLUMNS = ["clip", "method", "answer", "predicted", "correct", "p_answer", "strength"]
#: Columns of `ASDCostResult.table` counting `ASDCostResult.changes` rows of one (kind, direction).
_CHANGE_COLUMNS = {"answers_broken": ("wrong_letter", "introduced"), "answers_fixed": ("wrong_letter", "fixed"),
                   "captions_broken": ("wrong_caption", "introduced"), "captions_fixed": ("wrong_caption", "fixed"),
                   "objects_lost": ("lost_object", "introduced"),
                   "hallucinations_added": ("new_hallucination", "introduced")}
_CAPTION_COLUMNS = ["clip", "method", "caption", "ground_truth", "mentioned", "covered", "missed", "hallucinated",
                    "coverage", "exact"]


def mixed_letter_probs(
    model: "AVModel",
    inputs: "AVInputs",
    options: Any,
    config: ASDConfig = ASDConfig(),
    *,
    sinks: Any = None,
) -> dict[str, Any]:
    """Letter probabilities at the first generated position under each of `MC_MODES`.

    One `asd_generate` step with ``keep_logprobs=True`` gives the unguided and guided
    log-probabilities and the prompt's statistics; each mode mixes them with its strength.
    Returns ``{"probs": {mode: tensor [options]}, "strength": {mode: s}, "w": w_1, "m": m_1,
    "fallback": reason or ""}``. With no cross-modal sink to boost every mode equals greedy.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="Which? A, B or C. Respond with one letter.")
    >>> out = mixed_letter_probs(model, ex, "ABC", ASDConfig(sink_dims=(0, 5), tau=1.5, boost_start=1, target_start=2))
    >>> bool(torch.equal(out["probs"]["greedy"], out["probs"]["asd"])), out["strength"]["guided"]
    (True, 1.0)
    """
    if not isinstance(config, ASDConfig):
        raise InputError(f"config must be an ASDConfig, got {type(config).__name__}")
    ids = option_token_ids(model.tokenizer, options)
    out = asd_generate(model, inputs, 1, config, sinks=sinks, keep_logprobs=True)
    unguided, guided = out.logprobs[0, 0].float(), out.logprobs[0, 1].float()
    steps = out.steps
    guided_on = not steps["fallback"][0]
    w, m, c, u = (float(steps[k][0]) for k in ("w", "m", "C", "U"))
    usable = guided_on and np.isfinite(w) and np.isfinite(m) and (c + u) > 0
    strength = {"greedy": 0.0, "asd": float(steps["s"][0]),
                "asd_target": strength_target(w, m, config) if usable else 0.0, "guided": 1.0 if guided_on else 0.0}
    probs = {mode: letter_probs(unguided + s * (guided - unguided), ids) for mode, s in strength.items()}
    reason = "" if guided_on else steps["reason"][0]
    return {"probs": probs, "strength": strength, "w": w, "m": m, "fallback": reason}


# ---------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------
def _mc_item(record: Any, index: int) -> tuple[str, Any, list[str], str]:
    """``(id, prepare, letters, answer letter)`` of a multiple-choice record."""
    if isinstance(record, Mapping):
        if "inputs" not in record or "options" not in record or "answer" not in record:
            raise InputError(f"multiple-choice record {index}: a dict needs 'inputs', 'options' and 'answer'")
        inputs = record["inputs"]
        return str(record.get("id", f"mc{index}")), (lambda model: inputs), normalize_options(record["options"]), \
            str(record["answer"])
    options = getattr(record, "options", None)
    answer = getattr(record, "answer", None) or getattr(record, "label", None)
    if not options or not answer or not hasattr(record, "prepare"):
        raise InputError(f"multiple-choice record {index} ({type(record).__name__}) needs options, an answer/label "
                         "and prepare(model): a toy ToyRecord (task 'mc'), a ClipRecord or a dict")
    names = [str(o) for o in options]
    letters = names if all(len(n) == 1 for n in names) else list(string.ascii_uppercase[:len(names)])
    if str(answer) not in letters:
        raise InputError(f"multiple-choice record {getattr(record, 'id', index)!r}: answer {answer!r} is not one of "
                         f"{letters}")
    return str(getattr(record, "id", f"mc{index}")), record.prepare, letters, str(answer)


def _caption_item(record: Any, index: int) -> tuple[str, Any, list[str]]:
    if isinstance(record, Mapping):
        if "inputs" not in record or "objects" not in record:
            raise InputError(f"caption record {index}: a dict needs 'inputs' and 'objects'")
        inputs = record["inputs"]
        return str(record.get("id", f"cap{index}")), (lambda model: inputs), [str(o) for o in record["objects"]]
    objects = getattr(record, "objects", None)
    if objects is None or not hasattr(record, "prepare"):
        raise InputError(f"caption record {index} ({type(record).__name__}) needs objects and prepare(model): "
                         "a toy ToyRecord, a CaptionRecord or a dict")
    return str(getattr(record, "id", f"cap{index}")), record.prepare, [str(o) for o in objects]


def _faults(missed: Sequence[str], hallucinated: Sequence[str]) -> str:
    """What keeps a caption from being exact.

    >>> _faults(["cat"], ["pig"])
    'missed cat; hallucinated pig'
    """
    parts = [f"missed {o}" for o in missed] + [f"hallucinated {o}" for o in hallucinated]
    return "; ".join(parts) or "no ground-truth object known"


def _first_letter(text: str, letters: Sequence[str]) -> str | None:
    word = text.strip().split()[0].strip(".:)") if text.strip() else ""
    return word if word in letters else None


# ---------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------
@dataclass
class ASDCostResult(JsonResult):
    """Multiple-choice answers and captions per method, with what ASD changes against greedy.

    ``mc``: one row per (clip, method) with ``answer``, ``predicted``, ``correct``,
    ``p_answer`` (the correct letter's probability; NaN for methods that only generate) and
    ``strength``. ``captions``: one row per (clip, method) with the caption, its ground truth,
    the mentioned / covered / missed / hallucinated objects, ``coverage`` and ``exact``
    (every ground-truth object named and nothing hallucinated). ``meta``: the settings.
    """

    mc: "pd.DataFrame"
    captions: "pd.DataFrame"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(list(self.mc["method"]) + list(self.captions["method"])))

    def table(self, baseline: str = "greedy") -> "pd.DataFrame":
        """Per method: MC accuracy, caption coverage, CHAIR_s / CHAIR_i, exact captions, and against ``baseline``:
        answers and exact captions broken / fixed, ground-truth objects lost, hallucinations added."""
        import pandas as pd

        changes = self.changes(baseline) if baseline in self.methods else None
        rows = []
        for method in self.methods:
            mc = self.mc[self.mc["method"] == method]
            cap = self.captions[self.captions["method"] == method]
            mentioned = int(cap["mentioned"].map(len).sum()) if len(cap) else 0
            hallucinated = int(cap["hallucinated"].map(len).sum()) if len(cap) else 0
            row = {"method": method, "mc_clips": len(mc),
                   "mc_accuracy": float(mc["correct"].mean()) if len(mc) else float("nan"),
                   "caption_clips": len(cap),
                   "coverage": float(cap["coverage"].mean()) if len(cap) else float("nan"),
                   "CHAIR_s": float((cap["hallucinated"].map(len) > 0).mean()) if len(cap) else float("nan"),
                   "CHAIR_i": (hallucinated / mentioned if mentioned else 0.0) if len(cap) else float("nan"),
                   "exact": float(cap["exact"].mean()) if len(cap) else float("nan")}
            if changes is not None:
                counts = changes[changes["method"] == method].groupby(["kind", "direction"]).size()
                for column, key in _CHANGE_COLUMNS.items():
                    row[column] = int(counts.get(key, 0))
            rows.append(row)
        return pd.DataFrame(rows)

    def changes(self, baseline: str = "greedy") -> "pd.DataFrame":
        """Every difference from ``baseline`` that is an error introduced or fixed, one row each.

        ``kind``: ``wrong_letter`` (an answer the baseline had right and the method has wrong),
        ``wrong_caption`` (a caption the baseline had exact, every ground-truth object named and
        nothing hallucinated, and the method's is not; ``detail`` says why), ``lost_object`` (a
        ground-truth object the baseline named and the method does not), ``new_hallucination``
        (a hallucinated object the baseline did not name); ``direction``: ``introduced``, or
        ``fixed`` for the same kinds the other way round.
        """
        import pandas as pd

        if baseline not in self.methods:
            raise InputError(f"baseline {baseline!r} was not run; methods: {self.methods}")
        rows: list[dict[str, Any]] = []
        base_mc = self.mc[self.mc["method"] == baseline].set_index("clip")
        for r in self.mc[self.mc["method"] != baseline].itertuples():
            if r.clip not in base_mc.index:
                continue
            b = base_mc.loc[r.clip]
            if bool(b["correct"]) != bool(r.correct):
                rows.append({"clip": r.clip, "method": r.method, "task": "mc", "kind": "wrong_letter",
                             "direction": "introduced" if b["correct"] else "fixed",
                             "detail": f"answer {r.answer}", "baseline_output": b["predicted"], "output": r.predicted})
        base_cap = self.captions[self.captions["method"] == baseline].set_index("clip")
        for r in self.captions[self.captions["method"] != baseline].itertuples():
            if r.clip not in base_cap.index:
                continue
            b = base_cap.loc[r.clip]
            if bool(b["exact"]) != bool(r.exact):
                wrong = (r.missed, r.hallucinated) if b["exact"] else (b["missed"], b["hallucinated"])
                what = _faults(*wrong)
                rows.append({"clip": r.clip, "method": r.method, "task": "caption", "kind": "wrong_caption",
                             "direction": "introduced" if b["exact"] else "fixed", "detail": what,
                             "baseline_output": b["caption"], "output": r.caption})
            diffs = [("lost_object", "introduced", sorted(set(b["covered"]) - set(r.covered))),
                     ("lost_object", "fixed", sorted(set(r.covered) - set(b["covered"]))),
                     ("new_hallucination", "introduced", sorted(set(r.hallucinated) - set(b["hallucinated"]))),
                     ("new_hallucination", "fixed", sorted(set(b["hallucinated"]) - set(r.hallucinated)))]
            for kind, direction, objects in diffs:
                for obj in objects:
                    rows.append({"clip": r.clip, "method": r.method, "task": "caption", "kind": kind,
                                 "direction": direction, "detail": obj, "baseline_output": b["caption"],
                                 "output": r.caption})
        return pd.DataFrame(rows, columns=["clip", "method", "task", "kind", "direction", "detail",
                                           "baseline_output", "output"])

    def errors(self, baseline: str = "greedy") -> "pd.DataFrame":
        """The errors each method introduces against ``baseline`` (`changes` with direction "introduced")."""
        frame = self.changes(baseline)
        return frame[frame["direction"] == "introduced"].drop(columns="direction").reset_index(drop=True)

    def to_frame(self) -> "pd.DataFrame":
        """One row per (task, clip, method): the ``mc`` rows then the ``captions`` rows, with a ``task`` column
        ("mc" or "caption"); columns of the other task are empty."""
        import pandas as pd

        parts = [self.mc.assign(task="mc"), self.captions.assign(task="caption")]
        frame = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
        return frame[["task"] + [c for c in frame.columns if c != "task"]]

    def summary(self, baseline: str = "greedy") -> "pd.DataFrame":
        """Per method: accuracy, coverage, CHAIR and errors introduced / fixed against ``baseline``: `table`."""
        return self.table(baseline)

    def report(self, baseline: str = "greedy") -> str:
        """A few lines: accuracy, coverage, CHAIR and errors introduced / fixed per method.

        This was ``summary()`` before the result protocol made ``summary()`` a DataFrame.
        """
        table = self.table(baseline)
        lines = [f"ASD cost: {self.mc['clip'].nunique()} multiple-choice clips, "
                 f"{self.captions['clip'].nunique()} caption clips (baseline {baseline})"]
        for r in table.itertuples():
            text = f"  {r.method:<11}"
            if r.mc_clips:
                text += f" MC accuracy {r.mc_accuracy:.3f}"
            if r.caption_clips:
                text += f" | coverage {r.coverage:.3f}, CHAIR_s {r.CHAIR_s:.3f}, CHAIR_i {r.CHAIR_i:.3f}"
            if hasattr(r, "answers_broken") and r.method != baseline:
                if r.mc_clips:
                    text += f" | answers broken {r.answers_broken}, fixed {r.answers_fixed}"
                if r.caption_clips:
                    text += (f" | captions broken {r.captions_broken}, fixed {r.captions_fixed}; objects lost "
                             f"{r.objects_lost}, hallucinations added {r.hallucinations_added}")
            lines.append(text)
        if "asd" in set(self.mc["method"]):
            s1 = self.mc.loc[self.mc["method"] == "asd", "strength"]
            if (s1 == 0).all():
                lines.append("  note: ASD's first-token strength s_1 is 0, so its MC answers equal greedy's by "
                             "construction; asd_target / guided show the mixing at the first token")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ASDCostResult(methods={self.methods}, mc_clips={self.mc['clip'].nunique()}, "
                f"caption_clips={self.captions['clip'].nunique()})")

    def _repr_html_(self) -> str:
        return f"<b>{self!r}</b>" + self.table().to_html(index=False, float_format=lambda v: f"{v:.3f}")

    def plot(self, baseline: str = "greedy") -> "Figure":
        """MC accuracy and caption coverage / CHAIR_i / exact per method; see `analyses.plots.plot_asd_cost`."""
        return plot_asd_cost(self, baseline)

    # -- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ASDCostResult", "meta": self.meta, "mc": frame_to_records(self.mc),
                "captions": frame_to_records(self.captions)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ASDCostResult":
        return cls(frame_from_records(data["mc"], _MC_COLUMNS), frame_from_records(data["captions"], _CAPTION_COLUMNS),
                   dict(data.get("meta", {})))


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
def _coverage_row(clip: str, method: str, caption: str, truth: list[str], vocab: Vocabulary) -> dict[str, Any]:
    detail = chair([caption], [truth], vocab).captions[0]
    known = list(dict.fromkeys(c for c in (vocab.canonical(t) for t in truth) if c is not None))
    covered = [o for o in known if o in detail.objects]
    missed = [o for o in known if o not in detail.objects]
    return {"clip": clip, "method": method, "caption": caption, "ground_truth": known, "mentioned": detail.objects,
            "covered": covered, "missed": missed, "hallucinated": detail.hallucinated,
            "coverage": len(covered) / len(known) if known else float("nan"),
            "exact": bool(known) and not missed and not detail.hallucinated}


def asd_cost(
    model: "AVModel",
    mc: Sequence[Any] = (),
    captions: Sequence[Any] = (),
    methods: Sequence[str] = ("greedy", "asd"),
    *,
    config: ASDConfig | Mapping[str, Any] = ASDConfig(),
    mc_modes: Sequence[str] = MC_MODES,
    vocabulary: Any = None,
    max_new_tokens: int = 32,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> ASDCostResult:
    """ASD against greedy (and ``vcd`` / ``fmd``) on answers and captions (module text).

    ``mc``: multiple-choice records (toy `ToyRecord` of task "mc", `ClipRecord`, or dicts
    ``{"id", "inputs", "options", "answer"}``); the letter of ``greedy`` / ``asd`` is read
    under each of ``mc_modes`` (rows named ``greedy``, ``asd``, ``asd_target``, ``guided``),
    other methods answer with their first generated token. ``captions``: records with
    ground-truth ``objects`` (toy `ToyRecord`, `CaptionRecord`, or dicts ``{"id", "inputs",
    "objects"}``), captioned by every method with ``max_new_tokens``. ``config``: ASD's
    settings (an `ASDConfig` or a dict of its fields). ``vocabulary``: the CHAIR vocabulary
    (default: the shipped VGGSound-animals one; for toy clips pass
    ``sorted(nnsight_av.toy.OBJECT_WORDS)``); an `InputError` if it knows none of the
    ground-truth objects. ``method_kwargs``: per method, arguments of its ``*_generate``.

    >>> import nnsight_av as nav
    >>> from nnsight_av import toy
    >>> model = nav.testing.tiny_model()
    >>> res = asd_cost(model, mc=toy.make_dataset(1, seed=0, task="mc", seconds=2.0),
    ...                config=ASDConfig(sink_dims=(0, 5), tau=1.5, boost_start=1, target_start=2), progress=False)
    >>> list(res.mc["method"])
    ['greedy', 'asd', 'asd_target', 'guided']
    """
    from tqdm.auto import tqdm

    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"methods must be some of {list(METHODS)}, got {list(methods)}")
    bad_modes = [m for m in mc_modes if m not in MC_MODES]
    if bad_modes or not mc_modes:
        raise InputError(f"mc_modes must be some of {list(MC_MODES)}, got {list(mc_modes)}")
    if not mc and not captions:
        raise InputError("nothing to evaluate: pass mc= and/or captions= records")
    if isinstance(config, Mapping):
        config = ASDConfig.from_dict(config)
    if not isinstance(config, ASDConfig):
        raise InputError(f"config must be an ASDConfig or a dict of its fields, got {type(config).__name__}")
    extra = {m: decoding_kwargs(m, kw) for m, kw in dict(method_kwargs or {}).items()}
    bad = sorted(set(extra) - set(methods))
    if bad:
        raise InputError(f"method_kwargs for methods that are not run: {bad}")
    config = extra.setdefault("asd", {}).setdefault("config", config)      # one ASD setting for answers and captions
    mc_items = [_mc_item(r, i) for i, r in enumerate(mc)]
    cap_items = [_caption_item(r, i) for i, r in enumerate(captions)]
    vocab = example_vocabulary() if vocabulary is None else as_vocabulary(vocabulary, None)
    if cap_items and not any(vocab.canonical(o) for _, _, objects in cap_items for o in objects):
        raise InputError(f"the CHAIR vocabulary {vocab.name!r} knows none of the captions' ground-truth objects; "
                         "pass vocabulary= (for toy clips: sorted(nnsight_av.toy.OBJECT_WORDS))")

    import pandas as pd

    mc_rows: list[dict[str, Any]] = []
    cap_rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(mc_items) + len(cap_items), desc="ASD cost", disable=not progress)
    try:
        for clip, prepare, letters, answer in mc_items:
            ex = prepare(model)
            k = letters.index(answer)
            if "greedy" in methods or "asd" in methods:
                mixed = mixed_letter_probs(model, ex, letters, config)
                modes = [m for m in mc_modes if (m == "greedy" and "greedy" in methods)
                         or (m != "greedy" and "asd" in methods)]
                for mode in modes:
                    p = mixed["probs"][mode]
                    predicted = letters[int(p.argmax())]
                    mc_rows.append({"clip": clip, "method": mode, "answer": answer, "predicted": predicted,
                                    "correct": predicted == answer, "p_answer": float(p[k]),
                                    "strength": mixed["strength"][mode]})
            for method in methods:
                if method in ("greedy", "asd"):
                    continue
                out = run_method(model, ex, method, 1, **extra.get(method, {}))
                predicted = _first_letter(out.text, letters)
                mc_rows.append({"clip": clip, "method": method, "answer": answer, "predicted": predicted,
                                "correct": predicted == answer, "p_answer": float("nan"), "strength": float("nan")})
            bar.update(1)
        for clip, prepare, objects in cap_items:
            ex = prepare(model)
            for method in methods:
                bar.set_postfix_str(f"{clip} / {method}")
                out = run_method(model, ex, method, max_new_tokens, **extra.get(method, {}))
                cap_rows.append(_coverage_row(clip, method, out.text, objects, vocab))
            bar.update(1)
    finally:
        bar.close()
    meta = {"methods": methods, "mc_modes": list(mc_modes), "config": config.to_dict(),
            "max_new_tokens": max_new_tokens, "vocabulary": vocab.name}
    return ASDCostResult(pd.DataFrame(mc_rows, columns=_MC_COLUMNS), pd.DataFrame(cap_rows, columns=_CAPTION_COLUMNS),
                         meta)
