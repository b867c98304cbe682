"""The axis names of tensor shapes: every jaxtyping annotation in the library uses only these.

One name means one thing everywhere, so ``Float[torch.Tensor, "batch heads seq head_dim"]`` reads
the same in an attention kernel, a runtime hook and an analysis. Besides these names, an
annotation may hold fixed sizes (``1``, ``3``, ``8``) and ``...`` (any leading axes).
``tests/test_axes.py`` parses every annotation in ``nnsight_av/``, ``interventions/`` and
``analyses/`` and fails on any other name; ``docs/concepts.md`` lists the same table.

>>> AXES["kv_heads"]
'key/value heads (grouped-query attention: heads is a multiple of kv_heads)'
"""

from __future__ import annotations

import re

__all__ = ["AXES", "axis_names"]

#: Axis name -> what it counts (one line each).
AXES: dict[str, str] = {
    "batch": "inputs run in one forward, or one result per input stacked",
    "seq": "token positions of an input; in an attention call, its query rows",
    "keys": "key positions of an attention call (cached tokens, then seq)",
    "heads": "query heads",
    "kv_heads": "key/value heads (grouped-query attention: heads is a multiple of kv_heads)",
    "head_dim": "width of one head's query, key and value",
    "hidden": "width of a residual stream (the decoder's, or an encoder's output)",
    "layer": "decoder layers",
    "vocab": "vocabulary entries (logits)",
    "positions": "a selection of token positions (a span, a token set, an encoder's output tokens)",
    "rows": "chosen query rows",
    "columns": "chosen key columns (attention paid to them)",
    "groups": "row groups that attention is summed over (e.g. video rows, audio rows)",
    "sinks": "sink tokens (positions that absorb attention)",
    "options": "answer options of a multiple-choice question",
    "conditions": "conditions of a patching experiment",
    "samples": "audio samples (waveform)",
    "frames": "video frames, or audio feature frames",
    "mels": "mel-frequency bins of an audio feature frame",
    "height": "image rows (pixels)",
    "width": "image columns (pixels)",
}


def axis_names(shape: str) -> list[str]:
    """The axis names of a jaxtyping shape string, without fixed sizes, ``...`` and modifiers.

    Modifiers (``*``, ``#``, ``_``, ``?``) are stripped; ``rows=3`` names a fixed size and gives
    ``rows``; a symbolic size (``seq-1``) gives the names it uses.

    >>> axis_names("batch heads 1 head_dim")
    ['batch', 'heads', 'head_dim']
    >>> axis_names("*batch rows=3 seq-1 ...")
    ['batch', 'rows', 'seq']
    """
    names = []
    for token in shape.split():
        token = token.lstrip("*#_?")
        if "=" in token:
            token = token.split("=")[0]
        if token in ("...", "") or token.isdigit():
            continue
        names.extend(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", token) if not token.isidentifier() else [token])
    return names
