"""``nnsight-av demo``: the paper's pipeline end to end on an offline model, written to a report folder.

Steps (METHOD.md sections 2-6): sink dimensions, sinks and MDS with the cross-modal / unimodal
split, unimodal dominance (av / a / v), causal tracing by token set on the dominant clips, and ASD
against greedy captions scored with CHAIR. Clips come from the toy world (`nnsight_av.toy`), so the
same command runs on any model (``--model PATH``). The default model is smol-omni (SmolLM2-135M
with trained encoders: a real pretrained language model with a massive-activation channel); the
report's findings table says, for each of the paper's findings, whether this run reproduces it,
with the numbers beside the paper's, and "not measurable here" where a finding depends on sinks
the model does not have.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .model import AVModel

#: Default sizes: the whole demo on smol-omni within 3 minutes on 2 CPU cores (``--clips`` for more).
DEMO_CLIPS, DEMO_CAPTIONS, DEMO_MAX_NEW_TOKENS = 4, 2, 12
TOKEN_SETS = ("all", "sink", "random", "cross_modal_sink", "unimodal_sink")


def load_model(name: str, device: str = "cpu") -> AVModel:
    """'default' (smol-omni, else toy-omni), 'smol-omni', 'toy-omni', 'tiny' (random weights, said on stderr),
    or a checkpoint (a name that is none of these is refused at once, see `nnsight_av.loading.check_model_name`).

    'default' takes smol-omni (SmolLM2-135M with trained encoders; its GGUF is fetched once on first
    use) and falls back to the shipped toy-omni, with one line saying why, when the GGUF cannot be had.
    """
    import sys

    from . import testing
    from .errors import WeightsChecksumError, WeightsUnavailableError
    from .loading import check_model_name, load

    check_model_name(name)
    if name == "tiny":
        print("warning: model 'tiny' has random weights: its answers and captions mean nothing (use it to test the "
              "plumbing; 'toy-omni' is the shipped trained model)", file=sys.stderr)
        model = testing.tiny_model()
    elif name == "default":
        try:
            model = load("smol-omni")
        except WeightsChecksumError:
            raise  # a corrupt download is an error to see, not a reason to quietly switch models
        except WeightsUnavailableError as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"smol-omni unavailable ({reason}); running the demo on toy-omni instead")
            model = _toy_or_tiny()
    elif name == "toy-omni":
        model = load("toy-omni")
    else:
        model = load(name, device_map=device if device != "cpu" else None)
    return model.to(device) if device != "cpu" else model


def _toy_or_tiny() -> AVModel:
    from . import testing
    from .errors import UnknownModelError
    from .loading import load

    try:
        return load("toy-omni")
    except (ImportError, FileNotFoundError, OSError, UnknownModelError):
        print("the toy model is not installed either; using random tiny weights")
        return testing.tiny_model()


def _clip_records(n: int, seed: int) -> tuple[list[Any], list[Any]]:
    from analyses.datasets import ClipRecord

    from . import toy

    mc = toy.make_dataset(n, seed=seed, task="mc")
    letters = list(toy.LETTERS[: len(mc[0].options)])
    records = [ClipRecord(id=r.id, prompt=r.prompt, options=letters, label=r.answer, option_names=list(r.options),
                          fps=r.fps, frames=r.frames, wave=r.audio, extra={"entity": r.entity,
                                                                            "identified_by": r.identified_by})
               for r in mc]
    return mc, records


def _caption_records(n: int, seed: int, folder: Path) -> list[Any]:
    from analyses.evaluate import CaptionRecord

    from . import toy

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for r in toy.make_dataset(n, seed=seed + 1, task="caption"):
        np.save(folder / f"{r.id}.frames.npy", r.frames)
        np.save(folder / f"{r.id}.audio.npy", r.audio)
        out.append(CaptionRecord(id=r.id, objects=list(r.objects), video=f"{r.id}.frames.npy",
                                 audio=f"{r.id}.audio.npy", prompt=r.prompt, fps=r.fps, root=str(folder)))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4f}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return lines


def _fresh_if_changed(run: Any) -> Any:
    """A report folder is the demo's own: a rerun resumes its files, or starts them again under other settings."""
    from analyses.store import SettingsMismatchError

    try:
        return run(False)
    except SettingsMismatchError as error:
        print(f"{str(error).splitlines()[0]} -> computed again")
        return run(True)


