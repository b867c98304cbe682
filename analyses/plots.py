"""Plots for sink and MDS results; each returns a matplotlib ``Figure`` (save with ``fig.savefig``).

Figures are built without pyplot, so making many of them in a loop leaks nothing. Jupyter
shows a returned figure through IPython's PNG formatter; matplotlib registers that
formatter for ``Figure`` only once pyplot loads its inline backend (``%matplotlib inline``,
or importing pyplot), which a figure built without pyplot never does. So the figures here
are `NotebookFigure`s, which render themselves (``_repr_png_``) in a fresh kernel too.
An empty result gives a figure that says "no data" rather than empty axes.
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from nnsight_av.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .asd import ASDOutput
    from .asd_cost import ASDCostResult
    from .chair import ChairResult
    from .controls import LengthControlResult
    from .decoding import DecodeOutput
    from .dominance import DominanceResult
    from .evaluate import EvalResult
    from .mds import MDSResult
    from .sinks import SinkResult
    from .runner import PipelineResult
    from .tracing import TraceResult

__all__ = ["plot_sink_mask", "plot_mds_heatmap", "plot_mds_distribution", "plot_trace_bars", "plot_trace_heatmap",
           "plot_dominance", "plot_asd_steps", "plot_tokens", "plot_chair", "plot_eval", "plot_length_control",
           "plot_asd_cost", "plot_pipeline", "MODALITY_COLORS", "NotebookFigure", "figure", "no_data", "LABEL_WIDTH"]

MODALITY_COLORS = {"video": "#1f77b4", "audio": "#d62728", "image": "#9467bd", "text": "#bbbbbb"}


@functools.cache
def _notebook_figure_class() -> type:
    # Built on first use so that importing analyses does not import matplotlib.
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        """A matplotlib ``Figure`` that Jupyter displays without ``%matplotlib inline`` (see the module doc)."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()

    NotebookFigure.__module__, NotebookFigure.__qualname__ = __name__, "NotebookFigure"
    return NotebookFigure


def __getattr__(name: str) -> Any:
    if name == "NotebookFigure":
        return _notebook_figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def figure(width: float, height: float) -> "Figure":
    """A new `NotebookFigure` (constrained layout, so labels are not clipped), outside pyplot.

    >>> figure(2, 1)._repr_png_()[:4]
    b'\\x89PNG'
    """
    return _notebook_figure_class()(figsize=(width, height), layout="constrained")


_figure = figure


def no_data(fig: "Figure", message: str = "no data", title: str | None = None, ax: Any = None) -> "Figure":
    """Turn ``fig`` (or just ``ax``) into a plain notice: ``message`` in the middle, no axes."""
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.3")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def _dims_text(dims: Sequence[int], show: int = 6) -> str:
    """``dims 3, 7`` or ``30 dims (100, 102, 104, ..., 158)``: a title never lists every channel."""
    dims = [int(d) for d in dims]
    if len(dims) <= show:
        return f"dim{'s' if len(dims) != 1 else ''} {', '.join(map(str, dims)) or 'none'}"
    return f"{len(dims)} dims ({', '.join(map(str, dims[:3]))}, ..., {dims[-1]})"


def _bands(ax: Any, labels: Sequence[str]) -> None:
    """Colour runs of equal modality along the x axis of ``ax``."""
    from matplotlib.patches import Patch

    start = 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            ax.axvspan(start - 0.5, t - 0.5, color=MODALITY_COLORS.get(labels[start], "#bbbbbb"), lw=0)
            start = t
    ax.set_yticks([])
    ax.set_xlim(-0.5, len(labels) - 0.5)
    present = [m for m in MODALITY_COLORS if m in set(labels)]
    ax.legend(handles=[Patch(color=MODALITY_COLORS[m], label=m) for m in present], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)


