"""Causal tracing (activation patching) between a clean and a corrupted clip (METHOD.md section 5).

Source = the clean run (both modalities); target = the corrupted run (the dominant
modality removed). Clean activations of a token set of the *non-dominant* modality are
written into the corrupted run at a site of every layer of a window, during the prefill,
and the answer-letter probabilities are read at the last prompt position:

- ``IE_clean = P_patched[o_clean] - P_corrupt[o_clean]`` (restoring the clean answer);
- ``IE_corrupt = P_corrupt[o_corrupt] - P_patched[o_corrupt]`` (suppressing the corrupt one).

How the exact sweep saves work (every condition gives the same numbers as a full patched
forward; ``tests/test_tracing.py`` checks it against a plain loop):

1. one clean forward per clip caches the site only at the positions some token set patches;
2. one corrupted forward caches the residual stream (each layer's input), each layer's
   post-rotary keys/values and the keyword arguments the model passed to its layers;
3. a condition whose first patched layer is ``l`` and first patched position is ``p`` starts
   from the cached residual at layer ``l`` (layers below it equal the corrupted run) and
   computes only positions ``>= p`` (earlier positions cannot see the patch under causal
   attention), attending to the cached keys/values of positions ``< p``; the LM head runs
   on the last position only. Conditions with the same first layer are batched.

``interventions=`` adds a user's interventions (e.g. head knockouts) to every clean,
corrupted and patched forward, on the hook runtime (`interventions.runtime.applied`): the
patched runs compute a suffix over the cached prefix, and the runtime maps positions to
rows through the cache length, so the sweep stays exact and as fast (the skipping of
overwritten positions is turned off: it computes scattered rows). Sinks and their split are
still taken from the plain clean run.

``method="attribution"`` estimates every condition to first order instead:
``(a_clean - a_corrupt) . d P / d a`` summed over the patched positions and layers, from
the clean forward, one corrupted forward and a backward pass per effect (two in all).
"""

from __future__ import annotations

import json
import math
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from interventions.base import as_intervention
from interventions.site import ALIASES, canonical_role
from interventions.runtime.hooks import applied
from nnsight_av.errors import InputError, LayerIndexError, MediaError, TokenSelectionError
from nnsight_av.inputs import AVInputs

from .ablation import check_same_layout, encoder_edit, zeroed_of
from .mds import modality_dominance, sink_analysis
from .sinks import find_sinks
from .plots import LABEL_WIDTH, plot_trace_bars, plot_trace_heatmap  # noqa: F401  (LABEL_WIDTH: old home)
from .options import last_logits_only, letter_probs, normalize_options, on_device, option_token_ids

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["causal_trace", "TraceResult", "SITES", "TOKEN_SETS", "DEFAULT_TOKEN_SETS", "PatchRunner",
           "CleanRecord", "CorruptRecord", "Condition", "make_windows", "resolve_token_sets", "random_positions",
           "object_positions", "infer_dominant", "rank_agreement", "METHODS"]

#: Where clean activations are written. ``input_layernorm``: the normalised input to attention
#: (the paper's default); ``resid_pre`` / ``resid_post``: a layer's input / output;
#: ``attn_output`` / ``mlp_output``: the attention block's / MLP's output.
SITES = ("input_layernorm", "resid_pre", "resid_post", "attn_output", "mlp_output")
_SITE_ROLE = {"input_layernorm": "input_layernorm", "attn_output": "self_attn", "mlp_output": "mlp"}
#: Built-in token sets (all of the non-dominant modality's tokens, or subsets of them).
TOKEN_SETS = ("all", "sink", "random", "object", "cross_modal_sink", "unimodal_sink", "random_cross_modal_sink",
              "random_unimodal_sink")
DEFAULT_TOKEN_SETS = ("all", "sink", "random", "cross_modal_sink", "unimodal_sink", "random_cross_modal_sink")
METHODS = ("exact", "naive", "attribution")
_RANDOM_OF = {"random": "sink", "random_cross_modal_sink": "cross_modal_sink",
              "random_unimodal_sink": "unimodal_sink"}


def canonical_site(site: str) -> str:
    """``site`` with aliases resolved (the one table, `interventions.site.ALIASES`); `InputError` on an
    unknown site or one that cannot be patched.

    >>> canonical_site("layer_input"), canonical_site("input_layernorm")
    ('resid_pre', 'input_layernorm')
    """
    try:
        name = canonical_role(site)
    except InputError:
        name = None
    if name not in SITES:
        raise InputError(f"unknown site {site!r} for patching; choose one of {SITES} (aliases: "
                         f"{sorted(a for a, r in ALIASES.items() if r in SITES)})")
    return name


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
) -> Int[torch.Tensor, "n"]:
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
        if name in ("cross_modal_sink", "unimodal_sink"):
            if split is None:
                raise InputError(f"the {name!r} token set needs the sink split (split= or sinks with MDS)")
            part = split.cross_modal(modality) if name == "cross_modal_sink" else split.unimodal(modality)
            return torch.as_tensor(part, dtype=torch.long).flatten().cpu()
        raise InputError(f"unknown token set {name!r}; built-in sets: {TOKEN_SETS} (or pass a dict of positions)")

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


# ---------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------
@dataclass
class CleanRecord:
    """The clean run: letter probabilities and the site's values at ``positions`` for ``layers``.

    ``keys`` / ``kv_values`` (when recorded) hold each layer's post-rotary keys / values, which
    the exact sweep uses for positions it need not compute (see `PatchRunner`).
    """

    probs: Float[torch.Tensor, "option"]
    positions: Int[torch.Tensor, "n"]
    values: dict[int, torch.Tensor]                   # layer -> [n, hidden] on the model's device
    keys: dict[Any, torch.Tensor] | None = None
    kv_values: dict[Any, torch.Tensor] | None = None


@dataclass
class CorruptRecord:
    """The corrupted run, cached so a patched condition can start at any layer and position."""

    probs: Float[torch.Tensor, "option"]
    length: int
    resid: dict[int, torch.Tensor]                    # layer -> input of that layer [1, T, hidden]
    keys: dict[Any, torch.Tensor]                     # attention layer_idx -> post-rotary keys [1, kv, T, d]
    values: dict[Any, torch.Tensor]
    kwargs: list[dict[str, Any]]                      # keyword arguments the model passed to each layer
    deltas: list[torch.Tensor | None]                 # input(l + 1) - output(l), when the model adds something
    item: Any = None


