"""JSON round trips shared by the result classes (sinks, MDS, traces, decoding, CHAIR)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nnsight_av.errors import InputError


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
    """Mixin: ``to_json(path=None)`` from the class's ``to_dict()``."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (written to ``path`` too when given)."""
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text
