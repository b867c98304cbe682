"""Matched random token sets: controls for causal tracing beyond a count-matched draw.

The paper compares its sink set with a random set *of the same size*. Sinks are not spread
like random tokens, though: they cluster in some chunks and at some positions, and a set's
effect can depend on where its tokens sit (early tokens are read by more later ones). A fair
control draws random tokens that look like the sink set in everything but being sinks:

| ``match`` | what the random set keeps equal to the reference set |
|---|---|
| ``"count"`` | the number of tokens (from the pool of the reference's modalities) |
| ``"modality"`` | the number per modality (video sinks -> video tokens, audio -> audio) |
| ``"chunk"`` | the number per modality and 2-second chunk |
| ``"position"`` | the number per modality and position bin (``bins`` equal bins of rank within the modality's tokens: deciles by default) |
| ``"rank"`` | each reference token is replaced by a non-reference token of the same modality at the nearest rank (ties broken at random) |

Every set is seeded by ``(seed, clip, name)`` and disjoint from the reference where the pool
allows. When a stratum has fewer non-reference tokens than the reference puts there
(``on_short``):

- ``"nearest"`` (default): the rest come from the nearest strata of the same modality (chunk
  or bin distance; for ``"rank"`` the next-nearest rank), and only when the modality has no
  non-reference token left, from the reference tokens themselves (the set then overlaps the
  reference; a `ControlWarning` says so). The count always matches.
- ``"shrink"``: the set keeps only what the stratum offers (strictly matched and disjoint,
  possibly smaller).
- ``"error"``: a `TokenSelectionError` naming the stratum.

`match_report` tabulates, per stratum, the reference and control counts and the overlap.
Importing this module registers the matched sets as token sets of `causal_trace` (and of the
pipeline / ``nnsight-av trace --token-sets``): ``random_<match>`` is matched to ``sink``,
``random_<match>_cross_modal_sink`` / ``random_<match>_unimodal_sink`` to the MDS halves.

`length_control` runs the sink-vs-matched comparison on clips of several lengths;
`planted_route` builds a known ground truth (a route through chosen tokens) to check that
a tracing setup finds it.
"""

from __future__ import annotations

import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from nnsight_av import toy
from nnsight_av.errors import AdapterError, InputError, TokenSelectionError

from .ablation import ablate
from .decoding import MEDIA_FEATURES
from .plots import plot_length_control
from .results import JsonResult
from .tracing import TraceResult, causal_trace, register_token_set

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel
    from nnsight_av.spans import Spans

__all__ = ["MATCHES", "ON_SHORT", "ControlWarning", "matched_random_positions", "strata", "match_report",
           "MATCHED_TOKEN_SETS", "LengthControlResult", "length_control", "toy_length_pairs", "planted_route"]

MATCHES = ("count", "modality", "chunk", "position", "rank")
ON_SHORT = ("nearest", "shrink", "error")
_MEDIA = ("video", "audio", "image")


class ControlWarning(UserWarning):
    """A matched control could not be both fully matched and disjoint from its reference."""


# ---------------------------------------------------------------------------------------
# strata
# ---------------------------------------------------------------------------------------
def _spans(item: Any) -> "Spans":
    spans = getattr(item, "spans", item)
    if not hasattr(spans, "modality_of"):
        raise InputError(f"expected AVInputs or Spans, got {type(item).__name__}")
    return spans


def _as_positions(value: Any, length: int, what: str) -> list[int]:
    pos = torch.as_tensor(value.tolist() if torch.is_tensor(value) else list(value), dtype=torch.long).flatten()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
        raise TokenSelectionError(f"{what} has positions outside [0, {length})")
    return sorted(set(pos.tolist()))


