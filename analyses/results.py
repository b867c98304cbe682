"""The result protocol shared by the result classes (sinks, MDS, traces, decoding, CHAIR).

Every result: ``to_frame()`` (a tidy table), ``summary()`` (a DataFrame), ``save(path)`` /
``load(path)`` and ``plot()`` (figures come from `analyses.plots`). `JsonResult` supplies
``save`` / ``load`` / ``to_json`` from a class's ``to_dict`` / ``from_json``, a one-row
``summary`` of its scalar fields, and a ``plot`` that says there is none. Old names stay:
``to_json`` / ``from_json`` (JSON text or a file) are aliases of ``save`` / ``load``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnsight_av.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


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


class JsonResult:
    """Mixin: the result protocol from the class's ``to_dict()`` / ``from_json()`` / ``to_frame()``."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_frame(self) -> "pd.DataFrame":  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (written to ``path`` too when given); `save` is the protocol's name."""
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON to ``path``; `load` reads it back."""
        path = Path(path)
        self.to_json(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read a file written by `save` (or `to_json`)."""
        return cls.from_json(Path(path))  # type: ignore[attr-defined]

    def summary(self) -> "pd.DataFrame":
        """One row: the result's scalar fields."""
        import pandas as pd

        scalars = {k: v for k, v in self.to_dict().items() if isinstance(v, (int, float, str, bool)) and k != "kind"}
        return pd.DataFrame([scalars])

    def plot(self, **kwargs: Any) -> Any:
        """This result's figure (`analyses.plots`); results without one raise `InputError`."""
        raise InputError(f"{type(self).__name__} has no plot")
