"""Causal tracing (activation patching) between a clean and a corrupted clip (METHOD.md section 5).

Source = the clean run (both modalities); target = the corrupted run (the dominant
modality removed). Clean activations of a token set of the *non-dominant* modality are
written into the corrupted run at a site of every layer of a window, during the prefill,
and the answer-letter probabilities are read at the last prompt position:

- ``IE_clean = P_patched[o_clean] - P_corrupt[o_clean]`` (restoring the clean answer);
- ``IE_corrupt = P_corrupt[o_corrupt] - P_patched[o_corrupt]`` (suppressing the corrupt one).

``method="attribution"`` estimates every condition to first order instead:
``(a_clean - a_corrupt) . d P / d a`` summed over the patched positions and layers, from
the clean forward, one corrupted forward and a backward pass per effect (two in all).

The parts: `analyses.token_sets` (conditions, windows, the token sets), `analyses.patching`
(`PatchRunner`: the clean, corrupted and patched forwards on the hook runtime) and
`analyses.trace_result` (`TraceResult`); this module is the entry point, `causal_trace`, and
re-exports their public names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from nnsight_av.errors import InputError
from nnsight_av.inputs import AVInputs

from .ablation import check_same_layout
from .mds import modality_dominance, sink_analysis
from .options import on_device
from .patching import SITES, CleanRecord, CorruptRecord, PatchRunner, canonical_site  # noqa: F401  (re-exported)
from .plots import LABEL_WIDTH  # noqa: F401  (its old home)
from .sinks import find_sinks
from .token_sets import (DEFAULT_TOKEN_SETS, TOKEN_SETS, Condition, infer_dominant,  # noqa: F401  (re-exported)
                         make_windows, object_positions, random_positions, register_token_set,
                         registered_token_sets, resolve_token_sets, window_label)
from .trace_result import EFFECT_COLUMNS, TraceResult, rank_agreement  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from nnsight_av import AVModel

__all__ = ["causal_trace", "trace_clip", "TraceResult", "SITES", "TOKEN_SETS", "DEFAULT_TOKEN_SETS", "PatchRunner",
           "CleanRecord", "CorruptRecord", "Condition", "make_windows", "resolve_token_sets", "random_positions",
           "object_positions", "infer_dominant", "rank_agreement", "METHODS", "canonical_site", "window_label",
           "register_token_set", "registered_token_sets"]

METHODS = ("exact", "naive", "attribution")


# ---------------------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------------------
def _sink_inputs(model: "AVModel", clean: "AVInputs", names: set[str], sinks: Any, split: Any,
                 sink_options: Mapping[str, Any] | None, split_rule: str) -> tuple[Any, Any]:
    names = names | {ref for name, ref in registered_token_sets().items() if name in names}
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
    return TraceResult(pd.DataFrame(rows, columns=EFFECT_COLUMNS), {clip: info},
                       {"site": runner.site, "method": method, "options": options})
