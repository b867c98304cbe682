"""Composable intervention primitives for audio-visual LLMs.

An intervention edits a `Site` (module role x layers x tokens x heads) inside a trace.
Token selectors resolve against each invoke's own spans, so one intervention applies
to a batch of inputs of different lengths.

Primitives: `Zero`, `MeanPatch`, `Patch`, `Noise` (activations) and `AttentionKnockout`,
`AttentionBoost` (attention, any backend, no attention maps materialised). Combine them
with ``a + b`` / `Compose`; use them with ``iv.apply(model)`` inside an invoke,
`run` / ``model.run`` (logits) or `generate`; save them with ``iv.to_dict()`` and
`from_dict`. The same objects run in an nnsight trace or on the hook runtime
(`interventions.runtime`, ``runtime="hooks"``), with the same results. See
docs/interventions.md.

>>> import interventions as ivs
>>> iv = ivs.Zero(layers=ivs.window(1, 2), tokens="audio") + ivs.AttentionBoost(queries="text", keys="sinks", alpha=0.2)
>>> [type(c).__name__ for c in iv]
['Zero', 'AttentionBoost']
>>> ivs.from_dict(iv.to_dict()) == iv
True
"""

from nnsight_av.model import register_runner

from .attention import AttentionBoost, AttentionEdit, AttentionKnockout, apply_attention_edits
from .base import Compose, Intervention, from_dict, from_json, register_intervention, registered_interventions
from .cache import ActivationCache, cache_activations, compute_means, layout_signature, modality_stds
from .context import MODALITIES, ApplyContext
from .modality import blank_inputs, zero_modalities
from .primitives import MeanPatch, Noise, Patch, Zero
from .run import generate, run
from .selectors import resolve_tokens
from .site import ROLES, Site, window
from . import runtime  # noqa: E402  (the hook runtime: interventions.runtime.applied, Decoder, ...)

register_runner(run)  # `model.run` (the core cannot import this layer, so it is handed down)

__all__ = [
    "Site", "ROLES", "window", "resolve_tokens", "MODALITIES",
    "Intervention", "Compose", "from_dict", "from_json", "register_intervention", "registered_interventions",
    "Zero", "MeanPatch", "Patch", "Noise", "AttentionKnockout", "AttentionBoost",
    "ActivationCache", "cache_activations", "compute_means", "modality_stds", "layout_signature",
    "run", "generate", "ApplyContext", "AttentionEdit", "apply_attention_edits", "runtime",
    "blank_inputs", "zero_modalities",
]