def plot_sink_mask(sinks: "SinkResult", *, mark_global: bool = True, title: str | None = None,
                   width: float = 12.0) -> "Figure":
    """Sink mask over layer x token, with a modality band above and the global sinks marked below.

    >>> import torch
    >>> from analyses.sinks import SinkResult
    >>> res = SinkResult(torch.tensor([[0.0, 30.0, 1.0], [0.0, 40.0, 30.0]]), [0, 1], [5], 25.0, 1.0, "VA.")
    >>> plot_sink_mask(res).axes[1].get_ylabel()
    'layer'
    """
    fig = _figure(width, 4.2)
    default_title = f"sink mask (tau={sinks.tau:g}, {_dims_text(sinks.dims)})"
    if sinks.scores.numel() == 0:
        return no_data(fig, "no data: no layers or tokens", title or default_title)
    rows = 3 if mark_global else 2
    grid = fig.add_gridspec(rows, 1, height_ratios=[0.35, 4, 0.35][:rows])
    band = fig.add_subplot(grid[0])
    ax = fig.add_subplot(grid[1], sharex=band)
    labels = sinks.modality_of()
    _bands(band, labels)
    band.set_title(title or default_title, fontsize=9)
    mask = sinks.mask.numpy().astype(float)
    ax.imshow(mask, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
              extent=(-0.5, sinks.length - 0.5, len(sinks.layers) - 0.5, -0.5))
    ax.set_ylabel("layer")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="black", label=f"sink (score > tau={sinks.tau:g})"),
                       Patch(facecolor="white", edgecolor="0.5", label="not a sink")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ticks = np.linspace(0, len(sinks.layers) - 1, min(len(sinks.layers), 8)).round().astype(int)
    ax.set_yticks(ticks, [str(sinks.layers[i]) for i in ticks])
    if mark_global:
        marks = fig.add_subplot(grid[2], sharex=band)
        for name in ("video", "audio"):
            pos = getattr(sinks, name).numpy()
            marks.vlines(pos, 0, 1, color=MODALITY_COLORS[name], lw=0.8, label=f"{name} sinks ({len(pos)})")
        dropped = sinks.dropped_text.numpy()
        marks.vlines(dropped, 0, 1, color="black", lw=0.8, label=f"dropped text ({len(dropped)})")
        marks.set_yticks([])
        marks.set_xlabel("token position")
        marks.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    else:
        ax.set_xlabel("token position")
    return fig


def plot_mds_heatmap(mds: "MDSResult", *, title: str | None = None, cmap: str = "RdBu_r",
                     width: float = 10.0) -> "Figure":
    """MDS per layer (rows) and sink (columns), sinks grouped by modality and sorted by mean MDS; scale [-1, 1].

    >>> import torch
    >>> from analyses.mds import MDSResult
    >>> res = MDSResult(torch.tensor([1, 2]), ["video", "audio"], [0, 1], torch.rand(2, 2), torch.rand(2, 2))
    >>> plot_mds_heatmap(res).axes[0].get_xlabel()
    'sinks (video | audio), sorted by MDS'
    """
    fig = _figure(width, 4.0)
    mean = mds.mds.numpy()
    order = sorted(range(len(mean)), key=lambda j: (mds.modality[j] != "video", -mean[j], int(mds.positions[j])))
    if not order or not len(mds.layers):
        return no_data(fig, "no data: no sinks to score", title or "MDS per layer")
    ax = fig.add_subplot(1, 1, 1)
    data = mds.per_layer.numpy()[:, order]
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-1, vmax=1)
    n_video = sum(m == "video" for m in mds.modality)
    if 0 < n_video < len(order):
        ax.axvline(n_video - 0.5, color="black", lw=1)
    ax.set_xlabel("sinks (video | audio), sorted by MDS")
    ax.set_ylabel("layer")
    ticks = np.linspace(0, len(mds.layers) - 1, min(len(mds.layers), 8)).round().astype(int)
    ax.set_yticks(ticks, [str(mds.layers[i]) for i in ticks])
    fig.colorbar(image, ax=ax, label="MDS (+ video, - audio)")
    ax.set_title(title or f"MDS per layer: {n_video} video, {len(order) - n_video} audio sinks", fontsize=9)
    return fig