class _KVRecorder:
    """Stands in for a KV cache in one forward: keeps each layer's keys/values, changes nothing."""

    def __init__(self) -> None:
        self.keys: dict[Any, torch.Tensor] = {}
        self.values: dict[Any, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: Any, *args: Any, **kwargs: Any):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _PrefixKV:
    """A KV cache holding the corrupted run's keys/values of positions ``< p0`` (read only)."""

    def __init__(self, keys: Mapping[Any, torch.Tensor], values: Mapping[Any, torch.Tensor], p0: int) -> None:
        self.keys, self.values, self.p0 = keys, values, p0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: Any, *args: Any, **kwargs: Any):
        if self.p0 == 0:
            return key_states, value_states
        batch = key_states.shape[0]
        pk = self.keys[layer_idx][:, :, : self.p0].expand(batch, -1, -1, -1)
        pv = self.values[layer_idx][:, :, : self.p0].expand(batch, -1, -1, -1)
        return torch.cat([pk, key_states], dim=2), torch.cat([pv, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.p0


class _ScatterKV:
    """Keys/values of a run that computes only the query positions ``rows`` (from ``p0`` on).

    Positions before ``p0`` take the corrupted run's keys/values, the skipped (patched and
    overwritten) positions the clean run's, and ``rows`` the ones computed in this call.
    """

    def __init__(self, corrupt: "CorruptRecord", clean: "CleanRecord", p0: int, rows: torch.Tensor) -> None:
        self.corrupt, self.clean, self.p0, self.rows = corrupt, clean, p0, rows

    def _fill(self, clean: torch.Tensor, corrupt: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        full = clean.clone()
        if self.p0:
            full[:, :, : self.p0] = corrupt[:, :, : self.p0]
        full[:, :, self.rows] = new
        return full

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: Any, *args: Any, **kwargs: Any):
        keys = self._fill(self.clean.keys[layer_idx], self.corrupt.keys[layer_idx], key_states)
        values = self._fill(self.clean.kv_values[layer_idx], self.corrupt.values[layer_idx], value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.p0


def _inject_cache(cache: Any) -> Callable:
    """A layer pre-hook handing ``cache`` to the attention as its KV cache."""
    def pre(mod, args, kwargs):
        return args, {**kwargs, "past_key_values": cache}
    return pre


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PatchRunner:
    """Runs the clean, corrupted and patched forwards of one model for one site.

    ``causal_trace`` and the dataset pipeline build one; use it directly to share the
    clean/corrupted runs between analyses (see `analyses.runner.analyze_clip`).
    """

    def __init__(self, model: "AVModel", site: str = "input_layernorm", options: Any = "ABCD",
                 skip_overwritten: bool = True, interventions: Any = None) -> None:
        self.model = model
        self.skip_overwritten = skip_overwritten
        self.site = canonical_site(site)
        self.interventions = as_intervention(interventions)
        if self.interventions is not None:
            clash = sorted({s.point for s in self.interventions.sites()} & {self.site})
            if clash:
                raise InputError(f"interventions= edit the patched site {clash[0]!r} itself; patch one site and "
                                 f"intervene at others")
        self.options = normalize_options(options)
        self.token_ids = option_token_ids(model.tokenizer, self.options)
        self.layers = model.raw("layers")
        self.final_norm = model.raw("final_norm")
        self.lm_head = model.raw("lm_head")
        self.num_layers = model.num_layers
        self.attn_impl = model.attn_implementation
        self._rows: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

    def _can_skip(self) -> bool:
        """Whether this site and attention kernel allow skipping overwritten positions.

        At ``input_layernorm`` / ``resid_pre`` a position patched at every layer from the
        window's first to the last one has the clean run's keys/values at each of them, and its
        own states are never read again (they are overwritten at the next layer, and only the
        last position reaches the LM head): such positions are not computed at all. The
        queries left are not contiguous, which needs an explicit mask (sdpa or eager).
        """
        return self.skip_overwritten and self.site in ("input_layernorm", "resid_pre") and \
            self.attn_impl in ("sdpa", "eager") and self.interventions is None

    def extra(self, item: "AVInputs") -> ContextManager[Any]:
        """The user's ``interventions`` on the hook runtime for forwards of ``item``'s layout (else nothing)."""
        if self.interventions is None:
            return nullcontext()
        return applied(self.model, item, self.interventions)

    # -- modules -------------------------------------------------------------------
    def _site_module(self, layer: int) -> torch.nn.Module:
        if self.site in ("resid_pre", "resid_post"):
            return self.layers[layer]
        return self.model.raw(_SITE_ROLE[self.site], layer=layer)

    def _site_hook(self, layer: int, fn: Callable[[torch.Tensor], Any]):
        """Register ``fn(site_tensor)`` on ``layer``'s site; it may edit the tensor in place.

        The hook goes first (``prepend``), as an nnsight edit of ``.output`` would: forward
        hooks a user put on the same module see the patched value.
        """
        module = self._site_module(layer)
        if self.site == "resid_pre":
            def pre(mod, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                fn(hidden)
            return module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)

        def post(mod, args, out):
            fn(_first(out))
        return module.register_forward_hook(post, prepend=True)

    # -- plain forwards -------------------------------------------------------------
    def _forward(self, item: "AVInputs", extra: bool = True) -> torch.Tensor:
        """One forward of ``item`` (hooks already registered); last-position logits ``[vocab]``.

        ``extra``: apply the user's interventions here (off when the caller opened them first).
        """
        item = on_device(self.model, item)
        with last_logits_only(self.model, [len(item) - 1]), (self.extra(item) if extra else nullcontext()):
            if zeroed_of(item):
                with self.model.trace(item, use_cache=False):
                    encoder_edit(self.model, item)
                    logits = self.model.logits.save()
            else:
                logits = self.model.raw()(**item.data, use_cache=False).logits
        return logits[0, -1]

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return letter_probs(logits, self.token_ids).cpu()

    def corrupt_probs(self, item: "AVInputs") -> torch.Tensor:
        """Letter probabilities of one plain forward of ``item``."""
        with torch.no_grad():
            return self.probs(self._forward(item))

    def record_clean(self, item: "AVInputs", positions: torch.Tensor, layers: Sequence[int],
                     kv: bool | None = None) -> CleanRecord:
        """Clean forward; the site's values at ``positions`` (sorted) for ``layers``.

        ``kv`` also keeps every layer's keys/values (default: when the site allows skipping
        overwritten positions, see `PatchRunner`).
        """
        positions = torch.unique(torch.as_tensor(positions, dtype=torch.long).flatten().cpu())
        values: dict[int, torch.Tensor] = {}
        handles = []
        for layer in sorted(set(layers)):
            def keep(t: torch.Tensor, layer: int = layer) -> None:
                values[layer] = t[0, positions.to(t.device)].detach().clone()
            handles.append(self._site_hook(layer, keep))
        recorder = _KVRecorder() if (self._can_skip() if kv is None else kv) else None
        if recorder is not None:
            for layer in self.layers:
                handles.append(layer.register_forward_pre_hook(_inject_cache(recorder), with_kwargs=True))
        with torch.no_grad(), _hooks(handles):
            logits = self._forward(item)
        return CleanRecord(self.probs(logits), positions, values,
                           recorder.keys if recorder is not None else None,
                           recorder.values if recorder is not None else None)

    def record_clean_during(self, during: Callable[[], Any], item: "AVInputs", positions: torch.Tensor,
                            layers: Sequence[int]) -> tuple[CleanRecord, Any]:
        """`record_clean` riding on another prefill of ``item`` that ``during()`` runs (e.g. the sink analysis).

        That prefill may stop inside the last layer (it needs no logits): the site is read before
        attention, so every layer's value is there, and the last layer is then finished for the
        last position alone from the recorded keys/values. Only for the ``input_layernorm`` and
        ``resid_pre`` sites; when anything is missing the clean run is made separately.
        Returns the record and what ``during()`` returned.
        """
        last = self.num_layers - 1
        if self.site not in ("input_layernorm", "resid_pre") or self.interventions is not None:
            result = during()
            return self.record_clean(item, positions, layers), result
        positions = torch.unique(torch.as_tensor(positions, dtype=torch.long).flatten().cpu())
        values: dict[int, torch.Tensor] = {}
        recorder = _KVRecorder()
        seen: dict[str, Any] = {}
        handles = []
        for layer in sorted(set(layers)):
            def keep(t: torch.Tensor, layer: int = layer) -> None:
                if t.shape[0] == 1 and t.shape[1] == len(item):
                    values[layer] = t[0, positions.to(t.device)].detach().clone()
            handles.append(self._site_hook(layer, keep))

        def pre(mod, args, kwargs, layer=None):
            hidden = args[0] if args else kwargs["hidden_states"]
            if mod is self.layers[last]:
                seen["resid"] = hidden
                seen["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
            return args, {**kwargs, "past_key_values": recorder}
        for layer in self.layers:
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        with _hooks(handles):
            result = during()
        complete = (set(layers) <= set(values) and len(recorder.keys) == self.num_layers and "resid" in seen
                    and seen["resid"].shape[:2] == (1, len(item)))
        if not complete:
            return self.record_clean(item, positions, layers), result
        total = len(item)
        kwargs_list: list[dict[str, Any]] = [{} for _ in range(self.num_layers)]
        kwargs_list[last] = seen["kwargs"]
        partial = CorruptRecord(None, total, {last: seen["resid"]}, recorder.keys, recorder.values, kwargs_list,
                                [None] * self.num_layers)
        with torch.no_grad():
            hidden = seen["resid"][:, total - 1:]
            cache = _PrefixKV(recorder.keys, recorder.values, total - 1)
            kw = self._layer_kwargs(partial, last, total - 1, self._suffix_mask(partial, last, total - 1, hidden),
                                    cache)
            hidden = _first(self.layers[last](hidden, **kw))
            logits = self.lm_head(self.final_norm(hidden[:, -1:]))[:, 0, :][0]
        return CleanRecord(self.probs(logits), positions, values, recorder.keys, recorder.values), result

    def record_corrupt(self, item: "AVInputs", starts: Sequence[int] | None = None) -> CorruptRecord:
        """Corrupted forward caching the residual at ``starts`` (default: every layer), the keys/values
        and the layer keyword arguments."""
        with self.extra(item):         # opened first: the recorder below reads each layer's input before it
            return self._record_corrupt(item, starts)

    def _record_corrupt(self, item: "AVInputs", starts: Sequence[int] | None) -> CorruptRecord:
        starts = set(range(self.num_layers) if starts is None else starts)
        recorder = _KVRecorder()
        resid: dict[int, torch.Tensor] = {}
        kwargs_list: list[dict[str, Any]] = [{} for _ in range(self.num_layers)]
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        handles = []
        for i, layer in enumerate(self.layers):
            def pre(mod, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                inputs[i] = hidden
                if i in starts:
                    resid[i] = hidden
                kwargs_list[i] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
                kwargs = dict(kwargs)
                kwargs["past_key_values"] = recorder
                return args, kwargs

            def post(mod, args, out, i=i):
                outputs[i] = _first(out)
            # The input is read before any user pre-hook (re-running the layer re-applies them), the
            # output after every forward hook (it is what the next layer received).
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            handles.append(layer.register_forward_hook(post))
        with torch.no_grad(), _hooks(handles):
            logits = self._forward(item, extra=False)
        if len(recorder.keys) != self.num_layers:
            raise InputError(f"the model's attention did not use the cache slot in every layer "
                             f"({len(recorder.keys)} of {self.num_layers}); use method='naive' for this model")
        deltas: list[torch.Tensor | None] = []
        for i in range(self.num_layers):
            nxt = inputs.get(i + 1)
            if nxt is None or nxt is outputs[i]:
                deltas.append(None)
                continue
            delta = nxt - outputs[i]
            deltas.append(delta if bool(delta.abs().max() > 0) else None)
        return CorruptRecord(self.probs(logits), len(item), resid, recorder.keys, recorder.values, kwargs_list,
                             deltas, item)

    # -- patched continuation -------------------------------------------------------------
    def _suffix_mask(self, corrupt: CorruptRecord, layer: int, p0: int, like: torch.Tensor) -> Any:
        recorded = corrupt.kwargs[layer].get("attention_mask")
        if torch.is_tensor(recorded) and recorded.dim() == 4:
            return recorded[:, :, p0:, :]
        if p0 == 0:
            return recorded
        n, total = corrupt.length - p0, corrupt.length
        if self.attn_impl.startswith("flash"):
            return None  # flash attention aligns the causal mask bottom-right when queries < keys
        if self.attn_impl == "sdpa":
            try:
                from torch.nn.attention.bias import causal_lower_right

                return causal_lower_right(n, total)
            except ImportError:  # pragma: no cover - older torch
                pass
        allowed = torch.arange(total, device=like.device)[None, :] <= (p0 + torch.arange(n, device=like.device))[:, None]
        mask = torch.zeros(n, total, dtype=like.dtype, device=like.device)
        return mask.masked_fill(~allowed, torch.finfo(like.dtype).min)[None, None]

    def _layer_kwargs(self, corrupt: CorruptRecord, layer: int, p0: int, mask: Any, cache: _PrefixKV
                      ) -> dict[str, Any]:
        total = corrupt.length
        kw: dict[str, Any] = {}
        for key, value in corrupt.kwargs[layer].items():
            if key == "attention_mask":
                kw[key] = mask
            elif key == "position_embeddings" and isinstance(value, (tuple, list)):
                kw[key] = tuple(v[..., p0:, :] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[-2] == total
                                else v for v in value)
            elif torch.is_tensor(value) and (key.endswith("position_ids") or key == "cache_position") \
                    and value.shape[-1] == total:
                kw[key] = value[..., p0:]
            else:
                kw[key] = value
        kw["past_key_values"] = cache
        return kw

    @contextmanager
    def _patch_hooks(self, layers: Sequence[int]) -> Iterator[None]:
        handles = []
        if self.site not in ("resid_pre", "resid_post"):
            for layer in sorted(set(layers)):
                def patch(t: torch.Tensor, layer: int = layer) -> None:
                    for b, local, vals in self._rows.get(layer, ()):
                        t[b, local] = vals
                handles.append(self._site_hook(layer, patch))
        try:
            with _hooks(handles):
                yield
        finally:
            self._rows = {}

    def _apply_rows(self, hidden: torch.Tensor, layer: int) -> None:
        for b, local, vals in self._rows.get(layer, ()):
            hidden[b, local] = vals

    def _run_batch(self, clean: CleanRecord, corrupt: CorruptRecord, batch: list[Condition]) -> torch.Tensor:
        start = min(c.start for c in batch)
        p0 = min(int(c.positions[0]) for c in batch)
        base = corrupt.resid.get(start)
        if base is None:
            raise InputError(f"the corrupted run cached no residual at layer {start}")
        device = base.device
        rows: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for b, cond in enumerate(batch):
            local = (cond.positions - p0).to(device)
            index = torch.searchsorted(clean.positions, cond.positions).to(device)
            for layer in cond.layers:
                rows.setdefault(layer, []).append((b, local, clean.values[layer].index_select(0, index)))
        self._rows = rows
        hidden = base[:, p0:].expand(len(batch), -1, -1).clone()
        cache = _PrefixKV(corrupt.keys, corrupt.values, p0)
        for layer in range(start, self.num_layers):
            kw = self._layer_kwargs(corrupt, layer, p0, self._suffix_mask(corrupt, layer, p0, hidden), cache)
            if self.site == "resid_pre":
                self._apply_rows(hidden, layer)
            hidden = _first(self.layers[layer](hidden, **kw))
            if self.site == "resid_post":
                self._apply_rows(hidden, layer)
            delta = corrupt.deltas[layer]
            if delta is not None:
                hidden = hidden + delta[:, p0:]
        logits = self.lm_head(self.final_norm(hidden[:, -1:]))[:, 0]
        return logits

    def _skippable(self, clean: CleanRecord, corrupt: CorruptRecord, cond: Condition) -> bool:
        return (self._can_skip() and clean.keys is not None and cond.positions.numel() > 0
                and cond.layers == tuple(range(cond.start, self.num_layers))
                and bool((cond.positions != corrupt.length - 1).any()))

    def _run_skipping(self, clean: CleanRecord, corrupt: CorruptRecord, cond: Condition) -> torch.Tensor:
        """One condition whose window reaches the last layer, computing only the positions it must.

        Computed: positions from the first patched one on, minus the patched ones (the last
        position is always computed). Their keys/values come from this run, those of the
        patched positions from the clean run, those of earlier positions from the corrupted run.
        """
        total = corrupt.length
        positions = cond.positions
        p0 = int(positions[0])
        keep = torch.ones(total, dtype=torch.bool)
        keep[:p0] = False
        keep[positions[positions != total - 1]] = False
        rows_cpu = torch.nonzero(keep).flatten()
        base = corrupt.resid[cond.start]
        device = base.device
        rows = rows_cpu.to(device)
        hidden = base[:, rows]
        self._rows = {}
        last = positions[positions == total - 1]
        if last.numel():                                   # the last position is patched and computed
            local = torch.tensor([rows_cpu.numel() - 1], device=device)
            index = torch.searchsorted(clean.positions, last).to(device)
            self._rows = {l: [(0, local, clean.values[l].index_select(0, index))] for l in cond.layers}
        cache = _ScatterKV(corrupt, clean, p0, rows)
        shared_mask = None
        for layer in range(cond.start, self.num_layers):
            recorded = corrupt.kwargs[layer].get("attention_mask")
            if torch.is_tensor(recorded) and recorded.dim() == 4:
                mask = recorded.index_select(2, rows)
            else:
                if shared_mask is None:
                    allowed = torch.arange(total, device=device)[None, :] <= rows[:, None]
                    if self.attn_impl == "sdpa":
                        shared_mask = allowed[None, None]
                    else:
                        shared_mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=device).masked_fill(
                            ~allowed, torch.finfo(hidden.dtype).min)[None, None]
                mask = shared_mask
            kw = {}
            for key, value in corrupt.kwargs[layer].items():
                if key == "attention_mask":
                    kw[key] = mask
                elif key == "position_embeddings" and isinstance(value, (tuple, list)):
                    kw[key] = tuple(v.index_select(-2, rows) if torch.is_tensor(v) and v.dim() >= 2
                                    and v.shape[-2] == total else v for v in value)
                elif torch.is_tensor(value) and (key.endswith("position_ids") or key == "cache_position") \
                        and value.shape[-1] == total:
                    kw[key] = value.index_select(-1, rows)
                else:
                    kw[key] = value
            kw["past_key_values"] = cache
            if self.site == "resid_pre":
                self._apply_rows(hidden, layer)
            hidden = _first(self.layers[layer](hidden, **kw))
            delta = corrupt.deltas[layer]
            if delta is not None:
                hidden = hidden + delta[:, rows]
        return self.lm_head(self.final_norm(hidden[:, -1:]))[:, 0]

    def run(self, clean: CleanRecord, corrupt: CorruptRecord, conditions: Sequence[Condition], *,
            batch_size: int = 4, progress: bool = False) -> Float[torch.Tensor, "condition option"]:
        """Letter probabilities of each patched condition (the exact sweep described above)."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        out = torch.zeros(len(conditions), len(self.options))
        todo = [i for i, c in enumerate(conditions) if c.positions.numel()]
        for i, c in enumerate(conditions):
            if not c.positions.numel():
                out[i] = corrupt.probs            # nothing patched: the corrupted run itself
        alone = [i for i in todo if self._skippable(clean, corrupt, conditions[i])]
        todo = [i for i in todo if i not in set(alone)]
        todo.sort(key=lambda i: (conditions[i].start, int(conditions[i].positions[0])))
        batches: list[list[int]] = []
        for i in todo:
            if batches and len(batches[-1]) < batch_size and conditions[batches[-1][0]].start == conditions[i].start:
                batches[-1].append(i)
            else:
                batches.append([i])
        layers = sorted({l for i in todo + alone for l in conditions[i].layers})
        bar = tqdm(total=len(todo) + len(alone), desc="patched runs", leave=False,
                   disable=not progress or len(todo) + len(alone) < 2)
        with torch.no_grad(), self._patch_hooks(layers), self.extra(corrupt.item):
            for i in alone:
                out[i] = self.probs(self._run_skipping(clean, corrupt, conditions[i]))[0]
                bar.update(1)
            for batch in batches:
                logits = self._run_batch(clean, corrupt, [conditions[i] for i in batch])
                probs = self.probs(logits)
                for row, i in enumerate(batch):
                    out[i] = probs[row]
                bar.update(len(batch))
        bar.close()
        return out

    # -- reference and first-order methods ------------------------------------------------
    def run_naive(self, clean: CleanRecord, corrupt_item: "AVInputs", conditions: Sequence[Condition], *,
                  progress: bool = False) -> Float[torch.Tensor, "condition option"]:
        """One full nnsight forward of the corrupted input per condition (the slow reference)."""
        import nnsight
        from tqdm.auto import tqdm

        item = on_device(self.model, corrupt_item)
        out = torch.zeros(len(conditions), len(self.options))
        for i, cond in enumerate(tqdm(conditions, desc="patched runs (naive)", leave=False,
                                      disable=not progress or len(conditions) < 2)):
            with torch.no_grad(), self.extra(item), self.model.trace(item, use_cache=False):
                if zeroed_of(item):
                    encoder_edit(self.model, item)
                if cond.positions.numel():
                    index = torch.searchsorted(clean.positions, cond.positions)
                    for layer in cond.layers:
                        target = self._site_envoy(layer)
                        target[:, cond.positions] = clean.values[layer][index.to(clean.values[layer].device)]
                logits = nnsight.save(self.model.logits[0, -1])
            out[i] = self.probs(logits)
        return out

    def _site_envoy(self, layer: int) -> Any:
        view = self.model.layers[layer]
        if self.site == "resid_pre":
            return view.input
        if self.site == "resid_post":
            return view.output
        if self.site == "input_layernorm":
            return view.input_layernorm.output
        if self.site == "attn_output":
            return view.self_attn.output[0]
        return view.mlp.output

    def attribution(self, clean: CleanRecord, corrupt_item: "AVInputs", layers: Sequence[int],
                    clean_answer: int | None = None, corrupt_answer: int | None = None) -> dict[str, Any]:
        """First-order effects per (layer, clean-cached position) from one corrupted forward + backward.

        Returns ``probs`` (the corrupted run's letter probabilities) and ``clean`` / ``corrupt``:
        ``[layer, position]`` contributions to IE_clean / IE_corrupt (rows follow ``layers``,
        columns ``clean.positions``).
        """
        layers = sorted(set(layers))
        acts: dict[int, torch.Tensor] = {}
        handles = []
        previous = torch.is_grad_enabled()

        def start_graph(mod, args, kwargs):
            # Encoders ran without a graph; from here on record one, rooted at the layer-0 input.
            torch.set_grad_enabled(True)
            hidden = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        handles.append(self.layers[0].register_forward_pre_hook(start_graph, with_kwargs=True))
        for layer in layers:
            def keep(t: torch.Tensor, layer: int = layer) -> None:
                acts[layer] = t
            handles.append(self._site_hook(layer, keep))
        try:
            with torch.no_grad(), _hooks(handles):
                logits = self._forward(corrupt_item)
            with torch.enable_grad():
                probs = letter_probs(logits, self.token_ids)
                k_clean = int(clean.probs.argmax()) if clean_answer is None else clean_answer
                k_corr = int(probs.detach().argmax()) if corrupt_answer is None else corrupt_answer
                tensors = [acts[l] for l in layers]
                g_clean = torch.autograd.grad(probs[k_clean], tensors, retain_graph=True, allow_unused=True)
                g_corr = torch.autograd.grad(probs[k_corr], tensors, allow_unused=True)
        finally:
            torch.set_grad_enabled(previous)
        index = clean.positions
        rows_clean, rows_corr = [], []
        for layer, gc, gx in zip(layers, g_clean, g_corr):
            a = acts[layer].detach()[0, index.to(acts[layer].device)].float()
            diff = clean.values[layer].float() - a
            zero = torch.zeros(index.numel(), device=diff.device)
            rows_clean.append((diff * gc[0, index.to(gc.device)].float()).sum(-1) if gc is not None else zero)
            rows_corr.append(-(diff * gx[0, index.to(gx.device)].float()).sum(-1) if gx is not None else zero)
        return {"probs": self.probs(logits.detach()), "clean": torch.stack(rows_clean).cpu(),
                "corrupt": torch.stack(rows_corr).cpu(), "layers": layers, "k_clean": k_clean, "k_corrupt": k_corr}


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------
_EFFECT_COLUMNS = ["clip", "token_set", "window", "layer_start", "layer_end", "n_tokens", "ie_clean", "ie_corrupt",
                   "p_patched_clean", "p_patched_corrupt"]


@dataclass
class TraceResult:
    """Indirect effects per clip, token set and layer window (a tidy table), with per-clip context.

    ``effects``: one row per (clip, token set, window) with ``n_tokens``, ``ie_clean``,
    ``ie_corrupt`` and the patched run's probabilities of the clean / corrupt answers.
    ``clips``: per clip, the answers ``o_clean`` / ``o_corrupt``, ``P_clean`` and ``P_corrupt``
    letter probabilities, the dominant and patched modalities. ``meta``: site, method, seed ...
    """

    effects: "pd.DataFrame"
    clips: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- views -------------------------------------------------------------------------
    @property
    def frame(self) -> "pd.DataFrame":
        """``effects`` indexed by ``[clip, token_set, window]``."""
        return self.effects.set_index(["clip", "token_set", "window"])

    def table(self, by: str | Sequence[str] = "token_set", scale: float = 100.0) -> "pd.DataFrame":
        """Mean IE_clean / IE_corrupt over clips (x ``scale``, as in the paper's Table 1) with counts.

        ``by="token_set"`` (rows: token sets, in first-seen order); ``by=["token_set", "window"]``
        for layer-wise tables.
        """
        keys = [by] if isinstance(by, str) else list(by)
        grouped = self.effects.groupby(keys, sort=False)
        out = grouped[["ie_clean", "ie_corrupt"]].mean() * scale
        out.columns = ["IE_clean", "IE_corrupt"]
        out["clips"] = grouped["clip"].nunique()
        out["tokens"] = grouped["n_tokens"].mean()
        return out

    def __len__(self) -> int:
        return len(self.effects)

    def __repr__(self) -> str:
        return (f"TraceResult(clips={self.effects['clip'].nunique()}, token_sets={list(self.effects['token_set'].unique())}, "
                f"windows={self.effects['window'].nunique()}, site={self.meta.get('site')!r}, "
                f"method={self.meta.get('method')!r})")

    def _repr_html_(self) -> str:
        return f"<b>{self!r}</b>" + self.table().round(3).to_html()

    def agreement(self, other: "TraceResult") -> dict[str, float]:
        """Spearman rank correlation of IE_clean and IE_corrupt with ``other`` over shared rows."""
        return rank_agreement(self, other)

    # -- plots ---------------------------------------------------------------------------
    def plot_bars(self, effect: str = "both", scale: float = 100.0, ax: Any = None) -> "Figure":
        """Bar chart of the mean effect per token set (x ``scale``), with the standard error."""
        return plot_trace_bars(self, effect, scale, ax)

    def plot_heatmap(self, effect: str = "ie_clean", scale: float = 100.0, ax: Any = None) -> "Figure":
        """Layer window (rows, by first layer) x token set heatmap of the mean effect (ROME-style)."""
        return plot_trace_heatmap(self, effect, scale, ax)

    def plot(self, kind: str = "bars", **kwargs: Any) -> "Figure":
        """``kind="bars"`` (`plot_trace_bars`) or ``"heatmap"`` (`plot_trace_heatmap`); see `analyses.plots`."""
        if kind not in ("bars", "heatmap"):
            raise InputError(f"kind must be 'bars' or 'heatmap', got {kind!r}")
        return plot_trace_bars(self, **kwargs) if kind == "bars" else plot_trace_heatmap(self, **kwargs)

    def to_frame(self) -> "pd.DataFrame":
        """The tidy effects table: one row per (clip, token set, window)."""
        return self.effects.copy()

    def summary(self) -> "pd.DataFrame":
        """Mean effects per token set (x100) with counts: `table`."""
        return self.table()

    # -- persistence ------------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per clip: its context and its effect rows."""
        records = []
        for clip, rows in self.effects.groupby("clip", sort=False):
            body = rows.drop(columns=["clip"]).to_dict(orient="records")
            records.append({"kind": "TraceClip", "clip": str(clip), "info": self.clips.get(str(clip), {}),
                            "meta": self.meta, "rows": [_plain(r) for r in body]})
        return records

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> "TraceResult":
        """Rebuild from `to_records` dicts (e.g. lines of a pipeline JSONL; other lines are skipped)."""
        import pandas as pd

        rows, clips, meta = [], {}, {}
        for record in records:
            if record.get("kind") != "TraceClip":
                trace = record.get("trace")
                if isinstance(trace, Mapping) and trace.get("kind") == "TraceClip":
                    record = trace
                else:
                    continue
            clip = str(record["clip"])
            clips[clip] = dict(record.get("info", {}))
            meta = meta or dict(record.get("meta", {}))
            rows += [{"clip": clip, **r} for r in record["rows"]]
        frame = pd.DataFrame(rows, columns=_EFFECT_COLUMNS + [c for r in rows[:1] for c in r
                                                               if c not in _EFFECT_COLUMNS])
        return cls(frame, clips, meta)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({"kind": "TraceResult", "version": 1, "records": self.to_records(), "meta": self.meta})
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "TraceResult":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        data = json.loads(text)
        if data.get("kind") != "TraceResult":
            raise InputError("this JSON does not hold a TraceResult")
        result = cls.from_records(data["records"])
        result.meta = dict(data.get("meta", result.meta))
        return result

    def save(self, path: str | Path) -> Path:
        """Write JSON (``.json``) or one line per clip (``.jsonl``)."""
        path = Path(path)
        if path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in self.to_records()))
        else:
            self.to_json(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TraceResult":
        """Read a `save` file, or a pipeline JSONL (its clips with a trace)."""
        path = Path(path)
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return cls.from_records(records)
        return cls.from_json(path)

    @classmethod
    def concat(cls, results: Sequence["TraceResult"]) -> "TraceResult":
        import pandas as pd

        results = list(results)
        if not results:
            raise InputError("nothing to concatenate")
        clips: dict[str, dict[str, Any]] = {}
        for r in results:
            clips.update(r.clips)
        return cls(pd.concat([r.effects for r in results], ignore_index=True), clips, dict(results[0].meta))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if torch.is_tensor(value):
        return _plain(value.tolist())
    return value


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    import pandas as pd

    if len(a) < 2:
        return float("nan")
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_agreement(a: TraceResult, b: TraceResult) -> dict[str, float]:
    """Spearman rank correlation between two results' IE_clean and IE_corrupt over rows they share.

    >>> import pandas as pd
    >>> rows = lambda v: TraceResult(pd.DataFrame({"clip": ["c"] * 3, "token_set": ["x", "y", "z"],
    ...     "window": ["0"] * 3, "ie_clean": v, "ie_corrupt": v}))
    >>> rank_agreement(rows([0.1, 0.2, 0.3]), rows([1.0, 5.0, 9.0]))["ie_clean"]
    1.0
    """
    keys = ["clip", "token_set", "window"]
    merged = a.effects.merge(b.effects, on=keys, suffixes=("_a", "_b"))
    return {name: _spearman(merged[f"{name}_a"].to_numpy(float), merged[f"{name}_b"].to_numpy(float))
            for name in ("ie_clean", "ie_corrupt")} | {"rows": int(len(merged))}


# ---------------------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------------------
def _sink_inputs(model: "AVModel", clean: "AVInputs", names: set[str], sinks: Any, split: Any,
                 sink_options: Mapping[str, Any] | None, split_rule: str) -> tuple[Any, Any]:
    needs_sinks = bool(names & {"sink", "random"})
    needs_split = bool(names & {"cross_modal_sink", "unimodal_sink", "random_cross_modal_sink",
                                "random_unimodal_sink"})
    options = dict(sink_options or {})
    if hasattr(sinks, "sinks") and hasattr(sinks, "mds"):       # a SinkAnalysis (sinks, mds)
        if split is None and needs_split:
            split = sinks.mds.split(rule=split_rule)
        sinks = sinks.sinks
    if (needs_sinks or needs_split) and sinks is None:
        if needs_split and split is None:
            found, scores = sink_analysis(model, clean, progress=False, **options)
            return found, scores.split(rule=split_rule)
        sinks = find_sinks(model, clean, progress=False, **options)
    if needs_split and split is None:
        split = modality_dominance(model, clean, sinks, progress=False).split(rule=split_rule)
    return sinks, split


def _as_pairs(clean: Any, corrupt: Any) -> tuple[list[Any], list[Any], bool]:
    if isinstance(clean, AVInputs) and isinstance(corrupt, AVInputs):
        return [clean], [corrupt], True
    if isinstance(clean, (list, tuple)) and isinstance(corrupt, (list, tuple)):
        if len(clean) != len(corrupt) or not clean:
            raise InputError(f"clean and corrupt lists must be non-empty and equally long ({len(clean)} vs "
                             f"{len(corrupt)})")
        if not all(isinstance(x, AVInputs) for x in list(clean) + list(corrupt)):
            raise InputError("clean and corrupt must be AVInputs (from model.prepare / analyses.ablate)")
        return list(clean), list(corrupt), False
    raise InputError("clean and corrupt must both be AVInputs, or two equally long lists of them")


def _per_clip(value: Any, count: int, single: bool, what: str) -> list[Any]:
    if single:
        return [value]
    if value is None:
        return [None] * count
    if isinstance(value, (list, tuple)) and len(value) == count:
        return list(value)
    raise InputError(f"for {count} clips pass {what} as a list with one entry per clip")


def causal_trace(
    model: "AVModel",
    clean: "AVInputs | Sequence[AVInputs]",
    corrupt: "AVInputs | Sequence[AVInputs]",
    options: Any,
    token_sets: Sequence[str] | Mapping[str, Any] = DEFAULT_TOKEN_SETS,
    site: str = "input_layernorm",
    layers: Sequence[int] | None = None,
    window: int | None = None,
    method: str = "exact",
    *,
    dominant: str | Sequence[str] | None = None,
    sinks: Any = None,
    split: Any = None,
    objects: Any = None,
    sink_options: Mapping[str, Any] | None = None,
    split_rule: str = "rank",
    seed: int = 0,
    clips: str | Sequence[str] | None = None,
    batch_size: int = 4,
    skip_overwritten: bool = True,
    progress: bool = True,
    interventions: Any = None,
) -> TraceResult:
    """Patch clean activations of token sets into the corrupted run and measure IE_clean / IE_corrupt.

    Args:
        clean, corrupt: the clip with both modalities and the same clip with the dominant one
            removed (`ablate`); identical token ids are required. Lists run several clips.
        options: the answer letters (see `option_probs`); ``o_clean`` / ``o_corrupt`` are the
            argmax letters of the clean / corrupted run.
        token_sets: names from `TOKEN_SETS` and/or a dict of custom sets (name -> positions);
            built-in sets are taken from the non-dominant modality (`resolve_token_sets`).
            An empty set patches nothing: its effects are exactly 0 (``n_tokens`` says 0).
        site: one of `SITES` (default ``input_layernorm``). Patching happens in the prefill.
        layers, window: the layer windows (`make_windows`); default all layers at once.
        method: ``"exact"`` (fast exact sweep), ``"naive"`` (one full nnsight forward per
            condition, the reference) or ``"attribution"`` (first-order estimate).
        dominant: the modality ``corrupt`` removed (default: inferred); the other one is patched.
        sinks, split: a `SinkResult` (or `SinkAnalysis`) and a `SinkSplit` for the sink-based
            sets; computed from the clean input when needed (``sink_options`` go to the sink
            search: dims, tau, k_divide).
        objects: object positions / masks / time ranges for the ``object`` set (`object_positions`).
        seed: seeds the random sets (with the clip id and the set name).
        clips: clip ids (default ``"clip"``, or ``"clip0"``, ``"clip1"``, ... for lists).
        batch_size: patched conditions per forward in the exact sweep.
        skip_overwritten: in the exact sweep, do not compute positions whose states the patch
            overwrites up to the last layer (exact; see `PatchRunner._can_skip`). Turn it off when
            your own hooks on the layers expect to see every position.
        interventions: the user's own interventions (one, a list, or None), applied to every
            clean, corrupted and patched forward of the trace (e.g. ``AttentionKnockout(...,
            heads=[...])`` "with these heads knocked out"), at any site but the patched one.

    >>> import nnsight_av as nav
    >>> from analyses import ablate
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="What is making the sound?")
    >>> res = causal_trace(model, ex, ablate(ex, "audio", model), "ABCD", token_sets=["all"], progress=False)
    >>> res.effects[["token_set", "window", "n_tokens"]].values.tolist()
    [['all', '0-3', 8]]
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    site = canonical_site(site)
    cleans, corrupts, single = _as_pairs(clean, corrupt)
    count = len(cleans)
    if clips is None:
        clip_ids = ["clip"] if single else [f"clip{i}" for i in range(count)]
    else:
        clip_ids = [clips] if isinstance(clips, str) else [str(c) for c in clips]
        if len(clip_ids) != count or len(set(clip_ids)) != count:
            raise InputError(f"clips must give {count} distinct ids")
    dominants = _per_clip(dominant, count, single, "dominant") if not isinstance(dominant, str) else [dominant] * count
    sinks_list = _per_clip(sinks, count, single, "sinks")
    split_list = _per_clip(split, count, single, "split")
    objects_list = _per_clip(objects, count, single, "objects")
    windows = make_windows(model.num_layers, layers, window)
    runner = PatchRunner(model, site, options, skip_overwritten=skip_overwritten and method == "exact",
                         interventions=interventions)
    listed = list(token_sets.values()) if isinstance(token_sets, Mapping) else \
        ([token_sets] if isinstance(token_sets, str) else list(token_sets))
    names = {n for n in listed if isinstance(n, str)}
    meta = {"site": site, "method": method, "options": runner.options, "seed": seed, "split_rule": split_rule,
            "windows": [list(w) for w in windows], "num_layers": model.num_layers}
    results = []
    from tqdm.auto import tqdm

    for k in tqdm(range(count), desc="causal trace", disable=not progress or count < 2):
        check_same_layout(cleans[k], corrupts[k], "clean and corrupt")
        cleans[k], corrupts[k] = on_device(model, cleans[k]), on_device(model, corrupts[k])
        dom = dominants[k] or infer_dominant(cleans[k], corrupts[k])
        if dom not in ("audio", "video"):
            raise InputError(f"dominant must be 'audio' or 'video', got {dom!r}")
        patched = "video" if dom == "audio" else "audio"
        clip_sinks, clip_split = _sink_inputs(model, cleans[k], names, sinks_list[k], split_list[k], sink_options,
                                              split_rule)
        sets = resolve_token_sets(cleans[k], patched, token_sets, sinks=clip_sinks, split=clip_split,
                                  objects=objects_list[k], seed=seed, clip=clip_ids[k])
        results.append(trace_clip(runner, cleans[k], corrupts[k], sets, windows, method, clip=clip_ids[k],
                                  dominant=dom, batch_size=batch_size, progress=progress and count < 2))
    result = TraceResult.concat(results)
    result.meta = meta
    return result


def trace_clip(
    runner: PatchRunner,
    clean: "AVInputs",
    corrupt: "AVInputs",
    sets: Mapping[str, torch.Tensor],
    windows: Sequence[tuple[int, ...]],
    method: str = "exact",
    *,
    clip: str = "clip",
    dominant: str | None = None,
    clean_record: CleanRecord | None = None,
    corrupt_record: CorruptRecord | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> TraceResult:
    """One clip's sweep with resolved token sets (``causal_trace`` minus the bookkeeping).

    Pass ``clean_record`` / ``corrupt_record`` to reuse runs made elsewhere (the clean one must
    cover every patched position and layer).
    """
    import pandas as pd

    conditions = [Condition(name, pos, tuple(w)) for name, pos in sets.items() for w in windows]
    union = torch.unique(torch.cat([pos for pos in sets.values()] + [torch.zeros(0, dtype=torch.long)]))
    layers = sorted({l for w in windows for l in w})
    if clean_record is None:
        clean_record = runner.record_clean(clean, union, layers)
    elif not set(union.tolist()) <= set(clean_record.positions.tolist()) or \
            not set(layers) <= set(clean_record.values):
        raise InputError("the clean record does not cover every patched position and layer")
    k_clean = int(clean_record.probs.argmax())
    if method == "attribution":
        attr = runner.attribution(clean_record, corrupt, layers, clean_answer=k_clean)
        probs_corrupt = attr["probs"]
        k_corr = attr["k_corrupt"]
        row_of = {l: i for i, l in enumerate(attr["layers"])}
        est_clean, est_corr = [], []
        for cond in conditions:
            cols = torch.searchsorted(clean_record.positions, cond.positions)
            rows = torch.tensor([row_of[l] for l in cond.layers], dtype=torch.long)
            est_clean.append(float(attr["clean"][rows][:, cols].sum()) if cond.positions.numel() else 0.0)
            est_corr.append(float(attr["corrupt"][rows][:, cols].sum()) if cond.positions.numel() else 0.0)
        patched_probs = None
    else:
        if method == "exact":
            if corrupt_record is None:
                corrupt_record = runner.record_corrupt(corrupt, starts=sorted({w[0] for w in windows}))
            probs_corrupt = corrupt_record.probs
            patched_probs = runner.run(clean_record, corrupt_record, conditions, batch_size=batch_size,
                                       progress=progress)
        else:
            probs_corrupt = runner.corrupt_probs(corrupt)
            patched_probs = runner.run_naive(clean_record, corrupt, conditions, progress=progress)
        k_corr = int(probs_corrupt.argmax())
    rows = []
    for i, cond in enumerate(conditions):
        if patched_probs is not None:
            p = patched_probs[i]
            ie_clean = float(p[k_clean] - probs_corrupt[k_clean])
            ie_corr = float(probs_corrupt[k_corr] - p[k_corr])
            pc, px = float(p[k_clean]), float(p[k_corr])
        else:
            ie_clean, ie_corr = est_clean[i], est_corr[i]
            pc = float(probs_corrupt[k_clean]) + ie_clean
            px = float(probs_corrupt[k_corr]) - ie_corr
        rows.append({"clip": clip, "token_set": cond.token_set, "window": cond.window,
                     "layer_start": cond.layers[0], "layer_end": cond.layers[-1] + 1,
                     "n_tokens": int(cond.positions.numel()), "ie_clean": ie_clean, "ie_corrupt": ie_corr,
                     "p_patched_clean": pc, "p_patched_corrupt": px})
    options = runner.options
    info = {"o_clean": options[k_clean], "o_corrupt": options[k_corr],
            "P_clean": clean_record.probs.tolist(), "P_corrupt": probs_corrupt.tolist(),
            "dominant": dominant, "patched": ("video" if dominant == "audio" else "audio") if dominant else None,
            "token_sets": {name: pos.tolist() for name, pos in sets.items()}}
    return TraceResult(pd.DataFrame(rows, columns=_EFFECT_COLUMNS), {clip: info},
                       {"site": runner.site, "method": method, "options": options})
