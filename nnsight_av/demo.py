"""``nnsight-av demo``: the pipeline end to end on an offline model, written to a report folder."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .model import AVModel


def load_model(name: str, device: str = "cpu") -> AVModel:
    """'tiny' (random weights), 'toy-omni' / 'default' (the shipped trained model if present), or a checkpoint."""
    from . import testing
    from .loading import load

    if name == "tiny":
        model = testing.tiny_model()
    elif name in ("default", "toy-omni"):
        try:
            model = load("toy-omni")
        except (ImportError, FileNotFoundError):
            if name == "toy-omni":
                raise
            model = testing.tiny_model()
    else:
        model = load(name, device_map=device if device != "cpu" else None)
    return model.to(device) if device != "cpu" else model


def trace_summary(model: AVModel, ex: Any) -> dict[str, list[float]]:
    """Mean residual-stream norm per layer, by modality (a first look at what a trace gives)."""
    import nnsight

    with torch.no_grad(), model.trace(ex):
        hidden = nnsight.save([model.layers[i].input for i in range(model.num_layers)])
    summary: dict[str, list[float]] = {}
    for name in ("video", "audio", "text"):
        positions = getattr(ex.spans, name)
        if len(positions):
            summary[name] = [float(h[0, positions].norm(dim=-1).mean()) for h in hidden]
    return summary


def run_demo(model: str = "default", out: Path | str = "nnsight_av_report", clips: int = 8, device: str = "cpu",
             seed: int = 0) -> dict[str, Any]:
    """Trace a generated clip and write ``report.json`` and ``report.md`` into ``out``."""
    from . import testing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    m = load_model(model, device)
    print(f"model: {m!r}")
    with tempfile.TemporaryDirectory() as tmp:
        clip = testing.write_mp4(Path(tmp) / "clip.mp4", seconds=4.0, fps=8, size=64, seed=seed)
        ex = m.prepare(video=clip, text="What is making the sound?")
    print(f"input: {ex.spans!r}")
    for chunk in ex.spans.chunks:
        print(f"  {chunk!r}")
    summary = trace_summary(m, ex)
    for name, norms in summary.items():
        print(f"  residual norm of {name:5s} tokens by layer: " + " ".join(f"{v:.2f}" for v in norms))
    report = {"model": repr(m), "spans": ex.spans.summary(), "layout": ex.layout(),
              "residual_norm_by_layer": summary, "seconds": time.perf_counter() - start}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# nnsight-av demo report", "", f"Model: `{m!r}`", "", "## Input layout", "",
             "| span | tokens |", "|---|---|"] + [f"| {k} | {v} |" for k, v in ex.spans.summary().items()]
    lines += ["", "## Mean residual norm by layer", "", "| layer | " + " | ".join(summary) + " |",
              "|---|" + "---|" * len(summary)]
    for layer in range(m.num_layers):
        lines.append(f"| {layer} | " + " | ".join(f"{summary[k][layer]:.3f}" for k in summary) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report written to {out}/ in {report['seconds']:.1f} s")
    return report