def plot_mds_distribution(results: "MDSResult | Sequence[MDSResult]", *, kind: str = "violin",
                          title: str | None = None) -> "Figure":
    """Distribution of the per-sink MDS per modality, pooled over ``results``; medians annotated.

    ``kind``: "violin", "box" or "hist".

    >>> import torch
    >>> from analyses.mds import MDSResult
    >>> res = MDSResult(torch.tensor([1, 2, 3]), ["video", "video", "audio"], [0], torch.rand(1, 3), torch.rand(1, 3))
    >>> plot_mds_distribution(res, kind="box").axes[0].get_ylabel()
    'MDS'
    """
    import pandas as pd
    import seaborn as sns

    if not isinstance(results, (list, tuple)):
        results = [results]
    frames = [r.to_frame().assign(sample=i) for i, r in enumerate(results)]
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["modality", "mds"])
    data = data[data["modality"].isin(["video", "audio"])]
    if kind not in ("violin", "box", "hist"):
        raise InputError(f"kind must be 'violin', 'box' or 'hist', got {kind!r}")
    fig = _figure(6.0, 4.0)
    default_title = f"MDS of sinks ({len(results)} input{'s' if len(results) != 1 else ''})"
    if data.empty:
        return no_data(fig, "no data: no video or audio sinks", title or default_title)
    ax = fig.add_subplot(1, 1, 1)
    palette = {m: MODALITY_COLORS[m] for m in ("video", "audio")}
    order = [m for m in ("video", "audio") if (data["modality"] == m).any()]
    if kind == "violin":
        sns.violinplot(data=data, x="modality", y="mds", hue="modality", order=order, palette=palette, cut=0,
                       inner="quartile", ax=ax, legend=False)
    elif kind == "box":
        sns.boxplot(data=data, x="modality", y="mds", hue="modality", order=order, palette=palette, ax=ax,
                    legend=False)
    else:
        sns.histplot(data=data, x="mds", hue="modality", palette=palette, bins=np.linspace(-1, 1, 41),
                     element="step", ax=ax)
    if kind != "hist":
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("MDS")
        ax.axhline(0, color="grey", lw=0.5)
        for x, m in enumerate(order):
            med = float(data.loc[data["modality"] == m, "mds"].median())
            ax.annotate(f"median {med:+.2f}", (x, 1.0), ha="center", fontsize=8)
    else:
        ax.set_xlim(-1, 1)
    ax.set_title(title or default_title, fontsize=9)
    return fig


#: Token-set names longer than this are wrapped onto several lines in figures.
LABEL_WIDTH = 22


def _wrap(label: Any) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(label), LABEL_WIDTH)) or str(label)


def _label_room(labels: Any, inches_per_char: float) -> float:
    """Extra figure size (inches) for wrapped x labels rotated by 30 degrees, from the longest line."""
    return inches_per_char * min(max((len(str(label)) for label in labels), default=0), LABEL_WIDTH)


def effect_column(effect: str) -> str:
    """``"ie_clean"`` / ``"ie_corrupt"`` from any accepted spelling (``"clean"``, ``"IE_clean"`` ...)."""
    name = {"clean": "ie_clean", "corrupt": "ie_corrupt", "IE_clean": "ie_clean", "IE_corrupt": "ie_corrupt"}.get(
        effect, effect)
    if name not in ("ie_clean", "ie_corrupt"):
        raise InputError(f"effect must be 'ie_clean' or 'ie_corrupt', got {effect!r}")
    return name


