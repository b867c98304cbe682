"""Batches of clips for data-set runs: how many fit in memory, grouped by length, split back per clip.

- `pipeline_token_bytes` estimates what one token of one clip costs the per-clip pipeline
  (`analyses.runner.analyze_batch`): the cached corrupted runs, the clean run's keys/values and
  site values, and the transient activations of a forward, from the model's config (layers,
  hidden size, heads, KV heads, MLP size, dtype).
- `choose_batch_size` divides a share of the free memory (``torch.cuda.mem_get_info`` on a
  GPU, psutil's available memory on a CPU) by that estimate times the longest clip's tokens.
- `length_batches` sorts clips by length before cutting batches, so a batch pads little.
- `take_row` cuts one clip's
  part back out of a batch tensor, so every per-clip record looks like one of a forward of
  that clip alone (right padding changes nothing at a clip's own positions under causal
  attention).
- `prefetched` prepares the next group of clips on a CPU thread while the model runs the
  current one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from nnsight_av.errors import InputError

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["free_memory", "pipeline_token_bytes", "choose_batch_size", "resolve_batch_size", "length_batches",
           "take_row", "prefetched", "MEMORY_SHARE", "MAX_BATCH", "MAX_BATCH_TOKENS",
           "CPU_BATCH"]

#: Share of the free memory a batch may take (the rest is headroom for the allocator and kernels' workspace).
MEMORY_SHARE = 0.5
#: Most clips `choose_batch_size` puts in one batch,
MAX_BATCH = 64
#: and most tokens (clips x the longest one): a forward of this many tokens keeps a GPU busy, so larger
#: batches only cost memory (and make the first batch of a run wait longer for its inputs).
MAX_BATCH_TOKENS = 16_384
#: Batch size on a CPU without a memory reading (a CPU gains little from batching; it only bounds memory).
CPU_BATCH = 4

T = TypeVar("T")
R = TypeVar("R")


def free_memory(device: "torch.device | str") -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on a GPU, available RAM on a CPU (None: unknown).

    >>> free_memory("cpu") > 0
    True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of our dependencies, but not declared
        return None


def pipeline_token_bytes(model: "AVModel") -> int:
    """Bytes one token of one clip costs the batched per-clip pipeline, from the model's config.

    Kept per clip while its batch runs: two corrupted runs (every layer's input and keys/values)
    and the clean run (keys/values, the patched site at every position); transient, while a
    forward runs (the two corrupted runs of a clip share one): a few hidden-size and MLP-size
    activations and the attention's float32 row statistics.

    >>> import nnsight_av as nav
    >>> pipeline_token_bytes(nav.testing.tiny_model()) > 0
    True
    """
    config = model.adapter.text_config
    layers, hidden = int(model.num_layers), int(model.hidden_size)
    heads = int(model.num_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    mlp = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    elem = model.raw("embed").weight.element_size()
    kv = 2 * kv_heads * head_dim
    kept = layers * (2 * (hidden + kv) + kv + hidden)              # corrupted x 2 (resid + kv), clean kv + site
    transient = 2 * (6 * hidden + 3 * mlp + 2 * kv)                 # the two corrupted runs share one forward
    return elem * (kept + transient) + 4 * heads * 2


def choose_batch_size(model: "AVModel", tokens: int, *, share: float = MEMORY_SHARE, max_batch: int = MAX_BATCH,
                      max_tokens: int = MAX_BATCH_TOKENS, free: int | None = None, token_bytes: int | None = None
                      ) -> int:
    """Clips per batch so that ``share`` of the free memory holds a batch of ``tokens``-token clips.

    ``free`` overrides the measured free bytes (`free_memory` of the model's device), ``token_bytes``
    the estimate of `pipeline_token_bytes` (e.g. with a measured one). Without a memory reading:
    `CPU_BATCH`. Always between 1 and ``max_batch``, and at most ``max_tokens`` tokens in all.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> choose_batch_size(model, 1600, free=10 * 1600 * pipeline_token_bytes(model))
    5
    >>> choose_batch_size(model, 1600, free=0), choose_batch_size(model, 1600, free=2**50)
    (1, 10)
    """
    if not 0 < share <= 1:
        raise InputError(f"share must be in (0, 1], got {share!r}")
    if max_batch < 1:
        raise InputError(f"max_batch must be at least 1, got {max_batch!r}")
    if free is None:
        free = free_memory(model.raw("embed").weight.device)
    if free is None:
        return min(CPU_BATCH, max_batch)
    tokens = max(1, int(tokens))
    per_clip = tokens * (token_bytes or pipeline_token_bytes(model))
    return max(1, min(max_batch, max_tokens // tokens, int(share * free) // per_clip))


def resolve_batch_size(value: "int | str | None", what: str = "clip_batch") -> "int | None":
    """``"auto"`` / None -> None (choose from memory), a positive int -> itself; `InputError` otherwise.

    >>> resolve_batch_size("auto"), resolve_batch_size(8)
    (None, 8)
    """
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be a positive int or 'auto', got {value!r}")
    return value


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches of at most ``batch_size``, sorted by length (shortest first),
    so that each batch pads its clips to a similar length.

    >>> length_batches([50, 10, 40, 20, 30], 2)
    [[1, 3], [4, 2], [0]]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def take_row(value: Any, row: int, batch: int, total: int, length: int) -> Any:
    """Row ``row`` of a right-padded batch value, its sequence dimensions cut to the row's ``length``.

    A tensor's sequence dimensions are those of size ``total`` (the padded length); its batch
    dimension is the last one of size ``batch`` before the first sequence dimension (none: the
    value is shared by the batch). Tuples and lists are cut element-wise; anything else is shared.
    Needs ``batch < total`` (the caller falls back to clip by clip otherwise).

    >>> x = torch.arange(2 * 5 * 3).reshape(2, 5, 3)          # [batch, seq, hidden]
    >>> take_row(x, 1, 2, 5, 4).shape, bool((take_row(x, 1, 2, 5, 4) == x[1:2, :4]).all())
    (torch.Size([1, 4, 3]), True)
    >>> take_row(torch.ones(3, 2, 5, 8), 0, 2, 5, 4).shape     # M-RoPE [3, batch, seq, dim]
    torch.Size([3, 1, 4, 8])
    """
    if isinstance(value, (tuple, list)):
        return type(value)(take_row(v, row, batch, total, length) for v in value)
    if not torch.is_tensor(value) or value.dim() == 0:
        return value
    shape = list(value.shape)
    seq = [d for d, size in enumerate(shape) if size == total]
    first = seq[0] if seq else len(shape)
    rows = [d for d in range(first) if shape[d] == batch]
    out = value.narrow(rows[-1], row, 1) if rows else value
    for d in seq:
        out = out.narrow(d, 0, length)
    return out


def prefetched(groups: Iterable[T], prepare: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """``(group, prepare(group))`` for each group, the next group prepared on a thread meanwhile.

    The processor's work (decoding, resizing, the ablated copies) runs on the CPU while the
    model runs the previous group; an exception of ``prepare`` comes out when its group is reached.

    >>> [out for _, out in prefetched([1, 2, 3], lambda g: g * 10)]
    [10, 20, 30]
    """
    it = iter(groups)
    with ThreadPoolExecutor(1) as pool:
        try:
            group = next(it)
        except StopIteration:
            return
        pending = pool.submit(prepare, group)
        while True:
            try:
                following = next(it)
            except StopIteration:
                following = None
                has_next = False
            else:
                has_next = True
            done = pending.result()
            if has_next:
                pending = pool.submit(prepare, following)
            yield group, done
            if not has_next:
                return
            group = following