class _Layout:
    """Modality, rank within the modality and chunk of every position of one input."""

    def __init__(self, spans: "Spans") -> None:
        self.length = spans.length
        self.labels = spans.modality_of()
        self.by_modality: dict[str, list[int]] = {}
        for p, label in enumerate(self.labels):
            self.by_modality.setdefault(label, []).append(p)
        self.rank = {p: i for members in self.by_modality.values() for i, p in enumerate(members)}
        self.chunk: dict[int, int] = {}
        for chunk in spans.chunks:
            for p in chunk.video.tolist() + chunk.audio.tolist():
                self.chunk[p] = chunk.index
        self.has_chunks = bool(spans.chunks)

    def key(self, p: int, match: str, bins: int) -> tuple:
        """The stratum of position ``p``: (modality, index within the modality's strata)."""
        modality = self.labels[p]
        if match == "count":
            return ("any", 0)
        if match == "modality":
            return (modality, 0)
        if match == "chunk":
            if p not in self.chunk:
                raise InputError(f"chunk matching: position {p} ({modality}) lies in no 2-second chunk (this input "
                                 "has no interleaved audio-in-video chunks); use match='position' instead")
            return (modality, self.chunk[p])
        if match == "position":
            return (modality, self.rank[p] * bins // len(self.by_modality[modality]))
        return (modality, self.rank[p])                          # "rank": one stratum per token


def strata(item: Any, positions: Any, match: str = "chunk", bins: int = 10) -> dict[tuple, int]:
    """How many of ``positions`` fall in each stratum of ``match`` (see the module text).

    Keys are ``(modality, index)``: the chunk index for ``"chunk"``, the position bin for
    ``"position"`` (and for ``"rank"``, whose strata are single tokens), ``0`` for
    ``"modality"``; ``("any", 0)`` for ``"count"``.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(4.0, 2, 56), audio=nav.testing.synthetic_tone(4.0))
    >>> strata(ex, ex.spans.video, "chunk")
    {('video', 0): 8, ('video', 1): 8}
    """
    _check_match(match, bins)
    layout = _Layout(_spans(item))
    out: dict[tuple, int] = {}
    for p in _as_positions(positions, layout.length, "positions"):
        key = layout.key(p, "position" if match == "rank" else match, bins)
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])))


def _check_match(match: str, bins: int) -> None:
    if match not in MATCHES:
        raise InputError(f"match must be one of {MATCHES}, got {match!r}")
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise InputError(f"bins must be a positive int, got {bins!r}")


def _rng(seed: int, clip: str, name: str) -> np.random.Generator:
    words = [int(seed), zlib.crc32(clip.encode("utf-8")), zlib.crc32(name.encode("utf-8"))]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


# ---------------------------------------------------------------------------------------
# the matched draw
# ---------------------------------------------------------------------------------------
def matched_random_positions(
    item: "AVInputs | Spans",
    reference: Any,
    match: str = "position",
    *,
    pool: Any = None,
    bins: int = 10,
    seed: int = 0,
    clip: str = "",
    name: str | None = None,
    on_short: str = "nearest",
) -> torch.Tensor:
    """Random positions matched to ``reference`` (e.g. a sink set) by ``match``; sorted LongTensor.

    ``pool``: the positions to draw from (default: every token of the reference's
    modalities); reference positions outside the pool still count for the strata.
    ``seed``, ``clip``, ``name`` seed the draw (default name: ``"random_<match>"``), so reruns
    give the same set. ``on_short`` says what happens when a stratum has too few
    non-reference tokens (module text). An empty reference gives an empty set.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(4.0, 2, 56), audio=nav.testing.synthetic_tone(4.0))
    >>> sinks = torch.cat([ex.spans.video[:3], ex.spans.audio[60:62]])      # 3 video (chunk 0), 2 audio (chunk 1)
    >>> control = matched_random_positions(ex, sinks, "chunk", seed=0)
    >>> strata(ex, control, "chunk") == strata(ex, sinks, "chunk"), set(control.tolist()) & set(sinks.tolist())
    (True, set())
    """
    _check_match(match, bins)
    if on_short not in ON_SHORT:
        raise InputError(f"on_short must be one of {ON_SHORT}, got {on_short!r}")
    layout = _Layout(_spans(item))
    ref = _as_positions(reference, layout.length, "the reference set")
    if not ref:
        return torch.zeros(0, dtype=torch.long)
    modalities = sorted({layout.labels[p] for p in ref})
    if pool is None:
        pool_list = [p for m in modalities for p in layout.by_modality[m]]
    else:
        pool_list = _as_positions(pool, layout.length, "the pool")
    rng = _rng(seed, clip, name or f"random_{match}")
    ref_set = set(ref)
    free = [p for p in pool_list if p not in ref_set]
    if match == "rank":
        picked, short = _nearest_rank(layout, ref, free, rng)
    else:
        picked, short = _stratified(layout, ref, free, match, bins, rng)
    if short:
        picked = _fill(layout, ref, pool_list, picked, short, match, bins, rng, on_short)
    return torch.tensor(sorted(picked), dtype=torch.long)