def plot_trace_bars(result: "TraceResult", effect: str = "both", scale: float = 100.0, ax: Any = None) -> "Figure":
    """Bar chart of a `TraceResult`'s mean effect per token set (x ``scale``) over clips, error bars ± 1 s.e.m.

    The axis label says what the bars and error bars are and over how many clips. Shows
    in Jupyter as it is returned; an empty result gives a figure that says "no data".
    """
    names = ["ie_clean", "ie_corrupt"] if effect == "both" else [effect_column(effect)]
    if ax is None:
        sets = result.effects["token_set"].unique()
        fig = figure(1.6 + 1.1 * max(len(sets), 1) + _label_room(sets, 0.05), 3.4 + _label_room(sets, 0.035))
    else:
        fig = ax.figure
    if result.effects.empty:
        return no_data(fig, "no data: no traced clips", ax=ax)
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    grouped = result.effects.groupby("token_set", sort=False)
    mean = grouped[names].mean() * scale
    sem = grouped[names].sem().fillna(0.0) * scale
    clips = grouped["clip"].nunique()
    width = 0.8 / len(names)
    x = np.arange(len(mean))
    for j, name in enumerate(names):
        ax.bar(x + (j - (len(names) - 1) / 2) * width, mean[name].values, width, yerr=sem[name].values,
               label=name.replace("ie_", "IE_"), capsize=2)
    ax.set_xticks(x, [_wrap(name) for name in mean.index], rotation=30, ha="right")
    ax.axhline(0, color="black", lw=0.6)
    count = f"{clips.min()}" if clips.min() == clips.max() else f"{clips.min()}-{clips.max()}"
    ax.set_ylabel(f"effect x{scale:g}: mean ± 1 s.e.m.\nover {count} clip{'s' if clips.max() != 1 else ''}")
    ax.legend(frameon=False)
    return fig

