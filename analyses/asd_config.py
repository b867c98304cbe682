"""`ASDConfig`: every constant of sink-guided decoding (METHOD.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from interventions.attention import AttentionBoost
from nnsight_av.errors import InputError

from .sink_config import ASD_SINKS, SINK_SHORTCUTS, SinkConfig

__all__ = ["ASDConfig", "SINK_SETS", "SINK_SHORTCUTS"]


SINK_SETS = ("av", "va", "aa", "vv")


@dataclass(frozen=True)
class ASDConfig:
    """Every constant of ASD, with the paper's defaults (METHOD.md section 6).

    Sinks: ``sinks``, a `SinkConfig` (default `ASD_SINKS`: N = 3, where tracing uses 2);
    ``k_divide`` (N in K = int(T / N)), ``sink_dims`` / ``tau`` (None: the adapter's) and
    ``split_rule`` ("rank" or "sign") are shortcuts that override its fields, and read back
    the effective values.
    Guided pass: ``alpha``; ``boost_mode`` ("pre_softmax": a + alpha |a|, or "multiplicative");
    ``boost_sets`` (the boosted columns); layers ``boost_start .. boost_end`` inclusive
    (None: the last layer); ``boost_rows``: "text" (prompt text rows and generated rows) or
    "generated" (generated rows only).
    Statistics: layers ``target_start .. target_end`` inclusive; ``cross_sets`` (C) and
    ``unimodal_sets`` (U); ``sink_reduce``: "mean" (mean over heads and the set's columns,
    the default reading of "mean attention to av sinks") or "sum" (mean over heads of the
    summed attention to the set).
    Schedule: ``lam`` (lambda), ``cap``, ``text_mass_threshold`` / ``text_mass_width`` (the
    cosine decay), ``gate`` / ``gate_power`` (the soft gate), ``momentum``, ``first_strength``
    (s_1), ``eps`` (in w_t).
    Layer ranges beyond a small model's depth are clipped to its last layer.

    >>> ASDConfig().boost_layers(28)[:3], ASDConfig().target_layers(28)
    ([6, 7, 8], [18, 19, 20, 21, 22, 23, 24, 25])
    >>> ASDConfig().boost_layers(4), ASDConfig().target_layers(4)
    ([3], [3])
    """

    k_divide: float | None = None
    sink_dims: tuple[int, ...] | None = None
    tau: float | None = None
    criterion: str | None = None
    split_rule: str | None = None
    alpha: float = 0.2
    boost_mode: str = "pre_softmax"
    boost_sets: tuple[str, ...] = ("av", "va")
    boost_start: int = 6
    boost_end: int | None = None
    boost_rows: str = "text"
    target_start: int = 18
    target_end: int | None = 25
    cross_sets: tuple[str, ...] = ("av", "va")
    unimodal_sets: tuple[str, ...] = ("aa", "vv")
    sink_reduce: str = "mean"
    lam: float = 0.5
    cap: float = 0.6
    text_mass_threshold: float = 0.4
    text_mass_width: float = 0.2
    gate: float = 0.6
    gate_power: float = 2.0
    momentum: float = 0.5
    first_strength: float = 0.0
    eps: float = 1e-8
    sinks: SinkConfig | None = None

    def __post_init__(self) -> None:
        # One sink config: the shortcuts override its fields and then read back the effective values.
        sinks = ASD_SINKS if self.sinks is None else SinkConfig.from_dict(self.sinks)
        sinks = sinks.with_(dims=self.sink_dims, tau=self.tau, k_divide=self.k_divide, split_rule=self.split_rule,
                            criterion=self.criterion)
        object.__setattr__(self, "sinks", sinks)
        for name, value in (("k_divide", sinks.k_divide), ("sink_dims", sinks.dims), ("tau", sinks.tau),
                            ("split_rule", sinks.split_rule), ("criterion", sinks.criterion)):
            object.__setattr__(self, name, value)
        for name in ("boost_sets", "cross_sets", "unimodal_sets"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            bad = [s for s in value if s not in SINK_SETS]
            if bad:
                raise InputError(f"ASDConfig.{name}: unknown sink sets {bad}; use {list(SINK_SETS)}")
        checks = [
            (self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (self.boost_mode in ("pre_softmax", "multiplicative"),
             f"boost_mode must be 'pre_softmax' or 'multiplicative', got {self.boost_mode!r}"),
            (self.boost_rows in ("text", "generated"), f"boost_rows must be 'text' or 'generated', got {self.boost_rows!r}"),
            (self.sink_reduce in ("mean", "sum"), f"sink_reduce must be 'mean' or 'sum', got {self.sink_reduce!r}"),
            (self.boost_start >= 0 and self.target_start >= 0, "layer indices must be >= 0"),
            (self.boost_end is None or self.boost_end >= self.boost_start, "boost_end must be >= boost_start"),
            (self.target_end is None or self.target_end >= self.target_start, "target_end must be >= target_start"),
            (self.lam >= 0 and self.cap >= 0, "lam and cap must be >= 0"),
            (self.text_mass_width > 0, f"text_mass_width must be positive, got {self.text_mass_width}"),
            (self.gate > 0, f"gate must be positive, got {self.gate}"),
            (0 <= self.momentum <= 1, f"momentum must lie in [0, 1], got {self.momentum}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"ASDConfig: {message}")

    @staticmethod
    def _clip(start: int, end: int | None, num_layers: int) -> list[int]:
        last = num_layers - 1
        end = last if end is None else end
        return list(range(min(start, last), min(end, last) + 1))

    def boost_layers(self, num_layers: int) -> list[int]:
        """The layers the guided pass boosts, clipped to a model of ``num_layers``."""
        return self._clip(self.boost_start, self.boost_end, num_layers)

    def guided_pass(self, sets: Mapping[str, Any], num_layers: int) -> AttentionBoost:
        """The guided pass as an intervention primitive: what `asd_generate`'s fused kernels compute.

        An `AttentionBoost` of the ``boost_rows`` query rows (prompt text and generated rows, or
        generated rows only) on the ``boost_sets`` columns of ``sets`` (the av/va/aa/vv positions),
        at `boost_layers`, with ``alpha`` and ``boost_mode``. Run it with ``interventions.run`` /
        ``interventions.generate`` (either runtime) to get the guided branch alone; the tests
        check it against the guided log-probabilities ASD keeps.

        >>> iv = ASDConfig(boost_start=1).guided_pass({"av": [5], "va": [2], "aa": [], "vv": []}, 4)
        >>> iv.keys, iv.site.layers, iv.alpha
        ((2, 5), (1, 2, 3), 0.2)
        """
        cols = sorted({int(p) for name in self.boost_sets for p in torch.as_tensor(sets[name]).flatten().tolist()})
        queries = ["text", "generated"] if self.boost_rows == "text" else "generated"
        return AttentionBoost(queries=queries, keys=cols, layers=self.boost_layers(num_layers), alpha=self.alpha,
                              mode=self.boost_mode, allow_empty=True)

    def target_layers(self, num_layers: int) -> list[int]:
        return self._clip(self.target_start, self.target_end, num_layers)

    def to_dict(self) -> dict[str, Any]:
        """Every setting; the sink settings once, under ``"sinks"``."""
        out = {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)
               if f.name not in SINK_SHORTCUTS and f.name != "sinks"}
        return {**out, "sinks": self.sinks.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ASDConfig":
        """From `to_dict` output (older files with flat sink keys load too)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown ASDConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