def run_demo(model: str = "default", out: Path | str = "nnsight_av_report", clips: int = DEMO_CLIPS,
             device: str = "cpu", seed: int = 0, captions: int = DEMO_CAPTIONS,
             max_new_tokens: int = DEMO_MAX_NEW_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Run the pipeline and write ``report.md``, ``report.json`` and figures (PNG) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import analyses

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    m = load_model(model, device)
    print(f"model: {m!r}")
    t = time.perf_counter()
    toy_records, records = _clip_records(clips, seed)
    examples = [r.prepare(m) for r in records]
    print(f"{len(records)} toy clips, {len(examples[0])} tokens each: {examples[0].spans!r}")
    t = lap("clips", t)

    # 1. sink dimensions and sinks + MDS (METHOD.md sections 2-3)
    # Two clips are enough to see a massive channel (it is on every input's first token); each is a forward.
    found = analyses.find_sink_dims(m, examples[:2], progress=progress)
    dims = found or list(m.adapter.known_sink_dims() or [])
    sink_config = analyses.SinkConfig(dims=dims or None)      # METHOD.md's tracing defaults (N = 2, rank split)
    analysis = analyses.sink_analysis(m, examples, progress=progress, **sink_config.search_kwargs())
    sinks = [a[0] for a in analysis]
    mds = [a[1] for a in analysis]
    splits = [s.split(sink_config.split_rule) for s in mds]
    mds_summary = analyses.mds_summary(mds) if hasattr(analyses, "mds_summary") else None
    t = lap("sinks_mds", t)

    # 2. dominance and causal tracing (sections 4-5), resumable JSONL in the report folder
    pipeline = _fresh_if_changed(lambda overwrite: analyses.trace_dataset(
        m, records, out / "trace.jsonl", progress=progress, token_sets=TOKEN_SETS, sinks=sink_config,
        overwrite=overwrite))
    counts = pipeline.dominance.counts()
    trace = pipeline.trace
    t = lap("dominance_tracing", t)

    # 3. ASD vs greedy captions, CHAIR (section 6)
    caption_records = _caption_records(captions, seed, out / "caption_clips")
    evaluation = _fresh_if_changed(lambda overwrite: analyses.evaluate(
        m, caption_records, methods=("greedy", "asd"), out=out / "captions.jsonl", max_new_tokens=max_new_tokens,
        progress=progress, overwrite=overwrite))
    eval_table = evaluation.table()
    t = lap("captions", t)

    # figures
    figures = {}

    def save(fig: Any, name: str) -> None:
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        figures[name.rsplit(".", 1)[0]] = name
        plt.close(fig)

    profile = sink_profile(sinks)
    save(plot_sink_profile(profile), "sink_ratio.png")
    save(analyses.plot_sink_mask(sinks[0], title=f"sink mask of clip {records[0].id} ({sinks[0].criterion} "
                                                 f"criterion, tau={sinks[0].tau:g}, dims {sinks[0].dims})"),
         "sink_mask.png")
    no_media_sinks = not any(len(s.video) + len(s.audio) for s in sinks)
    why = " (no media sinks: the massive activation stays on the first token)" if no_media_sinks else ""
    save(analyses.plot_mds_heatmap(mds[0], title=f"MDS per layer, clip {records[0].id}{why}"), "mds_heatmap.png")
    save(analyses.plot_mds_distribution(mds, title=f"MDS of media sinks over {len(mds)} clips{why}"),
         "mds_distribution.png")
    if trace is not None:
        fig = trace.plot_bars()
        fig.axes[0].set_title(f"causal tracing by token set ({len(trace.effects['clip'].unique())} dominant clips; "
                              "empty sets patch nothing)", fontsize=9)
        fig.axes[0].set_xlabel("token set patched from the clean run")
        tokens = trace.table()["tokens"]
        ticks = fig.axes[0].get_xticks()
        fig.axes[0].set_xticks(ticks, [f"{name}\n(empty: 0 tokens)" if tokens[name] == 0 else f"{name}\n"
                                       f"({tokens[name]:.0f} tokens)" for name in tokens.index], rotation=30, ha="right")
        save(fig, "trace_bars.png")
    else:
        save(analyses.plots.no_data(analyses.plots.figure(6, 3), "no data: no audio- or video-dominant clip to trace",
                                    "causal tracing by token set"), "trace_bars.png")

    # numbers
    trace_rows = []
    if trace is not None:
        table = trace.table()
        trace_rows = [{"token_set": name, **{c: float(v) for c, v in row.items()}} for name, row in table.iterrows()]
    report: dict[str, Any] = {
        "model": repr(m),
        "clips": len(records),
        "tokens_per_clip": len(examples[0]),
        "sink_dims": {"found": found, "used": dims, "known": m.adapter.known_sink_dims()},
        "sinks_per_clip": [{"id": r.id, "video": len(s.video), "audio": len(s.audio),
                            "av": len(sp.av), "va": len(sp.va), "aa": len(sp.aa), "vv": len(sp.vv)}
                           for r, s, sp in zip(records, sinks, splits)],
        "mds_summary": json.loads(mds_summary.to_json(orient="records")) if mds_summary is not None else None,
        "dominance": counts,
        "accuracy_av": float(np.mean([r["answers"]["av"] == r["label"] for r in pipeline.records
                                      if r.get("status") == "ok"])),
        "trace_x100": trace_rows,
        "captions": json.loads(eval_table.to_json(orient="records")),
        "caption_notes": evaluation.notes(),
        "asd": _asd_summary(evaluation.records),
        "sink_ratio": profile,
        "figures": figures,
        "timings_s": timings,
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["findings"] = _findings(report)
    report["notes"] = _notes(report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    print(_summary(report))
    print(f"report written to {out}/ in {report['seconds']:.1f} s")
    return report


_PROFILE_GROUPS = ("first token", "text", "video", "audio")


def sink_profile(sinks: Any) -> dict[str, Any]:
    """Per layer, each token's sink score over the median token's, summarised by token group.

    ``sinks``: `analyses.SinkResult`s (e.g. from `analyses.find_sinks` or `analyses.sink_analysis`);
    with the ``"magnitude"`` criterion their ``scores`` are raw ``|h|`` in the sink dims. Groups:
    the first token, the other text tokens, video and audio tokens. Per group and layer: the
    median over clips of the group's median and of its max ratio. JSON-ready.

    >>> import torch
    >>> from analyses.sinks import SinkResult
    >>> res = SinkResult(torch.tensor([[400.0, 2.0, 1.0, 1.5]]), [3], [7], 20.0, 2.0, ".VA.", criterion="magnitude")
    >>> profile = sink_profile([res])
    >>> profile["layers"], round(profile["max"]["first token"][0], 1), round(profile["max"]["video"][0], 2)
    ([3], 228.6, 1.14)
    """
    sinks = list(sinks)
    if not sinks:
        return {"layers": [], "criterion": None, "tau": None, "median": {}, "max": {}}
    layers = list(sinks[0].layers)
    per_clip: dict[str, dict[str, list[np.ndarray]]] = {"median": {}, "max": {}}
    for res in sinks:
        scores = res.scores.numpy()
        ratio = scores / np.maximum(np.median(scores, axis=1, keepdims=True), 1e-12)
        labels = np.array(res.modality_of())
        groups = {"first token": np.arange(res.length) == 0, "text": (labels == "text") & (np.arange(res.length) > 0),
                  "video": labels == "video", "audio": labels == "audio"}
        for name, where in groups.items():
            if where.any():
                per_clip["median"].setdefault(name, []).append(np.median(ratio[:, where], axis=1))
                per_clip["max"].setdefault(name, []).append(ratio[:, where].max(axis=1))
    summary = {stat: {name: [round(float(v), 3) for v in np.median(np.stack(rows), axis=0)]
                      for name, rows in by_group.items()} for stat, by_group in per_clip.items()}
    return {"layers": layers, "criterion": sinks[0].criterion, "tau": sinks[0].tau, "dims": list(sinks[0].dims),
            "clips": len(sinks), **summary}


def plot_sink_profile(profile: dict[str, Any]) -> Any:
    """Log-scale per-layer score ratio (to the median token) of the first token vs text / video / audio tokens."""
    from analyses.plots import MODALITY_COLORS, figure, no_data

    fig = figure(8.0, 4.2)
    title = "sink-dim magnitude over the median token, per layer"
    if not profile["layers"]:
        return no_data(fig, "no data: no clips", title)
    if not profile["dims"] or not any(v > 0 for values in profile["max"].values() for v in values):
        return no_data(fig, "no data: no sink dimensions (none found from data, none known to the adapter)", title)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"first token": "black", "text": "#888888", **{m: MODALITY_COLORS[m] for m in ("video", "audio")}}
    for name in _PROFILE_GROUPS:
        if name in profile["max"]:
            ax.plot(profile["layers"], profile["max"][name], color=colors[name], lw=1.8, label=f"{name}: max")
            if name != "first token":
                ax.plot(profile["layers"], profile["median"][name], color=colors[name], lw=1.2, ls="--",
                        label=f"{name}: median")
    if profile["criterion"] == "magnitude":
        ax.axhline(profile["tau"], color="green", lw=0.8, ls=":", label=f"sink threshold tau={profile['tau']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (input of decoder layer l)")
    what = "|h|" if profile["criterion"] == "magnitude" else "phi"
    ax.set_ylabel(f"max {what} over sink dims {profile['dims']}\n/ median token (median over "
                  f"{profile['clips']} clips)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    return fig


def _asd_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How often ASD actually steered: fallback steps, changed tokens, the sink sets it found."""
    rows = [r["asd"] | {"tokens": r["num_new_tokens"]} for r in records if r.get("method") == "asd" and "asd" in r]
    greedy = {r["id"]: r["caption"] for r in records if r.get("method") == "greedy"}
    asd = {r["id"]: r["caption"] for r in records if r.get("method") == "asd"}
    return {"captions": len(rows), "tokens": sum(r["tokens"] for r in rows),
            "fallback_steps": sum(r["fallback_steps"] for r in rows),
            "changed_steps": sum(r["changed_steps"] for r in rows),
            "cross_modal_sinks": sum(sum(r["sinks"].values()) for r in rows),
            "reasons": sorted({r["reason"] for r in rows if r["reason"]}),
            "same_captions": sum(asd[i] == greedy.get(i) for i in asd)}


REPRODUCED, NOT_REPRODUCED, MIXED, NOT_MEASURABLE = "reproduced", "not reproduced", "mixed", "not measurable here"


def _row(finding: str, paper: str, here: str, verdict: str) -> dict[str, str]:
    return {"finding": finding, "paper": paper, "here": here, "verdict": verdict}


def _findings(report: dict[str, Any]) -> list[dict[str, str]]:
    """Each of the paper's findings (METHOD.md) with its number here and a verdict; never a silent zero."""
    rows = []
    dims = report["sink_dims"]
    profile = report["sink_ratio"]
    late = [i for i, l in enumerate(profile["layers"]) if l >= len(profile["layers"]) // 3 + profile["layers"][0]]

    def peak(name: str, stat: str = "max") -> float:
        values = profile.get(stat, {}).get(name)
        return max(values[i] for i in late) if values and late else float("nan")

    first = float(np.median([profile["max"]["first token"][i] for i in late])) if late else float("nan")
    media_peak = max(peak("video"), peak("audio"))
    rows.append(_row("Sink dimensions exist (massive channels of the first token)",
                     "Qwen2.5-Omni-7B: dims [458, 2570]",
                     f"found {dims['found']} from data (used {dims['used']}); first token x{first:.0f} the median "
                     "token at middle and late layers" if dims["found"] else
                     f"none found from data (used {dims['used'] or 'none'})",
                     REPRODUCED if dims["found"] else NOT_REPRODUCED))
    per_clip = report["sinks_per_clip"]
    video = [c["video"] for c in per_clip]
    audio = [c["audio"] for c in per_clip]
    with_both = sum(v > 0 and a > 0 for v, a in zip(video, audio))
    no_sinks = not any(video) and not any(audio)
    why = (f"no media sinks: the massive activation stays on the first token (x{first:.0f} the median token at "
           f"middle and late layers; media tokens at most x{media_peak:.1f}, tau = {profile['tau']:g})"
           if profile["criterion"] == "magnitude" else "no media sinks")
    rows.append(_row("Video and audio sink tokens exist", "many video and audio sinks per clip (K = T / 2 global sinks)",
                     why if no_sinks else f"mean {np.mean(video):.1f} video / {np.mean(audio):.1f} audio sinks per "
                     f"clip; both on {with_both} of {len(per_clip)} clips",
                     NOT_REPRODUCED if no_sinks else REPRODUCED if with_both == len(per_clip) else MIXED))
    mds = {r["modality"]: r for r in (report["mds_summary"] or [])}
    v_med, a_med = (mds.get(m, {}).get("median") for m in ("video", "audio"))
    if v_med is None and a_med is None:
        here, verdict = "no sinks to score (" + ("see above" if no_sinks else "no MDS") + ")", NOT_MEASURABLE
    else:
        ok = [(v_med is not None and v_med > 0), (a_med is not None and a_med < 0)]
        here = (f"video median {'n/a' if v_med is None else f'{v_med:+.2f}'} (n={mds['video']['n']}), audio median "
                f"{'n/a' if a_med is None else f'{a_med:+.2f}'} (n={mds['audio']['n']})")
        verdict = REPRODUCED if all(ok) else NOT_REPRODUCED if not any(ok) else MIXED
    rows.append(_row("MDS: video sinks > 0, audio sinks < 0", "medians +0.45 / -0.49 (Qwen2.5-Omni 7B)", here,
                     verdict))
    trace = {r["token_set"]: r for r in report["trace_x100"]}

    def compare(finding: str, paper: str, a: str, b: str) -> None:
        if not trace:
            rows.append(_row(finding, paper, "no audio- or video-dominant clip to trace", NOT_MEASURABLE))
            return
        if a not in trace or b not in trace or not trace[a]["tokens"] or not trace[b]["tokens"]:
            empty = [n for n in (a, b) if n not in trace or not trace[n]["tokens"]]
            rows.append(_row(finding, paper, f"token set{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
                             f"empty on every clip ({'no media sinks' if no_sinks else 'no such tokens'}); "
                             "their effects would be 0 by construction", NOT_MEASURABLE))
            return
        x, y = trace[a], trace[b]
        wins = [x["IE_clean"] > y["IE_clean"], x["IE_corrupt"] > y["IE_corrupt"]]
        rows.append(_row(finding, paper, f"IE_clean / IE_corrupt x100: {a} {x['IE_clean']:.2f} / {x['IE_corrupt']:.2f}"
                         f" vs {b} {y['IE_clean']:.2f} / {y['IE_corrupt']:.2f} ({int(x['clips'])} clips)",
                         REPRODUCED if all(wins) else NOT_REPRODUCED if not any(wins) else MIXED))

    compare("Cross-modal sinks carry more than unimodal sinks (causal tracing)",
            "cross-modal clearly > unimodal (Qwen2.5-Omni 7B)", "cross_modal_sink", "unimodal_sink")
    compare("Sinks carry more than random tokens of equal count (causal tracing)",
            "sink 6.24 / 2.94 vs random 4.24 / 2.37 (7B, audio-dominant)", "sink", "random")
    caps = {c["method"]: c for c in report["captions"]}
    asd = report["asd"]
    if "asd" in caps and "greedy" in caps:
        numbers = (f"CHAIR_s greedy {caps['greedy']['CHAIR_s']:.3f} vs ASD {caps['asd']['CHAIR_s']:.3f}, CHAIR_i "
                   f"{caps['greedy']['CHAIR_i']:.3f} vs {caps['asd']['CHAIR_i']:.3f} on {caps['asd']['clips']} captions")
        if asd["tokens"] and asd["fallback_steps"] >= asd["tokens"] - asd["captions"]:
            here = (f"ASD fell back to greedy on every step ({asd['fallback_steps']} of {asd['tokens']} tokens: "
                    f"{'; '.join(asd['reasons']) or 'no cross-modal sinks'}); {numbers}")
            verdict = NOT_MEASURABLE
        else:
            lower = caps["asd"]["CHAIR_s"] < caps["greedy"]["CHAIR_s"], caps["asd"]["CHAIR_i"] < caps["greedy"]["CHAIR_i"]
            here = f"{numbers}; ASD changed {asd['changed_steps']} of {asd['tokens']} tokens"
            verdict = REPRODUCED if all(lower) else NOT_REPRODUCED if not any(lower) else MIXED
        rows.append(_row("ASD lowers CHAIR against greedy", "ASD best on CHAIR_s and CHAIR_i on every set", here,
                         verdict))
    return rows


def _notes(report: dict[str, Any]) -> list[str]:
    """What the findings table does not say: dominance and what the run is too small to tell."""
    d = report["dominance"]
    notes = [f"Dominance: {d.get('audio', 0)} audio-dominant, {d.get('video', 0)} video-dominant, "
             f"{d.get('neither', 0)} neither, out of {report['clips']} clips (av accuracy "
             f"{report['accuracy_av']:.3f})."]
    if report["clips"] < 50:
        notes.append(f"{report['clips']} clips and {report['asd']['captions']} captions are a smoke test, not a "
                     "measurement: rerun with --clips / --captions (a GPU run of the held-out set is in "
                     "docs/smol-omni.md).")
    return notes


def _summary(report: dict[str, Any]) -> str:
    lines = [f"  - {r['verdict']}: {r['finding']} -- {r['here']}" for r in report["findings"]]
    return "\n".join(["summary:"] + lines + [f"  - {n}" for n in report["notes"]])


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# nnsight-av demo report", "", f"Model: `{report['model']}`; {report['clips']} toy clips of "
             f"{report['tokens_per_clip']} tokens; {report['seconds']} s.", "", "## What this run shows", ""]
    lines += _table(report["findings"]) + [""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "## Sink-dim magnitude by token group", "", f"![sink_ratio]({report['figures']['sink_ratio']})"]
    lines += ["", "## Sinks per clip (global sinks, N = 2; rank split)", ""] + _table(report["sinks_per_clip"])
    if report["mds_summary"]:
        lines += ["", "## Modality dominance score", ""] + _table(report["mds_summary"])
    for name in ("sink_mask", "mds_heatmap", "mds_distribution"):
        if name in report["figures"]:
            lines += ["", f"![{name}]({report['figures'][name]})"]
    lines += ["", "## Unimodal dominance", "", f"Accuracy (av): {report['accuracy_av']:.3f}", ""]
    lines += _table([{"label": k, "clips": v} for k, v in report["dominance"].items()])
    lines += ["", "## Causal tracing (mean over dominant clips, x100)", ""] + _table(report["trace_x100"])
    if "trace_bars" in report["figures"]:
        lines += ["", f"![trace_bars]({report['figures']['trace_bars']})"]
    lines += ["", "## ASD vs greedy (CHAIR, lower is better)", ""] + _table(report["captions"])
    lines += [f"\n* {note}" for note in report.get("caption_notes", [])]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()), ""]
    return "\n".join(lines)
