"""Figures: shown by a fresh Jupyter kernel, honest when empty, labelled, keyed and not clipped."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from analyses.asd import ASDOutput
from analyses.mds import MDSResult
from analyses.plots import plot_mds_distribution, plot_mds_heatmap
from analyses.sinks import SinkResult
from analyses.tracing import TraceResult

LONG_SETS = ["video sinks (cross-modal)", "audio sinks (cross-modal)", "text tokens of the question", "last"]


def sink_result(dims=tuple(range(100, 160, 2)), tokens=120):
    rng = np.random.default_rng(0)
    modality = ("." * 10 + "V" * 50 + "A" * 40 + "." * 20)[:tokens]
    return SinkResult(torch.tensor(rng.random((6, tokens)) * 60), list(range(6)), list(dims), 40.0, 2.0, modality)


def mds_result(n=4):
    modality = (["video", "audio"] * n)[:n]
    return MDSResult(torch.arange(n), modality, [0, 1], torch.rand(2, n) * 2 - 1, torch.rand(2, n))


def trace_result(clips=5, sets=LONG_SETS):
    rng = np.random.default_rng(1)
    rows = [{"clip": f"c{c}", "token_set": ts, "window": f"{s}-{s + 5}", "layer_start": s, "n_tokens": 3,
             "ie_clean": rng.normal(0.05, 0.05), "ie_corrupt": rng.normal(0.02, 0.05)}
            for c in range(clips) for ts in sets for s in range(0, 20, 2)]
    columns = ["clip", "token_set", "window", "layer_start", "n_tokens", "ie_clean", "ie_corrupt"]
    return TraceResult(pd.DataFrame(rows, columns=columns))


def asd_output(steps=5):
    values = {"s": [0.1] * steps, "target": [0.2] * steps, "w": [0.5] * steps, "m": [0.3] * steps,
              "fallback": [False] * steps}
    return ASDOutput("asd", "a dog barks", list(range(steps)), 10, 1.0, True, {}, steps=values)


FIGURES = {
    "sink_mask": lambda: sink_result().plot(),
    "mds_heatmap": lambda: plot_mds_heatmap(mds_result()),
    "mds_distribution": lambda: plot_mds_distribution(mds_result()),
    "trace_bars": lambda: trace_result().plot_bars(),
    "trace_heatmap": lambda: trace_result().plot_heatmap(),
    "asd": lambda: asd_output().plot(),
}
EMPTY = {
    "sink_mask": lambda: SinkResult(torch.zeros(0, 0), [], [], 40.0, 2.0, "").plot(),
    "mds_heatmap": lambda: plot_mds_heatmap(mds_result(0)),
    "mds_distribution": lambda: plot_mds_distribution([]),
    "trace_bars": lambda: trace_result(clips=0).plot_bars(),
    "trace_heatmap": lambda: trace_result(clips=0).plot_heatmap(),
    "asd": lambda: asd_output(0).plot(),
}


@pytest.mark.parametrize("name", FIGURES)
def test_a_fresh_ipython_formatter_renders_the_figure(name):
    from IPython.core.formatters import DisplayFormatter

    # A new formatter has no matplotlib printer registered: a kernel without %matplotlib.
    data, _ = DisplayFormatter().format(FIGURES[name]())
    assert "image/png" in data, f"{name} would show as {data['text/plain']!r}"
    image = np.asarray(Image.open(io.BytesIO(data["image/png"])).convert("L"))
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 10  # something is drawn


@pytest.mark.parametrize("name", EMPTY)
def test_an_empty_figure_says_no_data(name):
    fig = EMPTY[name]()
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(t.startswith("no data") for t in texts), texts
    assert all(not ax.axison for ax in fig.axes), "empty figures keep no meaningless axes"
    assert "image/png" in __import__("IPython").core.formatters.DisplayFormatter().format(fig)[0]


def test_sink_mask_title_summarises_the_dims_and_keys_the_mask_colours():
    fig = sink_result().plot()
    title = fig.axes[0].get_title()
    assert "30 dims" in title and "158" in title and "130" not in title and len(title) < 70
    assert "dims 3, 7" in sink_result(dims=[3, 7]).plot().axes[0].get_title()
    keys = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert keys[0].startswith("sink (score > tau=40") and keys[1] == "not a sink"


def test_bar_chart_says_what_the_error_bars_are():
    label = trace_result(clips=5).plot_bars().axes[0].get_ylabel()
    assert "mean ± 1 s.e.m." in label and "5 clips" in label


def _outside(fig):
    """Axes of ``fig`` whose drawn extent (ticks, labels, title) runs past the canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(120)  # as the CLI saves it
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    bad = []
    for ax in fig.axes:
        box = ax.get_tightbbox(renderer)
        if box.x0 < -1 or box.y0 < -1 or box.x1 > fig.bbox.width + 1 or box.y1 > fig.bbox.height + 1:
            bad.append((ax.get_label() or ax.get_ylabel(), tuple(np.round(box.extents)), fig.bbox.size))
    return bad


@pytest.mark.parametrize("sets", [LONG_SETS, ["a very long token set name that goes on and on"], ["last"]])
def test_trace_heatmap_and_bars_labels_are_not_clipped(sets):
    result = trace_result(clips=2, sets=sets)
    assert _outside(result.plot_heatmap()) == []
    assert _outside(result.plot_bars()) == []
