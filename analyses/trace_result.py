"""`TraceResult`: causal tracing's indirect effects as a tidy table, with per-clip context."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from nnsight_av.errors import InputError

from .plots import plot_trace_bars, plot_trace_heatmap
from .results import JsonResult, plain
from .store import read_jsonl, write_jsonl

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["TraceResult", "rank_agreement", "EFFECT_COLUMNS"]

# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------
EFFECT_COLUMNS = ["clip", "token_set", "window", "layer_start", "layer_end", "n_tokens", "ie_clean", "ie_corrupt",
                   "p_patched_clean", "p_patched_corrupt"]


def _clip_key(record: Mapping[str, Any]) -> str:
    """The clip a JSONL line belongs to: a pipeline record's ``id`` or a saved trace's ``clip``."""
    key = record.get("id", record.get("clip"))
    if key is None:
        raise KeyError("id")
    return str(key)


@dataclass
class TraceResult(JsonResult):
    """Indirect effects per clip, token set and layer window (a tidy table), with per-clip context.

    ``effects``: one row per (clip, token set, window) with ``n_tokens``, ``ie_clean``,
    ``ie_corrupt`` and the patched run's probabilities of the clean / corrupt answers.
    ``clips``: per clip, the answers ``o_clean`` / ``o_corrupt``, ``P_clean`` and ``P_corrupt``
    letter probabilities, the dominant and patched modalities. ``meta``: site, method, seed ...
    """

    effects: "pd.DataFrame"
    clips: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- views -------------------------------------------------------------------------
    @property
    def frame(self) -> "pd.DataFrame":
        """``effects`` indexed by ``[clip, token_set, window]``."""
        return self.effects.set_index(["clip", "token_set", "window"])

    def table(self, by: str | Sequence[str] = "token_set", scale: float = 100.0) -> "pd.DataFrame":
        """Mean IE_clean / IE_corrupt over clips (x ``scale``, as in the paper's Table 1) with counts.

        ``by="token_set"`` (rows: token sets, in first-seen order); ``by=["token_set", "window"]``
        for layer-wise tables.
        """
        keys = [by] if isinstance(by, str) else list(by)
        grouped = self.effects.groupby(keys, sort=False)
        out = grouped[["ie_clean", "ie_corrupt"]].mean() * scale
        out.columns = ["IE_clean", "IE_corrupt"]
        out["clips"] = grouped["clip"].nunique()
        out["tokens"] = grouped["n_tokens"].mean()
        return out

    def __len__(self) -> int:
        return len(self.effects)

    def __repr__(self) -> str:
        return (f"TraceResult(clips={self.effects['clip'].nunique()}, token_sets={list(self.effects['token_set'].unique())}, "
                f"windows={self.effects['window'].nunique()}, site={self.meta.get('site')!r}, "
                f"method={self.meta.get('method')!r})")

    def _repr_html_(self) -> str:
        return f"<b>{self!r}</b>" + self.table().round(3).to_html()

    def agreement(self, other: "TraceResult") -> dict[str, float]:
        """Spearman rank correlation of IE_clean and IE_corrupt with ``other`` over shared rows."""
        return rank_agreement(self, other)

    # -- plots ---------------------------------------------------------------------------
    def plot_bars(self, effect: str = "both", scale: float = 100.0, ax: Any = None) -> "Figure":
        """Bar chart of the mean effect per token set (x ``scale``), with the standard error."""
        return plot_trace_bars(self, effect, scale, ax)

    def plot_heatmap(self, effect: str = "ie_clean", scale: float = 100.0, ax: Any = None) -> "Figure":
        """Layer window (rows, by first layer) x token set heatmap of the mean effect (ROME-style)."""
        return plot_trace_heatmap(self, effect, scale, ax)

    def plot(self, kind: str = "bars", **kwargs: Any) -> "Figure":
        """``kind="bars"`` (`plot_trace_bars`) or ``"heatmap"`` (`plot_trace_heatmap`); see `analyses.plots`."""
        if kind not in ("bars", "heatmap"):
            raise InputError(f"kind must be 'bars' or 'heatmap', got {kind!r}")
        return plot_trace_bars(self, **kwargs) if kind == "bars" else plot_trace_heatmap(self, **kwargs)

    def to_frame(self) -> "pd.DataFrame":
        """The tidy effects table: one row per (clip, token set, window)."""
        return self.effects.copy()

    def summary(self) -> "pd.DataFrame":
        """Mean effects per token set (x100) with counts: `table`."""
        return self.table()

    # -- persistence ------------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per clip: its context and its effect rows."""
        records = []
        for clip, rows in self.effects.groupby("clip", sort=False):
            body = rows.drop(columns=["clip"]).to_dict(orient="records")
            records.append({"kind": "TraceClip", "clip": str(clip), "info": self.clips.get(str(clip), {}),
                            "meta": self.meta, "rows": [plain(r) for r in body]})
        return records

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> "TraceResult":
        """Rebuild from `to_records` dicts (e.g. lines of a pipeline JSONL; other lines are skipped)."""
        import pandas as pd

        rows, clips, meta = [], {}, {}
        for record in records:
            if record.get("kind") != "TraceClip":
                trace = record.get("trace")
                if isinstance(trace, Mapping) and trace.get("kind") == "TraceClip":
                    record = trace
                else:
                    continue
            clip = str(record["clip"])
            clips[clip] = dict(record.get("info", {}))
            meta = meta or dict(record.get("meta", {}))
            rows += [{"clip": clip, **r} for r in record["rows"]]
        frame = pd.DataFrame(rows, columns=EFFECT_COLUMNS + [c for r in rows[:1] for c in r
                                                               if c not in EFFECT_COLUMNS])
        return cls(frame, clips, meta)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "TraceResult", "version": 1, "records": self.to_records(), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TraceResult":
        result = cls.from_records(data["records"])
        result.meta = dict(data.get("meta", result.meta))
        return result

    def save(self, path: str | Path) -> Path:
        """Write JSON (``.json``) or one line per clip (``.jsonl``)."""
        path = Path(path)
        if path.suffix == ".jsonl":
            return write_jsonl(path, self.to_records())
        return super().save(path)

    @classmethod
    def load(cls, path: str | Path) -> "TraceResult":
        """Read a `save` file, or a pipeline JSONL (its clips with a trace).

        A JSONL is read as every run file is (`analyses.store.read_jsonl`): lines that do not
        parse are skipped with a warning, and a clip saved twice counts once (its last record).
        """
        path = Path(path)
        if path.suffix == ".jsonl":
            return cls.from_records(read_jsonl(path, key=_clip_key))
        return super().load(path)

    @classmethod
    def concat(cls, results: Sequence["TraceResult"]) -> "TraceResult":
        import pandas as pd

        results = list(results)
        if not results:
            raise InputError("nothing to concatenate")
        clips: dict[str, dict[str, Any]] = {}
        for r in results:
            clips.update(r.clips)
        return cls(pd.concat([r.effects for r in results], ignore_index=True), clips, dict(results[0].meta))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    import pandas as pd

    if len(a) < 2:
        return float("nan")
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_agreement(a: TraceResult, b: TraceResult) -> dict[str, float]:
    """Spearman rank correlation between two results' IE_clean and IE_corrupt over rows they share.

    >>> import pandas as pd
    >>> rows = lambda v: TraceResult(pd.DataFrame({"clip": ["c"] * 3, "token_set": ["x", "y", "z"],
    ...     "window": ["0"] * 3, "ie_clean": v, "ie_corrupt": v}))
    >>> rank_agreement(rows([0.1, 0.2, 0.3]), rows([1.0, 5.0, 9.0]))["ie_clean"]
    1.0
    """
    keys = ["clip", "token_set", "window"]
    merged = a.effects.merge(b.effects, on=keys, suffixes=("_a", "_b"))
    return {name: _spearman(merged[f"{name}_a"].to_numpy(float), merged[f"{name}_b"].to_numpy(float))
            for name in ("ie_clean", "ie_corrupt")} | {"rows": int(len(merged))}
