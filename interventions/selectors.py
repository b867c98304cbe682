"""Token selectors: which positions of one input an intervention touches.

A selector is resolved against *each invoke's own* `Spans`, so one intervention applies
to a batch of inputs of different lengths. Accepted forms:

- ``None`` or ``"all"``: every position of the current sequence (prompt, and generated
  tokens during generation).
- a span name: ``"video"``, ``"audio"``, ``"image"``, ``"text"``, ``"prompt"``, ``"system"``,
  ``"media"``, ``"first"``, ``"assistant"``, ``"chunk2"``, ``"chunk2.video"``, ...
- ``"generated"``: positions after the prompt (empty during the prefill).
- the name of a *set* (e.g. ``"sinks"``, ``"cross_modal_sink"``), looked up in the ``sets``
  given to ``apply``/``run``, then in the intervention's own ``sets=``.
- explicit positions: an int, a list of ints or a LongTensor; negative values count from
  the end of the current sequence (``-1`` is the newest token at every generation step).
- a list mixing the above: their union.

Positions are in the input's own coordinates (0 = its first token); padding added by
batching is accounted for by the intervention machinery.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import torch
from jaxtyping import Int

from nnsight_av.errors import TokenSelectionError
from nnsight_av.spans import Spans

__all__ = ["TokenSelector", "normalize_selector", "resolve_tokens", "selector_to_json", "uses_generated"]

TokenSelector = Union[None, str, int, Sequence[Union[int, str]], torch.Tensor]
SPECIAL = ("all", "generated")


def normalize_selector(selector: Any) -> Any:
    """A hashable canonical form: ``None``, a str, an int, or a tuple of str/int.

    >>> normalize_selector(torch.tensor([3, 1]))
    (3, 1)
    >>> normalize_selector(["video", 5])
    ('video', 5)
    """
    if selector is None or isinstance(selector, str):
        return selector
    if isinstance(selector, bool):
        raise TokenSelectionError(f"a token selector cannot be a bool ({selector!r})")
    if isinstance(selector, int):
        return int(selector)
    if isinstance(selector, torch.Tensor):
        if selector.dtype == torch.bool:
            return tuple(int(i) for i in selector.nonzero().flatten().tolist())
        if selector.dtype.is_floating_point:
            raise TokenSelectionError(f"token positions must be integers, got a {selector.dtype} tensor")
        return tuple(int(i) for i in selector.flatten().tolist())
    if isinstance(selector, (list, tuple, range)):
        out = []
        for item in selector:
            if isinstance(item, bool):
                raise TokenSelectionError(f"a token position cannot be a bool ({item!r})")
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, int) or (isinstance(item, torch.Tensor) and item.numel() == 1):
                out.append(int(item))
            else:
                raise TokenSelectionError(f"token selector items must be positions or names, got {item!r}")
        return tuple(out)
    if hasattr(selector, "tolist"):  # numpy arrays
        return normalize_selector(list(selector.tolist()))
    raise TokenSelectionError(f"cannot use {type(selector).__name__} as a token selector; pass a span name, "
                              f"a set name, positions or None")


def selector_to_json(selector: Any) -> Any:
    selector = normalize_selector(selector)
    return list(selector) if isinstance(selector, tuple) else selector


def uses_generated(selector: Any) -> bool:
    """Whether ``selector`` may legitimately be empty at the prefill (it names generated tokens)."""
    if isinstance(selector, str):
        return selector == "generated"
    if isinstance(selector, tuple):
        return any(uses_generated(s) for s in selector)
    return False


def _as_positions(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
        if t.dtype == torch.bool:
            return t.nonzero().flatten()
        return t.flatten().long()
    try:
        return torch.as_tensor(list(value), dtype=torch.long).flatten()
    except (TypeError, ValueError):
        raise TokenSelectionError(f"set {name!r} must hold token positions, got {type(value).__name__}") from None


def resolve_tokens(
    selector: Any,
    spans: Spans,
    length: int,
    total: int | None = None,
    sets: Mapping[str, Any] | None = None,
    allow_empty: bool = False,
) -> Int[torch.Tensor, "positions"]:
    """Sorted unique positions (CPU LongTensor) ``selector`` names in one input.

    ``length`` is the prompt length, ``total`` the current sequence length (prompt plus
    tokens generated so far; defaults to ``length``). Raises `TokenSelectionError` for an
    unknown name, a position outside ``[-total, total)``, or an empty result (unless
    ``allow_empty`` or the selector names generated tokens).

    >>> spans = Spans.empty(6)
    >>> resolve_tokens([0, -1], spans, 6).tolist()
    [0, 5]
    >>> resolve_tokens("generated", spans, 6, total=8).tolist()
    [6, 7]
    >>> resolve_tokens([9], spans, 6)
    Traceback (most recent call last):
    ...
    nnsight_av.errors.TokenSelectionError: token position 9 is out of range for a sequence of 6 tokens
    """
    total = length if total is None else total
    sets = sets or {}
    selector = normalize_selector(selector)

    def one(item: Any) -> torch.Tensor:
        if item is None or item == "all":
            return torch.arange(total)
        if isinstance(item, int):
            if not -total <= item < total:
                raise TokenSelectionError(f"token position {item} is out of range for a sequence of {total} tokens")
            return torch.tensor([item % total])
        if item == "generated":
            return torch.arange(length, total)
        if item in sets:
            positions = _as_positions(sets[item], item)
            bad = positions[(positions < 0) | (positions >= total)]
            if len(bad):
                raise TokenSelectionError(f"set {item!r} holds position {int(bad[0])}, out of range for a "
                                          f"sequence of {total} tokens")
            return positions
        try:
            return spans.get(item)
        except TokenSelectionError as error:
            names = ", ".join(sorted(sets)) or "none given"
            raise TokenSelectionError(f"{error}; named sets: {names}; special: all, generated") from None

    if isinstance(selector, tuple):
        parts = [one(item) for item in selector]
        positions = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    else:
        positions = one(selector)
    positions = torch.unique(positions.long())  # sorted
    if len(positions) == 0 and not allow_empty and not uses_generated(selector):
        raise TokenSelectionError(f"token selector {selector!r} selects no tokens in this input "
                                  f"({spans!r}); pass allow_empty=True if an empty set is intended")
    return positions
