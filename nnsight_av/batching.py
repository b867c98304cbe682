"""From what a user passes to a batch the model runs: inputs, batches, per-input specs, layers.

The small steps every runtime and analysis takes before a forward: accept one `AVInputs` or a
list (`as_list`), cut it into batches with a progress bar (`progress_batches`), collate a batch
right-padded (`collate_right`), resolve a per-input position spec (`per_item`, `positions_of`)
and check a layer list (`check_layers`); move a small host tensor to the device without
waiting for the queued kernels (`to_device`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch

from .errors import InputError, TokenSelectionError
from .inputs import AVInputs

if TYPE_CHECKING:
    from .model import AVModel

__all__ = ["as_list", "progress_batches", "pad_id", "collate_right", "batch_tensors", "check_positions",
           "positions_of", "per_item", "check_layers", "to_device"]


def as_list(inputs: "AVInputs | Sequence[AVInputs]") -> tuple[list[AVInputs], bool]:
    """``(list_of_inputs, was_single)`` from one `AVInputs` or a list, tuple or other iterable of them.

    Raises `InputError` on an empty sequence or anything that is not `AVInputs`.

    >>> import nnsight_av as nav
    >>> ex = nav.testing.tiny_model().prepare(text="hi")
    >>> as_list(ex)[1], len(as_list([ex, ex])[0])
    (True, 2)
    """
    if isinstance(inputs, AVInputs):
        return [inputs], True
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, Mapping, torch.Tensor)):
        items = list(inputs)
        if not items:
            raise InputError("got an empty list of inputs")
        for k, item in enumerate(items):
            if not isinstance(item, AVInputs):
                raise InputError(f"input {k} is a {type(item).__name__}, not AVInputs (from model.prepare)")
        return items, False
    raise InputError(f"inputs must be AVInputs (from model.prepare) or a list of them, got {type(inputs).__name__}")


def progress_batches(items: list[Any], batch_size: int, progress: bool, desc: str) -> Iterator[list[Any]]:
    """Batches of ``items``, with a tqdm bar (counting inputs) when there is more than one input.

    >>> [len(b) for b in progress_batches(list(range(5)), 2, False, "demo")]
    [2, 2, 1]
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    bar = tqdm(total=len(items), desc=desc, disable=not progress or len(items) < 2, leave=False)
    for chunk in batches:
        yield chunk
        bar.update(len(chunk))
    bar.close()


def pad_id(model: "AVModel") -> int:
    """The token id a batch is padded with: the tokenizer's pad token, else 0."""
    return (model.tokenizer.pad_token_id if model.tokenizer is not None else 0) or 0


def collate_right(model: "AVModel", batch: Sequence[AVInputs]) -> dict[str, Any]:
    """The processor tensors of ``batch`` as one right-padded batch (a copy of the data for one input).

    Right padding keeps every input at its own positions, so a prefill needs no position shift.
    """
    if len(batch) == 1:
        return dict(batch[0].data)
    return model.adapter.collate([item.data for item in batch], padding_side="right", pad_id=pad_id(model))


def batch_tensors(chunk: Sequence[Any], per_item: list[torch.Tensor], fill: int) -> torch.Tensor:
    """Right-pad 1-D tensors (one per input of a batch) into ``[B, max_len]`` with ``fill``.

    >>> batch_tensors([None, None], [torch.tensor([1, 2]), torch.tensor([3])], -1).tolist()
    [[1, 2], [3, -1]]
    """
    width = max((t.numel() for t in per_item), default=0)
    out = torch.full((len(chunk), width), fill, dtype=torch.long)
    for i, t in enumerate(per_item):
        out[i, :t.numel()] = t
    return out


def check_positions(value: Any, length: int, what: str) -> torch.Tensor:
    """``value`` (a tensor or a list of ints) as a flat CPU LongTensor of positions in ``[0, length)``.

    Order and repeats are kept. Raises `TokenSelectionError` for a position out of range.

    >>> check_positions([3, 0], 5, "column").tolist()
    [3, 0]
    """
    if isinstance(value, torch.Tensor):
        pos = value.long().flatten().cpu()
    else:
        pos = torch.as_tensor(list(value), dtype=torch.long).flatten()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
        raise TokenSelectionError(f"{what} positions must lie in [0, {length}); got min {int(pos.min())}, "
                                  f"max {int(pos.max())}")
    return pos


def positions_of(spec: Any, item: AVInputs, what: str) -> torch.Tensor:
    """Positions from a span name (``"video"``, ``"chunk1.audio"``), a tensor or a list of ints."""
    if isinstance(spec, str):
        return item.spans.get(spec).long().cpu()
    return check_positions(spec, len(item), what)


def per_item(spec: Any, items: list[AVInputs], single: bool) -> list[Any]:
    """A per-input spec: one shared spec, or (for a list of inputs) a list with one spec per input.

    >>> per_item("video", [None, None], False), per_item([[1], [2]], [None, None], False)
    (['video', 'video'], [[1], [2]])
    """
    if not single and isinstance(spec, (list, tuple)) and len(spec) == len(items) and spec and \
            all(isinstance(s, (list, tuple, torch.Tensor, str)) for s in spec):
        return list(spec)
    return [spec] * len(items)


def check_layers(model: "AVModel", layers: Sequence[int] | None) -> list[int]:
    """``layers`` checked against the model (`LayerIndexError`), in the given order; None: every layer."""
    if layers is None:
        return list(range(model.num_layers))
    return [model.check_layer(l) for l in layers]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``, without making the host wait for the kernels already queued.

    A plain ``.to("cuda")`` of a pageable host tensor synchronises the stream first, so a small
    index moved inside a forward (once per layer, say) would serialise the host and the GPU;
    a pinned, non-blocking copy runs in stream order instead.

    >>> to_device(torch.arange(3), "cpu")
    tensor([0, 1, 2])
    """
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
