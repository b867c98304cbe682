"""The patched forwards of causal tracing: `PatchRunner` and its records.

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
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float, Int

from interventions.base import as_intervention
from interventions.runtime.hooks import applied
from interventions.site import ALIASES, canonical_role
from nnsight_av.errors import InputError

from .ablation import encoder_edit, zeroed_of
from .options import last_logits_only, letter_probs, normalize_options, on_device, option_token_ids
from .token_sets import Condition

if TYPE_CHECKING:
    from nnsight_av import AVInputs, AVModel

__all__ = ["SITES", "canonical_site", "PatchRunner", "CleanRecord", "CorruptRecord"]

#: Where clean activations are written. ``input_layernorm``: the normalised input to attention
#: (the paper's default); ``resid_pre`` / ``resid_post``: a layer's input / output;
#: ``attn_output`` / ``mlp_output``: the attention block's / MLP's output.
SITES = ("input_layernorm", "resid_pre", "resid_post", "attn_output", "mlp_output")
_SITE_ROLE = {"input_layernorm": "input_layernorm", "attn_output": "self_attn", "mlp_output": "mlp"}
#: Built-in token sets (all of the non-dominant modality's tokens, or subsets of them).


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
# the engine
# ---------------------------------------------------------------------------------------
@dataclass
class CleanRecord:
    """The clean run: letter probabilities and the site's values at ``positions`` for ``layers``.

    ``keys`` / ``kv_values`` (when recorded) hold each layer's post-rotary keys / values, which
    the exact sweep uses for positions it need not compute (see `PatchRunner`).
    """

    probs: Float[torch.Tensor, "options"]
    positions: Int[torch.Tensor, "positions"]
    values: dict[int, torch.Tensor]                   # layer -> [n, hidden] on the model's device
    keys: dict[Any, torch.Tensor] | None = None
    kv_values: dict[Any, torch.Tensor] | None = None


@dataclass
class CorruptRecord:
    """The corrupted run, cached so a patched condition can start at any layer and position."""

    probs: Float[torch.Tensor, "options"]
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
            batch_size: int = 4, progress: bool = False) -> Float[torch.Tensor, "conditions options"]:
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
                  progress: bool = False) -> Float[torch.Tensor, "conditions options"]:
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