def _stratified(layout: _Layout, ref: list[int], free: list[int], match: str, bins: int,
                rng: np.random.Generator) -> tuple[list[int], list[tuple[tuple, int]]]:
    need: dict[tuple, int] = {}
    for p in ref:
        key = layout.key(p, match, bins)
        need[key] = need.get(key, 0) + 1
    candidates: dict[tuple, list[int]] = {}
    for p in free:
        candidates.setdefault(layout.key(p, match, bins), []).append(p)
    picked: list[int] = []
    short: list[tuple[tuple, int]] = []
    for key in sorted(need, key=lambda k: (str(k[0]), k[1])):
        options = candidates.get(key, [])
        take = min(need[key], len(options))
        if take:
            picked += [options[i] for i in sorted(rng.choice(len(options), size=take, replace=False).tolist())]
        if take < need[key]:
            short.append((key, need[key] - take))
    return picked, short


def _nearest_rank(layout: _Layout, ref: list[int], free: list[int], rng: np.random.Generator
                  ) -> tuple[list[int], list[tuple[tuple, int]]]:
    available: dict[str, dict[int, int]] = {}
    for p in free:
        available.setdefault(layout.labels[p], {})[layout.rank[p]] = p
    picked: list[int] = []
    short: list[tuple[tuple, int]] = []
    for i in rng.permutation(len(ref)).tolist():           # random order: no token has first pick by position
        p = ref[i]
        modality, rank = layout.labels[p], layout.rank[p]
        pool = available.get(modality, {})
        if not pool:
            short.append(((modality, rank), 1))
            continue
        ranks = np.fromiter(pool, dtype=np.int64)
        distance = np.abs(ranks - rank)
        best = ranks[distance == distance.min()]
        chosen = int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
        picked.append(pool.pop(chosen))
    return picked, short


def _fill(layout: _Layout, ref: list[int], pool: list[int], picked: list[int], short: list[tuple[tuple, int]],
          match: str, bins: int, rng: np.random.Generator, on_short: str) -> list[int]:
    """Make up the shortfall of each stratum (``on_short``), nearest strata of the same modality first."""
    if on_short == "error":
        key, missing = short[0]
        raise TokenSelectionError(f"matched random set ({match}): stratum {key} needs {missing} more non-reference "
                                  f"token(s) than the pool has; use on_short='nearest' or 'shrink'")
    if on_short == "shrink":
        return picked
    taken = set(picked)
    ref_set = set(ref)
    overlapped = relaxed = 0
    key_of = (lambda p: (layout.labels[p], layout.rank[p])) if match == "rank" else \
        (lambda p: layout.key(p, match, bins))
    for key, missing in short:
        modality, index = key
        same = [p for p in pool if p not in taken and (match == "count" or layout.labels[p] == modality)]
        for group, is_ref in (([p for p in same if p not in ref_set], False), ([p for p in same if p in ref_set], True)):
            if missing == 0 or not group:
                continue
            order = rng.permutation(len(group))                  # random among equally near candidates
            near = sorted((abs(key_of(group[i])[1] - index), k, group[i]) for k, i in enumerate(order.tolist()))
            for _, _, p in near[:missing]:
                taken.add(p)
                picked.append(p)
                overlapped += is_ref
                relaxed += not is_ref
            missing -= min(missing, len(near))
    if overlapped:
        warnings.warn(f"matched random set ({match}): the pool has too few non-reference tokens, so {overlapped} of "
                      f"{len(ref)} tokens are reference tokens (the control overlaps the reference set)",
                      ControlWarning, stacklevel=3)
    elif relaxed and match != "rank":
        warnings.warn(f"matched random set ({match}): {relaxed} of {len(ref)} tokens come from a neighbouring "
                      "stratum (too few non-reference tokens in their own)", ControlWarning, stacklevel=3)
    return picked


