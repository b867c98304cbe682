"""The result protocol shared by every result class of `analyses`.

Every result: ``to_frame()`` (a tidy table, one row per observation), ``summary()`` (a
DataFrame), ``save(path)`` / ``load(path)`` (``load(save(x))`` gives the same ``to_frame()``)
and ``plot()`` (a matplotlib ``Figure``; the drawing code lives in `analyses.plots`).

Two bases supply the persistence, so no result class writes its own:

- `JsonResult`: one JSON document from the class's ``to_dict()`` / ``from_dict()``; also
  ``to_json`` / ``from_json`` (JSON text or a file), the older names of ``save`` / ``load``.
- `RecordsResult`: per-clip records (``self.records``), saved as one JSON line each, which is
  also the format of the run files `dominance`, `evaluate` and `trace_dataset` write, so
  ``load`` reads those too.

Subclassing `Result` (through either base) registers the class in `RESULT_CLASSES`;
``tests/test_result_protocol.py`` checks the whole protocol on every registered class and
fails on a result class of `analyses` that is not registered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from nnsight_av.errors import InputError

from .store import read_jsonl, write_jsonl

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["Result", "JsonResult", "RecordsResult", "RESULT_CLASSES", "read_json", "plain", "frame_to_records",
           "frame_from_records"]

#: Every class following the protocol, by name (filled by subclassing `Result`).
RESULT_CLASSES: dict[str, type["Result"]] = {}


def read_json(text_or_path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Parse JSON text, or the file at a path; with ``kind``, check the payload's ``"kind"`` field.

    >>> read_json('{"kind": "X", "a": 1}', kind="X")["a"]
    1
    """
    text = str(text_or_path)
    if not text.lstrip().startswith("{"):
        text = Path(text).read_text()
    data = json.loads(text)
    if kind is not None and data.get("kind") != kind:
        raise InputError(f"this JSON does not hold a {kind}")
    return data


def plain(value: Any) -> Any:
    """``value`` with numpy scalars, arrays and tensors made plain Python (JSON-ready; floats keep every digit).

    >>> plain({"a": np.float32(0.5), "b": [np.int64(2)], "c": torch.tensor([1, 2])})
    {'a': 0.5, 'b': [2], 'c': [1, 2]}
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) or torch.is_tensor(value):
        return plain(value.tolist())
    return value


def frame_to_records(frame: "pd.DataFrame") -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready row dicts, exactly (`frame_from_records` reads them back).

    >>> import pandas as pd
    >>> frame_to_records(pd.DataFrame({"a": [1, 2], "b": [0.1 + 0.2, float("nan")]}))
    [{'a': 1, 'b': 0.30000000000000004}, {'a': 2, 'b': nan}]
    """
    return [plain(row) for row in frame.to_dict(orient="records")]


def frame_from_records(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> "pd.DataFrame":
    """The inverse of `frame_to_records` for a frame of known ``columns`` (in that order).

    >>> frame_from_records([{"a": 2, "b": float("nan")}], ["a", "b"]).to_dict("records")
    [{'a': 2, 'b': nan}]
    """
    import pandas as pd

    return pd.DataFrame(list(records), columns=list(columns))


class Result:
    """Base of every result class: the protocol (module text). Subclasses are registered."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__ != __name__:                    # the bases here are not results themselves
            RESULT_CLASSES[cls.__name__] = cls

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__} does not implement the result protocol's {method}()")

    def to_frame(self) -> "pd.DataFrame":
        """The tidy table: one row per observation."""
        raise self._missing("to_frame")

    def summary(self) -> "pd.DataFrame":
        """The headline numbers as a DataFrame."""
        raise self._missing("summary")

    def plot(self, **kwargs: Any) -> "Figure":
        """The result's figure (drawn by `analyses.plots`)."""
        raise self._missing("plot")

    def save(self, path: str | Path) -> Path:
        """Write the result to ``path``; ``type(self).load`` reads it back."""
        raise self._missing("save")

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read a file written by `save`."""
        raise NotImplementedError(f"{cls.__name__} does not implement the result protocol's load()")


class JsonResult(Result):
    """A result saved as one JSON document: define ``to_dict()`` and ``from_dict()`` (and the rest of the protocol)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready contents, with ``"kind"``: the class name."""
        raise self._missing("to_dict")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """The result from `to_dict` output."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_dict()")

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (written to ``path`` too when given); `save` is the protocol's name."""
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Any:
        """From JSON text or a file (`load`'s older name; also takes the text itself)."""
        data = read_json(text_or_path)
        if data.get("kind", cls.__name__) != cls.__name__:       # files of older versions carry no kind
            raise InputError(f"this JSON holds a {data['kind']}, not a {cls.__name__}")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON to ``path``; `load` reads it back."""
        path = Path(path)
        self.to_json(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read a file written by `save` (or `to_json`)."""
        return cls.from_json(Path(path))

    def summary(self) -> "pd.DataFrame":
        """One row: the result's scalar fields."""
        import pandas as pd

        scalars = {k: v for k, v in self.to_dict().items() if isinstance(v, (int, float, str, bool)) and k != "kind"}
        return pd.DataFrame([scalars])


class RecordsResult(Result):
    """A result held as per-clip JSON records (``self.records``), saved one JSON line each.

    ``record_key`` says which records are the same clip when a file holds several (the last
    one wins, as in every run file); ``_from_saved`` builds the result from the records read.
    """

    records: list[dict[str, Any]]
    record_key: ClassVar[Any] = "id"

    def save(self, path: str | Path) -> Path:
        """Write one JSON line per record (replacing ``path`` atomically)."""
        return write_jsonl(path, self.records)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Any:
        """Read a `save` / run file: bad lines skipped with a warning, the last record of each clip kept."""
        return cls._from_saved(read_jsonl(path, key=cls.record_key), Path(path), **kwargs)

    @classmethod
    def _from_saved(cls, records: list[dict[str, Any]], path: Path, **kwargs: Any) -> Any:
        return cls(records, **kwargs)  # type: ignore[call-arg]
