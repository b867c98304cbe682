"""Causal tracing's conditions, layer windows and token sets (METHOD.md section 5).

A condition is a named set of positions patched at every layer of a window. The token sets
are taken from the non-dominant modality: ``all``, its global sinks, count-matched random
controls, object tokens and the two MDS halves of the sinks.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Int

from nnsight_av.errors import InputError, LayerIndexError, MediaError, TokenSelectionError

from .ablation import zeroed_of

if TYPE_CHECKING:
    from nnsight_av import AVInputs

__all__ = ["TOKEN_SETS", "DEFAULT_TOKEN_SETS", "Condition", "window_label", "make_windows", "random_positions",
           "object_positions", "resolve_token_sets", "infer_dominant", "register_token_set", "registered_token_sets"]

#: Built-in token sets (all of the non-dominant modality's tokens, or subsets of them).
TOKEN_SETS = ("all", "sink", "random", "object", "cross_modal_sink", "unimodal_sink", "random_cross_modal_sink",
              "random_unimodal_sink")
DEFAULT_TOKEN_SETS = ("all", "sink", "random", "cross_modal_sink", "unimodal_sink", "random_cross_modal_sink")
_RANDOM_OF = {"random": "sink", "random_cross_modal_sink": "cross_modal_sink",
              "random_unimodal_sink": "unimodal_sink"}
#: Token sets other modules add (`register_token_set`): name -> (builder, the built-in set it derives from).
_REGISTERED: dict[str, tuple[Callable[..., Any], str]] = {}
_NEEDS_SPLIT = ("cross_modal_sink", "unimodal_sink")


def register_token_set(name: str, builder: Callable[..., Any], reference: str = "sink") -> None:
    """Make ``name`` a token set of `causal_trace` / `resolve_token_sets` (and the pipeline).

    ``builder(item, modality, reference_positions, *, seed, clip, name)`` returns positions;
    ``reference`` names the built-in set it is derived from (``"sink"``, ``"cross_modal_sink"``,
    ``"unimodal_sink"``, ``"all"`` ...), so the sinks or the MDS split are computed when needed.

    >>> import analyses                       # registers the matched random controls (analyses.controls)
    >>> registered_token_sets()["random_chunk"]
    'sink'
    """
    if name in TOKEN_SETS:
        raise InputError(f"{name!r} is a built-in token set and cannot be registered again")
    if reference not in TOKEN_SETS:
        raise InputError(f"reference must be a built-in token set {TOKEN_SETS}, got {reference!r}")
    _REGISTERED[str(name)] = (builder, reference)


def registered_token_sets() -> dict[str, str]:
    """Registered token set names with the built-in set each derives from."""
    return {name: reference for name, (_, reference) in _REGISTERED.items()}


# ---------------------------------------------------------------------------------------
# conditions
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """One patched run: clean values of ``positions`` written at ``site`` of every layer in ``layers``."""

    token_set: str
    positions: torch.Tensor           # sorted LongTensor (cpu)
    layers: tuple[int, ...]           # sorted

    @property
    def window(self) -> str:
        return window_label(self.layers)

    @property
    def start(self) -> int:
        return self.layers[0]


def window_label(layers: Sequence[int]) -> str:
    """``"3-7"`` for a contiguous window, ``"3"`` for one layer, ``"1,4,9"`` otherwise.

    >>> window_label([3, 4, 5]), window_label([2]), window_label([1, 4])
    ('3-5', '2', '1,4')
    """
    layers = sorted(layers)
    if len(layers) == 1:
        return str(layers[0])
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(l) for l in layers)


def make_windows(num_layers: int, layers: Sequence[int] | None = None, window: int | None = None
                 ) -> list[tuple[int, ...]]:
    """The layer windows of a sweep.

    ``window=None``: one window, ``layers`` (default: every layer) all at once.
    ``window=w``: a window ``[s, min(s + w, L))`` for each start ``s`` in ``layers``
    (default: every layer), clipped at the last layer.

    >>> make_windows(4), make_windows(4, window=2), make_windows(4, [1, 3])
    ([(0, 1, 2, 3)], [(0, 1), (1, 2), (2, 3), (3,)], [(1, 3)])
    """
    def check(l: int) -> int:
        if not isinstance(l, (int, np.integer)) or isinstance(l, bool) or not -num_layers <= int(l) < num_layers:
            raise LayerIndexError(f"layer {l!r} is out of range: this model has {num_layers} layers "
                                  f"(0..{num_layers - 1})")
        return int(l) % num_layers

    chosen = sorted({check(l) for l in layers}) if layers is not None else list(range(num_layers))
    if layers is not None and not chosen:
        raise LayerIndexError("layers is empty: give at least one layer to patch")
    if window is None:
        return [tuple(chosen)]
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise InputError(f"window must be a positive int (layers per window), got {window!r}")
    return [tuple(range(s, min(s + int(window), num_layers))) for s in chosen]


# ---------------------------------------------------------------------------------------
# token sets
# ---------------------------------------------------------------------------------------
def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def random_positions(pool: torch.Tensor, count: int, seed: int, clip: str = "", name: str = "random"
                     ) -> torch.Tensor:
    """``count`` positions drawn uniformly without replacement from ``pool``, sorted.

    The stream depends only on ``(seed, clip, name)``, so a rerun (or another process)
    draws the same set. ``count`` above the pool size takes the whole pool.

    >>> pool = torch.arange(10, 30)
    >>> a = random_positions(pool, 5, seed=0, clip="x")
    >>> a.tolist() == random_positions(pool, 5, seed=0, clip="x").tolist(), len(a)
    (True, 5)
    """
    pool = torch.as_tensor(pool, dtype=torch.long).flatten().cpu()
    count = min(int(count), pool.numel())
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), _stable_hash(clip),
                                                                      _stable_hash(name)])))
    picked = rng.choice(pool.numel(), size=count, replace=False)
    return torch.sort(pool[torch.as_tensor(picked, dtype=torch.long)]).values


def _load_mask(masks: Any) -> np.ndarray:
    if isinstance(masks, (str, Path)):
        path = Path(masks)
        if not path.exists():
            raise MediaError(f"object mask file not found: {str(path)!r}")
        masks = np.load(path)
    arr = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"object masks must be [frames, height, width] (or [height, width]), got shape {arr.shape}")
    return arr.astype(np.float32)


def object_positions(
    item: "AVInputs",
    modality: str,
    objects: Any,
    *,
    min_fraction: float | None = None,
) -> Int[torch.Tensor, "positions"]:
    """Object tokens of ``modality`` from positions, video masks or audio time ranges.

    ``objects``: positions (list / tensor), or a dict with any of ``positions``,
    ``video_masks`` (``[frames, H, W]`` array or ``.npy`` path, frames as sampled for the
    model; one ``[H, W]`` mask for all frames), ``audio_times`` (``[[start_s, end_s], ...]``)
    and ``min_fraction`` (default 0.5). A video token is an object token when at least
    ``min_fraction`` of its pixel patch is inside the mask in *both* frames of its temporal
    patch; an audio token when its 2-second chunk overlaps a time range. Only positions of
    ``modality`` are kept.
    """
    length = len(item)
    base = getattr(item.spans, modality)
    if isinstance(objects, Mapping):
        spec = dict(objects)
    else:
        spec = {"positions": objects}
    fraction = float(spec.get("min_fraction", 0.5) if min_fraction is None else min_fraction)
    found: set[int] = set()
    if spec.get("positions") is not None:
        pos = torch.as_tensor(list(spec["positions"]) if not torch.is_tensor(spec["positions"])
                              else spec["positions"], dtype=torch.long).flatten()
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
            raise TokenSelectionError(f"object positions must lie in [0, {length})")
        found |= set(pos.tolist())
    if modality == "video" and spec.get("video_masks") is not None:
        found |= set(_video_mask_tokens(item, _load_mask(spec["video_masks"]), fraction))
    if modality == "audio" and spec.get("audio_times") is not None:
        found |= set(_audio_time_tokens(item, spec["audio_times"]))
    keep = sorted(p for p in found if p in set(base.tolist()))
    return torch.tensor(keep, dtype=torch.long)


def _video_mask_tokens(item: "AVInputs", masks: np.ndarray, fraction: float) -> list[int]:
    grids = item.data.get("video_grid_thw")
    if grids is None:
        raise InputError("video masks need a video input (no video_grid_thw in this input)")
    grids = torch.as_tensor(grids).reshape(-1, 3).tolist()
    if len(grids) != 1:
        raise InputError(f"video masks support one video per input, this one has {len(grids)}")
    t, h, w = (int(v) for v in grids[0])
    per_patch = max(1, len(item.spans.video) // max(1, t))
    merge = max(1, math.isqrt(max(1, h * w // per_patch)))     # spatial merge (2 in Qwen-Omni)
    rows, cols = h // merge, w // merge
    frames = item.request.video.shape[0] if item.request.video is not None else masks.shape[0]
    if masks.shape[0] == 1:
        masks = np.repeat(masks, frames, axis=0)
    if masks.shape[0] != frames:
        raise InputError(f"object masks have {masks.shape[0]} frames but the clip was sampled to {frames}")
    # Temporal patches take frames in pairs; the processor repeats the last frame of an odd count.
    need = 2 * t
    if masks.shape[0] < need:
        masks = np.concatenate([masks, np.repeat(masks[-1:], need - masks.shape[0], axis=0)])
    cover = torch.nn.functional.interpolate(torch.from_numpy(masks[:need] > 0).float()[:, None],
                                            size=(rows, cols), mode="area")[:, 0]      # [2t, rows, cols]
    inside = (cover >= fraction - 1e-6).reshape(t, 2, rows * cols).all(1).reshape(-1)   # [t * rows * cols]
    video = item.spans.video.tolist()
    if len(video) != inside.numel():
        raise InputError(f"video token count {len(video)} does not match the grid ({inside.numel()})")
    return [video[k] for k in torch.nonzero(inside).flatten().tolist()]


def _audio_time_tokens(item: "AVInputs", times: Any) -> list[int]:
    ranges = [(float(a), float(b)) for a, b in times]
    out: list[int] = []
    if item.spans.chunks:
        for chunk in item.spans.chunks:
            if any(a < chunk.end_s and b > chunk.start_s for a, b in ranges):
                out += chunk.audio.tolist()
        return out
    # Separate audio block: 25 tokens per second (Qwen-Omni), 2-second chunks.
    for j, pos in enumerate(item.spans.audio.tolist()):
        start = (j // 50) * 2.0
        if any(a < start + 2.0 and b > start for a, b in ranges):
            out.append(pos)
    return out


def _sink_positions(sinks: Any, item: "AVInputs", modality: str) -> torch.Tensor:
    if sinks is None:
        raise InputError("sink positions are needed")
    if hasattr(sinks, "sinks") and hasattr(sinks, "mds"):      # SinkAnalysis
        sinks = sinks.sinks
    if hasattr(sinks, modality) and not isinstance(sinks, Mapping):
        pos = torch.as_tensor(getattr(sinks, modality), dtype=torch.long)
    elif isinstance(sinks, Mapping):
        pos = torch.as_tensor(list(sinks.get(modality, [])), dtype=torch.long)
    else:
        pos = torch.as_tensor(list(sinks) if not torch.is_tensor(sinks) else sinks, dtype=torch.long)
    pos = pos.flatten().cpu()
    base = set(getattr(item.spans, modality).tolist())
    return torch.tensor(sorted(p for p in set(pos.tolist()) if p in base), dtype=torch.long)


def resolve_token_sets(
    item: "AVInputs",
    modality: str,
    token_sets: Sequence[str] | Mapping[str, Any],
    *,
    sinks: Any = None,
    split: Any = None,
    objects: Any = None,
    seed: int = 0,
    clip: str = "clip",
) -> dict[str, torch.Tensor]:
    """Positions of each token set, for one clip whose ``modality`` tokens are patched.

    Names: ``all`` (every ``modality`` token), ``sink`` (its global sinks, from ``sinks``),
    ``random`` (as many tokens as ``sink``, drawn with `random_positions`), ``object``
    (`object_positions` of ``objects``), ``cross_modal_sink`` / ``unimodal_sink`` (the MDS
    halves of that modality's sinks, from ``split``: video -> va / vv, audio -> av / aa),
    ``random_cross_modal_sink`` / ``random_unimodal_sink`` (random, count-matched to the
    halves). A mapping gives custom sets: name -> positions, a callable ``f(item)``, or
    a built-in name.
    """
    if isinstance(token_sets, str):
        token_sets = [token_sets]
    spec: dict[str, Any] = dict(token_sets) if isinstance(token_sets, Mapping) else {n: n for n in token_sets}
    if not spec:
        raise InputError("token_sets is empty")
    out: dict[str, torch.Tensor] = {}
    length = len(item)
    pool = getattr(item.spans, modality).long().cpu()

    def builtin(name: str) -> torch.Tensor:
        if name == "all":
            return pool
        if name == "sink":
            return _sink_positions(sinks, item, modality)
        if name in _RANDOM_OF:
            return random_positions(pool, builtin(_RANDOM_OF[name]).numel(), seed, clip, name)
        if name == "object":
            if objects is None:
                raise InputError("the 'object' token set needs objects= (positions, video masks or audio times)")
            return object_positions(item, modality, objects)
        if name in _REGISTERED:
            build, reference = _REGISTERED[name]
            return torch.as_tensor(build(item, modality, builtin(reference), seed=seed, clip=clip, name=name),
                                   dtype=torch.long)
        if name in _NEEDS_SPLIT:
            if split is None:
                raise InputError(f"the {name!r} token set needs the sink split (split= or sinks with MDS)")
            part = split.cross_modal(modality) if name == "cross_modal_sink" else split.unimodal(modality)
            return torch.as_tensor(part, dtype=torch.long).flatten().cpu()
        raise InputError(f"unknown token set {name!r}; built-in sets: {TOKEN_SETS}, registered: "
                         f"{sorted(_REGISTERED)} (or pass a dict of positions)")

    for name, value in spec.items():
        if isinstance(value, str):
            pos = builtin(value)
        elif callable(value):
            pos = torch.as_tensor(value(item), dtype=torch.long)
        else:
            pos = torch.as_tensor(value.tolist() if torch.is_tensor(value) else list(value), dtype=torch.long)
        pos = torch.unique(pos.flatten().cpu())
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
            raise TokenSelectionError(f"token set {name!r} has positions outside [0, {length}) "
                                      f"(min {int(pos.min())}, max {int(pos.max())})")
        out[str(name)] = pos
    return out


def infer_dominant(clean: "AVInputs", corrupt: "AVInputs") -> str:
    """Which modality ``corrupt`` removed from ``clean`` (its encoder zeroed, or its media all zero)."""
    zeroed = zeroed_of(corrupt)
    if len(zeroed) == 1:
        return zeroed[0]
    removed = []
    for name in ("audio", "video"):
        a, b = getattr(clean.request, name), getattr(corrupt.request, name)
        if a is not None and b is not None and np.shape(a) == np.shape(b) and not np.any(b) and np.any(a):
            removed.append(name)
    if len(removed) == 1:
        return removed[0]
    raise InputError("cannot tell which modality the corrupt input removed (expected exactly one of audio/video "
                     "silenced, blacked out or encoder-zeroed); pass dominant='audio' or 'video'")