def match_report(item: Any, reference: Any, control: Any, match: str = "chunk", bins: int = 10) -> "pd.DataFrame":
    """Per stratum of ``match``: tokens of the reference, of the control, and shared by both.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(4.0, 2, 56), audio=nav.testing.synthetic_tone(4.0))
    >>> ref = ex.spans.video[:4]
    >>> match_report(ex, ref, matched_random_positions(ex, ref, "chunk"), "chunk").to_dict("records")
    [{'modality': 'video', 'stratum': 0, 'reference': 4, 'control': 4, 'shared': 0}]
    """
    import pandas as pd

    a, b = strata(item, reference, match, bins), strata(item, control, match, bins)
    shared = set(_as_positions(reference, _spans(item).length, "reference")) & \
        set(_as_positions(control, _spans(item).length, "control"))
    both = strata(item, sorted(shared), match, bins) if shared else {}
    keys = sorted(set(a) | set(b), key=lambda k: (str(k[0]), k[1]))
    return pd.DataFrame([{"modality": k[0], "stratum": k[1], "reference": a.get(k, 0), "control": b.get(k, 0),
                          "shared": both.get(k, 0)} for k in keys],
                        columns=["modality", "stratum", "reference", "control", "shared"])


# ---------------------------------------------------------------------------------------
# token sets of causal_trace
# ---------------------------------------------------------------------------------------
def _builder(match: str) -> Callable[..., torch.Tensor]:
    def build(item: "AVInputs", modality: str, reference: torch.Tensor, *, seed: int, clip: str, name: str
              ) -> torch.Tensor:
        return matched_random_positions(item, reference, match, pool=getattr(item.spans, modality), seed=seed,
                                        clip=clip, name=name)
    return build


#: Registered token set name -> (match, reference set).
MATCHED_TOKEN_SETS: dict[str, tuple[str, str]] = {}
for _match in MATCHES[1:]:
    for _reference in ("sink", "cross_modal_sink", "unimodal_sink"):
        _name = f"random_{_match}" if _reference == "sink" else f"random_{_match}_{_reference}"
        MATCHED_TOKEN_SETS[_name] = (_match, _reference)
        register_token_set(_name, _builder(_match), _reference)


# ---------------------------------------------------------------------------------------
# a positive control: a planted route
# ---------------------------------------------------------------------------------------
_ENCODER = {"audio": "audio_encoder", "video": "vision_encoder"}


