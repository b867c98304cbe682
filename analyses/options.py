"""Answer-letter probabilities at the first generated position (METHOD.md section 4).

``P[o]`` is the softmax over the whole vocabulary of the logits at the last prompt
position (what the first generated token is drawn from), read at the token for ``"o"``
and at the token for ``" o"``; the larger of the two counts. One forward gives every
option's probability, so no ``generate`` is needed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float

from nnsight_av.batching import as_list, to_device
from nnsight_av.errors import InputError, TokenSelectionError

from interventions.runtime.hooks import applied

from .ablation import ablation_intervention

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["option_probs", "option_token_ids", "letter_probs", "answers", "normalize_options"]


def normalize_options(options: Any) -> list[str]:
    """Option letters from a list of letters, a dict ``{letter: name}``, or a string ``"ABCD"``.

    >>> normalize_options({"A": "dog", "B": "cat"}), normalize_options("ABC")
    (['A', 'B'], ['A', 'B', 'C'])
    """
    if isinstance(options, str):
        letters = list(options)
    elif isinstance(options, Mapping):
        letters = [str(k) for k in options]
    elif isinstance(options, Sequence):
        letters = [str(o) for o in options]
    else:
        raise InputError(f"options must be a list of letters, a dict or a string, got {type(options).__name__}")
    if not letters:
        raise InputError("options is empty: give at least one answer letter")
    if len(set(letters)) != len(letters):
        raise InputError(f"options repeat a letter: {letters}")
    return letters


def option_token_ids(tokenizer: Any, options: Any) -> list[list[int]]:
    """For each option, the ids of ``"o"`` and (when it is one token) ``" o"``.

    Raises `TokenSelectionError` when ``"o"`` itself is not exactly one token: its
    probability at the first generated position would then not be one softmax entry.

    >>> import nnsight_av as nav
    >>> tok = nav.testing.tiny_model().tokenizer
    >>> ids = option_token_ids(tok, ["A", "B"])
    >>> [len(v) for v in ids], ids[0][0] != ids[0][1]
    ([2, 2], True)
    """
    if tokenizer is None:
        raise InputError("this model has no tokenizer, so answer letters cannot be mapped to token ids")
    out = []
    for option in normalize_options(options):
        variants: list[int] = []
        for text in (option, " " + option):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                if ids[0] not in variants:
                    variants.append(int(ids[0]))
            elif text == option:
                raise TokenSelectionError(
                    f"option {option!r} is not a single token for this tokenizer (it encodes to {len(ids)} tokens: "
                    f"{ids}); answer options must be single tokens such as letters")
        out.append(variants)
    return out


def letter_probs(logits: Float[torch.Tensor, "... vocab"], token_ids: Sequence[Sequence[int]]
                 ) -> Float[torch.Tensor, "... options"]:
    """``max(P["o"], P[" o"])`` per option from last-position logits (softmax in float32).

    >>> logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    >>> letter_probs(logits, [[0, 3], [1]]).tolist() == [torch.softmax(logits, -1)[3].item(),
    ...                                                   torch.softmax(logits, -1)[1].item()]
    True
    """
    probs = torch.softmax(logits.float(), dim=-1)
    groups = [list(ids) for ids in token_ids]
    # one index copied without waiting for the GPU (a list index per option would wait once per option)
    index = to_device(torch.tensor([i for ids in groups for i in ids], dtype=torch.long), probs.device)
    picked = probs.index_select(-1, index).split([len(ids) for ids in groups], dim=-1)
    return torch.stack([chunk.amax(-1) for chunk in picked], dim=-1)


def answers(probs: Float[torch.Tensor, "... options"], options: Any) -> list[str] | str:
    """The argmax letter (per row); ties go to the earlier option.

    >>> answers(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]), "ABC")
    ['B', 'A']
    """
    letters = normalize_options(options)
    idx = probs.argmax(-1)
    if idx.dim() == 0:
        return letters[int(idx)]
    return [letters[int(i)] for i in idx.tolist()]


def model_device(model: "AVModel") -> torch.device:
    for p in model.raw().parameters():
        return p.device
    return torch.device("cpu")


def on_device(model: "AVModel", item: "AVInputs") -> "AVInputs":
    """``item`` with its tensors on the model's device (moved only when they are elsewhere)."""
    device = model_device(model)
    ids = item.data.get("input_ids")
    if torch.is_tensor(ids) and ids.device != device:
        return item.to(device)  # dataclasses.replace keeps subclasses (and an ablation marker) intact
    return item


@contextmanager
def last_logits_only(model: "AVModel", last: Sequence[int]) -> Iterator[None]:
    """Within the block, the LM head sees only row ``b``'s position ``last[b]``.

    The logits of every other position are never needed here, and at a 150k vocabulary
    they cost as much as two or three decoder layers; the model returns ``[B, 1, vocab]``.
    """
    head = model.raw("lm_head")
    index = torch.as_tensor(list(last), dtype=torch.long)

    def pre(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, to_device(index, hidden.device)[: hidden.shape[0]]]
        return (picked[:, None],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def option_probs(
    model: "AVModel",
    inputs: "AVInputs | Sequence[AVInputs]",
    options: Any,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> Float[torch.Tensor, "... options"]:
    """Probability of each answer letter at the first generated position, for one input or a batch.

    One plain forward per ``batch_size`` inputs on the hook runtime (right padded, so row
    ``b`` is read at its own last prompt position). ``options``: letters (``"ABCD"``, a
    list, or a dict ``{letter: name}``); each must be a single token. Inputs made by
    ``analyses.ablate(..., method="encoder")`` get their `ablation_intervention` (the
    modality's embeddings zeroed) in that forward. Returns ``[option]`` for one input,
    ``[input, option]`` for a list.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(audio=nav.testing.synthetic_tone(1.0), text="What is making the sound?")
    >>> p = option_probs(model, ex, "ABCD")
    >>> p.shape, bool((p > 0).all() and p.sum() < 1)
    (torch.Size([4]), True)
    """
    from tqdm.auto import tqdm

    items, single = as_list(inputs)
    ids = option_token_ids(model.tokenizer, options)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    rows: list[torch.Tensor] = []
    bar = tqdm(total=len(items), desc="option probs", disable=not progress or len(items) < 2, leave=False)
    for start in range(0, len(items), batch_size):
        chunk = [on_device(model, item) for item in items[start:start + batch_size]]
        with torch.no_grad(), last_logits_only(model, [len(item) - 1 for item in chunk]), \
                applied(model, chunk, [ablation_intervention(item) for item in chunk]):
            logits = model.raw()(**model.module_inputs(list(chunk)), use_cache=False).logits
        rows += [letter_probs(logits[k, -1], ids).cpu() for k in range(len(chunk))]
        bar.update(len(chunk))
    bar.close()
    out = torch.stack(rows)
    return out[0] if single else out
