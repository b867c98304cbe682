"""`SinkConfig`: the settings of the global-sink search and of the MDS split, in one place.

The same five settings drive `find_sinks`, `sink_analysis`, ASD (`ASDConfig.sinks`), the
dataset pipeline (`PipelineConfig.sinks`) and the CLI. Defaults follow METHOD.md:

- ``dims`` / ``tau``: ``None`` takes the adapter's known sink dimensions and threshold (tau = 25
  for 7B-size models; section 2: smaller models need their own);
- ``k_divide`` (N in K = int(T / N)) is 2 for causal tracing (section 5, Table 1) and 3 for
  ASD (section 6, "the clean prefill with N = 3"): `SinkConfig()` is the tracing default,
  `ASD_SINKS` ASD's;
- ``k``: an explicit K instead of int(T / N);
- ``split_rule``: "rank" (the authors' halves by MDS, our default) or "sign" (MDS threshold 0);
- ``criterion``: how a score becomes "sink or not" (`analyses.sinks.SINK_CRITERIA`: "phi", the
  paper's rule, or "magnitude" for small models); ``None`` takes the adapter's.

Each field's ``metadata`` holds its ``help`` (and, for a ``None`` default, what ``None``
means: ``unset``); the command line builds its sink options from them
(`nnsight_av.app.sink_options`), so a setting and its default are written once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

from nnsight_av.errors import InputError

from .sinks import SINK_CRITERIA

__all__ = ["SinkConfig", "ASD_SINKS", "SPLIT_RULES", "SINK_SHORTCUTS"]

SPLIT_RULES = ("rank", "sign")


@dataclass(frozen=True)
class SinkConfig:
    """Sink search and split settings (see the module docstring for the defaults and why).

    >>> SinkConfig(k_divide=3).to_dict()
    {'dims': None, 'tau': None, 'k_divide': 3.0, 'k': None, 'split_rule': 'rank', 'criterion': None}
    >>> SinkConfig.from_dict({"tau": 20, "future_field": 1}).tau
    20.0
    """

    dims: tuple[int, ...] | None = field(default=None, metadata={
        "help": "sink dimensions (channels of the residual stream)", "unset": "the adapter's known ones"})
    tau: float | None = field(default=None, metadata={
        "help": "sink threshold on the sink score", "unset": "the adapter's (25 for 7B-size models)"})
    k_divide: float = field(default=2.0, metadata={"help": "N in K = int(T / N) global sinks"})
    k: int | None = field(default=None, metadata={
        "help": "an explicit number of global sinks K instead of int(T / N)", "unset": "int(T / N)"})
    split_rule: str = field(default="rank", metadata={
        "help": "how MDS splits sinks into cross-modal / unimodal: 'rank' (halves by MDS, the authors') or "
                "'sign' (MDS threshold 0)"})
    criterion: str | None = field(default=None, metadata={
        "help": "sink criterion: 'phi' (the paper's) or 'magnitude' (small models)", "unset": "the adapter's"})

    def __post_init__(self) -> None:
        if self.dims is not None:
            if isinstance(self.dims, (str, bytes)) or not isinstance(self.dims, Sequence):
                raise InputError(f"SinkConfig.dims must be a list of channel indices, got {self.dims!r}")
            object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if self.tau is not None:
            object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "k_divide", float(self.k_divide))
        if not self.k_divide > 0:
            raise InputError(f"SinkConfig.k_divide (N in K = int(T / N)) must be positive, got {self.k_divide}")
        if self.k is not None and (isinstance(self.k, bool) or int(self.k) != self.k or self.k < 0):
            raise InputError(f"SinkConfig.k must be an int >= 0 or None, got {self.k!r}")
        if self.criterion is not None and self.criterion not in SINK_CRITERIA:
            raise InputError(f"SinkConfig.criterion must be None or one of {SINK_CRITERIA}, got {self.criterion!r}")
        if self.split_rule not in SPLIT_RULES:
            raise InputError(f"SinkConfig.split_rule must be one of {SPLIT_RULES}, got {self.split_rule!r}")

    def search_kwargs(self) -> dict[str, Any]:
        """Keywords of `find_sinks` / `sink_analysis`: ``dims``, ``tau``, ``k_divide``, ``k``, ``criterion``."""
        return {"dims": list(self.dims) if self.dims is not None else None, "tau": self.tau,
                "k_divide": self.k_divide, "k": self.k, "criterion": self.criterion}

    def with_(self, **changes: Any) -> "SinkConfig":
        """A copy with ``changes`` (``None`` values are ignored: "keep mine")."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dims"] = list(self.dims) if self.dims is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "SinkConfig" | None) -> "SinkConfig":
        """From `to_dict` output; keys this version does not know are ignored (newer files load)."""
        if isinstance(data, SinkConfig):
            return data
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise InputError(f"a sink config must be a SinkConfig or a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: ASD's sinks: N = 3 (METHOD.md section 6), where causal tracing uses N = 2 (section 5).
ASD_SINKS = SinkConfig(k_divide=3.0)

#: The flat sink fields of `ASDConfig` and `PipelineConfig` (shortcuts that override their ``sinks``).
SINK_SHORTCUTS = ("k_divide", "sink_dims", "tau", "split_rule", "criterion")