@contextmanager
def planted_route(model: "AVModel", item: "AVInputs", route: Any, *, source: str = "audio", gain: float = 30.0,
                  seed: int = 0) -> Iterator[torch.Tensor]:
    """Inside the block, ``source``'s presence reaches the answer only through the ``route`` tokens.

    ``route``: positions of ``item``'s tokens of the other modality (the carrier). In every
    forward, the ``source`` encoder's output is zeroed (its tokens carry nothing), and the
    carrier's encoder output at the route rows gets ``gain * u`` (``u`` a seeded unit vector)
    when the ``source`` input is not blank (black frames give the same pixel values in every
    patch, digital silence the same value in every mel bin). A clean run and its ``source``-removed corruption (`ablate`) then differ in
    their input embeddings at the route positions only, so:

    - patching the route at ``resid_pre`` of layer 0 (or at ``input_layernorm`` of every
      layer) restores the clean run exactly: IE_clean = P_clean[o_clean] - P_corrupt[o_clean];
    - patching a set disjoint from the route at ``resid_pre`` of layer 0 changes nothing (0).

    A tracing setup (site, token sets, controls) that does not find such a route cannot be
    trusted to find a real one. Yields the unit vector. Forwards must hold one input at a
    time (`causal_trace` runs are); a batched forward raises `InputError`.

    >>> import nnsight_av as nav
    >>> from analyses import ablate, causal_trace
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(4.0, 2, 56), audio=nav.testing.synthetic_tone(4.0))
    >>> route = ex.spans.video[[2, 9, 13]]
    >>> with planted_route(model, ex, route):
    ...     res = causal_trace(model, ex, ablate(ex, "audio", model), "AB", token_sets={"route": route,
    ...                        "other": ex.spans.video[[3, 10, 12]]}, site="resid_pre", layers=[0], progress=False)
    >>> effects = res.effects.set_index("token_set")["ie_clean"]
    >>> float(effects["other"]), float(effects["route"]) != 0.0
    (0.0, True)
    """
    if source not in _ENCODER:
        raise InputError(f"source must be 'audio' or 'video', got {source!r}")
    carrier = "video" if source == "audio" else "audio"
    base = getattr(item.spans, carrier).long().cpu()
    positions = torch.as_tensor(route.tolist() if torch.is_tensor(route) else list(route), dtype=torch.long)
    rows = torch.searchsorted(base, positions)
    if positions.numel() == 0 or bool((rows >= base.numel()).any()) or not torch.equal(base[rows.clamp(max=max(
            base.numel() - 1, 0))], positions):
        raise TokenSelectionError(f"route must be a non-empty set of this input's {carrier} token positions")
    try:
        source_module, carrier_module = model.raw(_ENCODER[source]), model.raw(_ENCODER[carrier])
    except AdapterError:
        raise InputError("planted_route needs a model with both an audio and a vision encoder") from None
    u = torch.nn.functional.normalize(torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(seed)),
                                      dim=0)
    state: dict[str, float] = {}

    def is_on(features: torch.Tensor) -> float:
        # black frames give the same values in every patch, silence the same in every mel bin
        flat = features.float().squeeze()
        return float(flat.shape[0] > 1 and bool((flat.std(0) > 1e-6).any()))

    def on_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # read the source's presence before any encoder runs, whichever runs first
        state.clear()
        for name in MEDIA_FEATURES[source]:
            if torch.is_tensor(kwargs.get(name)):
                state["on"] = is_on(kwargs[name])
                break

    def on_source(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if "on" not in state:
            state["on"] = is_on(args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v)))
        model.adapter.encoder_tokens(_ENCODER[source], output).zero_()

    def on_carrier(module: torch.nn.Module, args: tuple, output: Any) -> None:
        tokens = model.adapter.encoder_tokens(_ENCODER[carrier], output)
        if tokens.shape[0] != base.numel():
            raise InputError(f"planted_route: this forward has {tokens.shape[0]} {carrier} tokens, the input "
                             f"{base.numel()}; run one input per forward inside the block")
        if "on" not in state:
            raise InputError(f"planted_route: could not tell whether this forward's {source} is blank (no "
                             f"{'/'.join(MEDIA_FEATURES[source])} argument before the {carrier} encoder ran)")
        tokens[rows.to(tokens.device)] += gain * state["on"] * u.to(tokens.device, tokens.dtype)

    handles = [model.raw().register_forward_pre_hook(on_forward, with_kwargs=True),
               source_module.register_forward_hook(on_source, with_kwargs=True),
               carrier_module.register_forward_hook(on_carrier)]
    try:
        yield u
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------
# length control
# ---------------------------------------------------------------------------------------
def toy_length_pairs(model: "AVModel", seconds: float, n: int, seed: int = 0
                     ) -> list[tuple[str, "AVInputs", "AVInputs"]]:
    """``n`` audio-dominant toy clips of ``seconds``: ``(id, clean, audio removed)`` pairs.

    Clips show the entities only their sound tells apart (bell, horn, bird, frog), so the
    answer rests on the audio by construction; the prompt is the toy multiple-choice one.
    """
    audio_only = [e.name for e in toy.ENTITIES if e.identified_by == "audio"]
    records = toy.make_dataset(n, seed=seed, task="mc", entities=audio_only, seconds=seconds,
                               prefix=f"toy{seconds:g}s-")
    pairs = []
    for record in records:
        clean = record.prepare(model)
        pairs.append((record.id, clean, ablate(clean, "audio", model)))
    return pairs