def plot_trace_heatmap(result: "TraceResult", effect: str = "ie_clean", scale: float = 100.0,
                   ax: Any = None) -> "Figure":
    """A `TraceResult`'s layer window (rows, by first layer) x token set heatmap of the mean effect over clips (ROME-style).

    Laid out so that long token-set names are not clipped, also when saved; an empty result
    gives a figure that says "no data".
    """
    column = effect_column(effect)
    table = (result.effects.groupby(["layer_start", "token_set"], sort=False)[column].mean() * scale).unstack()
    table = table.sort_index()
    if ax is None:
        fig = figure(2.2 + 0.9 * max(table.shape[1], 1) + _label_room(table.columns, 0.05),
                     1.6 + 0.22 * max(table.shape[0], 1) + _label_room(table.columns, 0.035))
    else:
        fig = ax.figure
    if table.size == 0 or not np.isfinite(table.values).any():
        return no_data(fig, "no data: no traced clips", ax=ax)
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    limit = float(np.nanmax(np.abs(table.values)))
    image = ax.imshow(table.values, aspect="auto", cmap="RdBu_r", vmin=-limit or -1, vmax=limit or 1)
    ax.set_xticks(range(table.shape[1]), [_wrap(name) for name in table.columns], rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    ax.set_ylabel("first layer of window")
    clips = result.effects["clip"].nunique()
    fig.colorbar(image, ax=ax, label=f"{column.replace('ie_', 'IE_')} x{scale:g}, mean over {clips} clip"
                                     f"{'s' if clips != 1 else ''}")
    return fig


def plot_dominance(result: "DominanceResult", ax: Any = None) -> "Figure":
    """Bar chart of a `DominanceResult`: clips per label (audio, video, neither, error).

    >>> from analyses.dominance import DominanceResult
    >>> fig = plot_dominance(DominanceResult([{"id": "a", "dominance": "audio"}, {"id": "b", "dominance": "audio"}]))
    >>> [round(p.get_height()) for p in fig.axes[0].patches]
    [2, 0, 0, 0]
    """
    counts = result.counts()
    if ax is None:
        fig = figure(3.6, 2.8)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    colors = [MODALITY_COLORS.get(name, "#bbbbbb") for name in counts]
    ax.bar(range(len(counts)), list(counts.values()), color=colors)
    ax.set_xticks(range(len(counts)), list(counts))
    ax.set_ylabel("clips")
    return fig


def plot_asd_steps(output: "ASDOutput", tokenizer: Any = None, figsize: tuple[float, float] = (9.0, 5.0)) -> "Figure":
    """An `ASDOutput` per step: strength s_t (and its target), weight w_t and text mass m_t; fallback steps shaded."""
    fig = figure(*figsize)
    if not output.token_ids:
        return no_data(fig, "no data: no token was generated", f"ASD: {output.text[:70]!r}")
    steps = np.arange(1, len(output.token_ids) + 1)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(steps, output.s, marker="o", label="s_t (applied)")
    top.plot(steps, output.steps.get("target", []), ls="--", label="target")
    top.set_ylabel("strength")
    top.legend(loc="upper right")
    bottom.plot(steps, output.w, marker=".", label="w_t = C / (C + U)")
    bottom.plot(steps, output.m, marker=".", label="m_t (text mass)")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("generated token")
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        for step, flag in zip(steps, output.fallback):
            if flag:
                ax.axvspan(step - 0.5, step + 0.5, color="0.85", zorder=0)
    if tokenizer is not None and len(steps) <= 40:
        bottom.set_xticks(steps)
        # repr keeps control characters of odd tokens printable
        bottom.set_xticklabels([repr(tokenizer.decode([t]))[1:-1] for t in output.token_ids], rotation=90)
    top.set_title(f"ASD: {output.text[:70]!r}")
    return fig


def _axes(ax: Any, width: float, height: float) -> tuple["Figure", Any]:
    """``(figure, axes)``: a new one-panel `figure`, or ``ax`` and its figure."""
    if ax is not None:
        return ax.figure, ax
    fig = figure(width, height)
    return fig, fig.add_subplot(1, 1, 1)


def plot_tokens(output: "DecodeOutput", tokenizer: Any = None, ax: Any = None) -> "Figure":
    """A `DecodeOutput`'s generated tokens in order, one cell each (the decoded text with ``tokenizer``, else the id).

    >>> from analyses.decoding import DecodeOutput
    >>> fig = plot_tokens(DecodeOutput("greedy", "hi", [5, 7], 3, 1.0, True))
    >>> [t.get_text() for t in fig.axes[0].texts]
    ['5', '7']
    """
    fig, ax = _axes(ax, min(1.2 + 0.55 * max(len(output.token_ids), 1), 14.0), 1.6)
    title = f"{output.method}: {len(output.token_ids)} tokens, {output.ms_per_token:.1f} ms/token"
    if not output.token_ids:
        return no_data(fig, "no data: no token was generated", title, ax=ax)
    for step, token in enumerate(output.token_ids):
        # repr keeps control characters of odd tokens printable
        label = repr(tokenizer.decode([token]))[1:-1] if tokenizer is not None else str(token)
        ax.add_patch(_rectangle(step, "#dddddd" if output.finished and step == len(output.token_ids) - 1 else "#eef"))
        ax.text(step + 0.5, 0.5, label, ha="center", va="center", fontsize=8, rotation=90 if len(label) > 4 else 0)
    ax.set_xlim(0, len(output.token_ids))
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("generated token")
    ax.set_title(title, fontsize=9)
    return fig


def _rectangle(x: float, color: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x + 0.05, 0.1), 0.9, 0.8, color=color)


