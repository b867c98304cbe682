"""Plots for sink and MDS results; each returns a matplotlib ``Figure`` (save with ``fig.savefig``).

Figures are built without pyplot, so making many of them in a loop leaks nothing;
Jupyter still displays a returned ``Figure``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .mds import MDSResult
    from .sinks import SinkResult

__all__ = ["plot_sink_mask", "plot_mds_heatmap", "plot_mds_distribution", "MODALITY_COLORS"]

MODALITY_COLORS = {"video": "#1f77b4", "audio": "#d62728", "image": "#9467bd", "text": "#bbbbbb"}


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


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
    rows = 3 if mark_global else 2
    grid = fig.add_gridspec(rows, 1, height_ratios=[0.35, 4, 0.35][:rows])
    band = fig.add_subplot(grid[0])
    ax = fig.add_subplot(grid[1], sharex=band)
    labels = sinks.modality_of()
    _bands(band, labels)
    band.set_title(title or f"sink mask (tau={sinks.tau:g}, dims={sinks.dims})", fontsize=9)
    mask = sinks.mask.numpy().astype(float)
    ax.imshow(mask, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
              extent=(-0.5, sinks.length - 0.5, len(sinks.layers) - 0.5, -0.5))
    ax.set_ylabel("layer")
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
    ax = fig.add_subplot(1, 1, 1)
    mean = mds.mds.numpy()
    order = sorted(range(len(mean)), key=lambda j: (mds.modality[j] != "video", -mean[j], int(mds.positions[j])))
    data = mds.per_layer.numpy()[:, order] if order else np.full((len(mds.layers), 1), np.nan)
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-1, vmax=1)
    if not order:
        ax.text(0.5, 0.5, "no sinks", ha="center", va="center", transform=ax.transAxes)
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

    from nnsight_av.errors import InputError

    from .mds import MDSResult

    if isinstance(results, MDSResult):
        results = [results]
    frames = [r.to_frame().assign(sample=i) for i, r in enumerate(results)]
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["modality", "mds"])
    data = data[data["modality"].isin(["video", "audio"])]
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    palette = {m: MODALITY_COLORS[m] for m in ("video", "audio")}
    order = [m for m in ("video", "audio") if (data["modality"] == m).any()]
    if data.empty:
        ax.text(0.5, 0.5, "no sinks", ha="center", va="center", transform=ax.transAxes)
    elif kind == "violin":
        sns.violinplot(data=data, x="modality", y="mds", hue="modality", order=order, palette=palette, cut=0,
                       inner="quartile", ax=ax, legend=False)
    elif kind == "box":
        sns.boxplot(data=data, x="modality", y="mds", hue="modality", order=order, palette=palette, ax=ax,
                    legend=False)
    elif kind == "hist":
        sns.histplot(data=data, x="mds", hue="modality", palette=palette, bins=np.linspace(-1, 1, 41),
                     element="step", ax=ax)
    else:
        raise InputError(f"kind must be 'violin', 'box' or 'hist', got {kind!r}")
    if kind != "hist":
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("MDS")
        ax.axhline(0, color="grey", lw=0.5)
        for x, m in enumerate(order):
            med = float(data.loc[data["modality"] == m, "mds"].median())
            ax.annotate(f"median {med:+.2f}", (x, 1.0), ha="center", fontsize=8)
    else:
        ax.set_xlim(-1, 1)
    ax.set_title(title or f"MDS of sinks ({len(results)} input{'s' if len(results) != 1 else ''})", fontsize=9)
    return fig