@dataclass
class LengthControlResult(JsonResult):
    """Causal-tracing effects of the same token sets on clips of several lengths.

    ``trace``: a `TraceResult` whose effect rows carry ``seconds`` and ``length`` (tokens);
    ``meta``: the settings.
    """

    trace: TraceResult
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def effects(self) -> "pd.DataFrame":
        return self.trace.effects

    def table(self, scale: float = 100.0) -> "pd.DataFrame":
        """Mean IE_clean / IE_corrupt (x ``scale``) per clip length and token set, with counts."""
        frame = self.effects
        grouped = frame.groupby(["seconds", "token_set"], sort=False)
        out = grouped[["ie_clean", "ie_corrupt"]].mean() * scale
        out.columns = ["IE_clean", "IE_corrupt"]
        out["clips"] = grouped["clip"].nunique()
        out["tokens"] = grouped["n_tokens"].mean()
        out["sequence"] = grouped["length"].mean()
        return out.sort_index(level=0, sort_remaining=False)

    def gaps(self, reference: str = "sink", scale: float = 100.0) -> "pd.DataFrame":
        """Per length and control set: mean of ``reference`` minus control, per clip, with its standard error."""
        import pandas as pd

        frame = self.effects
        wide = frame.pivot_table(index=["seconds", "clip"], columns="token_set", values=["ie_clean", "ie_corrupt"])
        rows = []
        sets = [s for s in dict.fromkeys(frame["token_set"]) if s != reference and s != "all"]
        if reference not in set(frame["token_set"]):
            raise InputError(f"no {reference!r} rows in this result; token sets: {sorted(set(frame['token_set']))}")
        for seconds, part in wide.groupby(level=0, sort=True):
            for name in sets:
                row = {"seconds": seconds, "control": name}
                for effect in ("ie_clean", "ie_corrupt"):
                    diff = (part[(effect, reference)] - part[(effect, name)]) * scale
                    label = effect.replace("ie_", "IE_")
                    row[f"{label}_gap"] = float(diff.mean())
                    row[f"{label}_sem"] = float(diff.sem()) if len(diff) > 1 else float("nan")
                row["clips"] = int(len(part))
                rows.append(row)
        return pd.DataFrame(rows)

    def to_frame(self) -> "pd.DataFrame":
        """The tidy effects table: one row per (clip, token set, window), with ``seconds`` and ``length``."""
        return self.trace.to_frame()

    def summary(self, scale: float = 100.0) -> "pd.DataFrame":
        """Mean effects per clip length and token set (x ``scale``): `table`. `report` has the text form."""
        return self.table(scale)

    def report(self) -> str:
        """A few lines: per length, the sequence length and sink minus each control (IE_clean).

        This was ``summary()`` before the result protocol made ``summary()`` a DataFrame.
        """
        lines = [f"length control: {self.effects['clip'].nunique()} clips, lengths {sorted(set(self.effects['seconds']))} s, "
                 f"site {self.trace.meta.get('site')!r}"]
        table = self.table()
        gaps = self.gaps() if "sink" in set(self.effects["token_set"]) else None
        for seconds in sorted(set(self.effects["seconds"])):
            part = table.loc[seconds]
            line = f"  {seconds:g} s ({part['sequence'].iloc[0]:.0f} tokens):"
            line += ", ".join(f" {name} {row.IE_clean:.2f}" for name, row in part.iterrows())
            if gaps is not None:
                mine = gaps[gaps["seconds"] == seconds]
                line += " | sink - " + ", ".join(f"{r.control} {r.IE_clean_gap:+.2f}" for r in mine.itertuples())
            lines.append(line)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"LengthControlResult(lengths={sorted(set(self.effects['seconds']))}, clips={self.effects['clip'].nunique()}, "
                f"token_sets={list(dict.fromkeys(self.effects['token_set']))})")

    def plot(self, effect: str = "ie_clean", scale: float = 100.0, ax: Any = None) -> "Figure":
        """Mean effect per token set against clip length; see `analyses.plots.plot_length_control`."""
        return plot_length_control(self, effect, scale, ax)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "LengthControlResult", "meta": self.meta, "trace": self.trace.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LengthControlResult":
        return cls(TraceResult.from_dict(data["trace"]), dict(data.get("meta", {})))