def plot_chair(result: "ChairResult", ax: Any = None) -> "Figure":
    """Per caption of a `ChairResult`: objects it names, split into grounded and hallucinated (stacked bars).

    >>> from analyses.chair import chair
    >>> fig = plot_chair(chair(["a dog and a cat"], [["dog"]], ["dog", "cat"]))
    >>> [round(p.get_height()) for p in fig.axes[0].patches]
    [1, 1]
    """
    fig, ax = _axes(ax, 1.6 + 0.4 * max(len(result.captions), 1), 2.8)
    title = f"CHAIR_s {result.chair_s:.3f}, CHAIR_i {result.chair_i:.3f}"
    if not result.captions:
        return no_data(fig, "no data: no captions", title, ax=ax)
    bad = np.array([len(c.hallucinated) for c in result.captions])
    good = np.array([len(c.objects) for c in result.captions]) - bad
    x = np.arange(len(result.captions))
    ax.bar(x, good, color="tab:green", label="grounded")
    ax.bar(x, bad, bottom=good, color="tab:red", label="hallucinated")
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel("caption")
    ax.set_ylabel("objects named")
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_eval(result: "EvalResult", ax: Any = None) -> "Figure":
    """CHAIR_s and CHAIR_i per decoding method of an `EvalResult` (bars), ms per token in the labels."""
    table = result.table()
    fig, ax = _axes(ax, 1.6 + 1.0 * max(len(table), 1), 3.0)
    ok = table[table["clips"] > 0]
    if ok.empty:
        return no_data(fig, "no data: no captioned clips", ax=ax)
    x = np.arange(len(ok))
    for j, (column, color) in enumerate((("CHAIR_s", "tab:orange"), ("CHAIR_i", "tab:red"))):
        ax.bar(x + (j - 0.5) * 0.4, ok[column], 0.4, color=color, label=column)
    ax.set_xticks(x, [f"{r.method}\n{r.ms_per_token:.0f} ms/tok" for r in ok.itertuples()])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_length_control(result: "LengthControlResult", effect: str = "ie_clean", scale: float = 100.0,
                        ax: Any = None) -> "Figure":
    """A `LengthControlResult`: mean effect per token set against clip length, error bars ± 1 s.e.m."""
    column = effect_column(effect)
    fig, ax = _axes(ax, 5.0, 3.4)
    effects = result.effects
    if effects.empty:
        return no_data(fig, "no data: no traced clips", ax=ax)
    grouped = effects.groupby(["token_set", "seconds"], sort=False)[column]
    mean, sem = grouped.mean() * scale, grouped.sem().fillna(0.0) * scale
    for name in dict.fromkeys(effects["token_set"]):
        m, s = mean.loc[name].sort_index(), sem.loc[name].sort_index()
        ax.errorbar(m.index, m.values, yerr=s.values, marker="o", capsize=2, label=name)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("clip length (s)")
    ax.set_ylabel(f"mean {column.replace('ie_', 'IE_')} x{scale:g}")
    ax.set_title("sink vs matched random sets by clip length")
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_asd_cost(result: "ASDCostResult", baseline: str = "greedy") -> "Figure":
    """An `ASDCostResult`: left, MC accuracy per method; right, caption coverage, CHAIR_i and exact captions."""
    table = result.table(baseline)
    fig = figure(9.0, 3.4)
    left, right = fig.subplots(1, 2)
    mc = table[table["mc_clips"] > 0]
    if mc.empty:
        no_data(fig, "no data: no multiple-choice clips", "answers", ax=left)
    else:
        left.bar(mc["method"], mc["mc_accuracy"], color="tab:blue", label="accuracy")
        left.set_ylim(0, 1.05)
        left.set_ylabel("multiple-choice accuracy")
        left.set_title("answers")
        left.legend(frameon=False)
        left.tick_params(axis="x", rotation=30)
    cap = table[table["caption_clips"] > 0]
    if cap.empty:
        return no_data(fig, "no data: no caption clips", "captions", ax=right)
    x = np.arange(len(cap))
    for j, (column, colour) in enumerate((("coverage", "tab:green"), ("CHAIR_i", "tab:red"), ("exact", "tab:gray"))):
        right.bar(x + (j - 1) * 0.27, cap[column], 0.27, color=colour, label=column)
    right.set_xticks(x, list(cap["method"]), rotation=30)
    right.set_ylim(0, 1.05)
    right.set_ylabel("fraction")
    right.set_title("captions")
    right.legend(frameon=False, fontsize=8)
    return fig


def plot_pipeline(result: "PipelineResult") -> "Figure":
    """A `PipelineResult`: clips per dominance label (left) and the traced clips' effects per token set (right)."""
    trace = result.trace
    fig = figure(9.0, 3.6)
    left, right = fig.subplots(1, 2, width_ratios=[1, 2])
    plot_dominance(result.dominance, ax=left)
    left.set_title(f"{len(result.records)} clips, {len(result.errors)} failed", fontsize=9)
    if trace is None:
        return no_data(fig, "no data: no clip was traced (none dominant)", ax=right)
    return plot_trace_bars(trace, ax=right)