def length_control(
    model: "AVModel",
    lengths: Sequence[float] = (2.0, 4.0, 8.0),
    clips: int = 4,
    token_sets: Sequence[str] | Mapping[str, Any] = ("sink", "random", "random_chunk", "random_position"),
    *,
    pairs: Callable[["AVModel", float, int, int], Sequence[tuple[str, "AVInputs", "AVInputs"]]] | None = None,
    options: Any = None,
    seed: int = 0,
    progress: bool = True,
    **trace_kwargs: Any,
) -> LengthControlResult:
    """The same causal-tracing comparison on clips of each length in ``lengths`` (seconds).

    ``pairs(model, seconds, clips, seed)`` makes the clips: ``(id, clean, corrupt)`` triples
    (default `toy_length_pairs`: audio-dominant toy clips with the audio removed); ``options``:
    the answer letters (default with toy clips: the toy world's ten, A-J). Each length
    runs `causal_trace` with ``token_sets`` and ``trace_kwargs`` (``site``, ``layers``,
    ``window``, ``sink_options``, ``dominant`` ...); the rows get ``seconds`` and ``length``
    (tokens). `LengthControlResult.table` / ``.gaps()`` / ``.report()`` / ``.plot()`` read it.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> res = length_control(model, lengths=[2.0], clips=1, token_sets=["sink", "random_chunk"],
    ...                      sink_options={"dims": [0, 1], "tau": 2.0}, progress=False)
    >>> list(res.table().index)
    [(2.0, 'sink'), (2.0, 'random_chunk')]
    """
    from tqdm.auto import tqdm

    lengths = [float(s) for s in lengths]
    if not lengths or any(not np.isfinite(s) or s <= 0 for s in lengths):
        raise InputError(f"lengths must be positive durations in seconds, got {lengths}")
    if not isinstance(clips, (int, np.integer)) or clips < 1:
        raise InputError(f"clips must be a positive int, got {clips!r}")
    make = pairs or toy_length_pairs
    if options is None:
        if pairs is not None:
            raise InputError("pass options= (the answer letters) with your own pairs()")
        options = toy.LETTERS[:len(toy.ENTITY_NAMES)]
    letters = options
    results = []
    for seconds in tqdm(lengths, desc="length control", disable=not progress):
        made = list(make(model, seconds, int(clips), seed))
        if not made:
            raise InputError(f"pairs() made no clips of {seconds:g} s")
        ids = [str(c) for c, _, _ in made]
        res = causal_trace(model, [c for _, c, _ in made], [x for _, _, x in made], letters, token_sets=token_sets,
                           clips=ids, seed=seed, progress=False, **trace_kwargs)
        sizes = {cid: len(clean) for cid, clean, _ in made}
        res.effects["seconds"] = seconds
        res.effects["length"] = res.effects["clip"].map(sizes)
        results.append(res)
    trace = TraceResult.concat(results)
    trace.meta = dict(results[0].meta)
    return LengthControlResult(trace, {"lengths": lengths, "clips": int(clips), "seed": seed,
                                       "token_sets": list(token_sets) if not isinstance(token_sets, Mapping)
                                       else list(token_sets)})
