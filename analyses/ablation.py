"""Removing one modality from a clip while keeping its token layout (METHOD.md section 4).

Both ways live with the intervention primitives (`interventions.modality`); this module is
the analyses' entry point. ``method="raw"`` (default, the paper's): black frames of the same
size / digital silence of the same length go through the processor again (an input-level
transform), so the token ids and positions are unchanged (checked). ``method="encoder"``: the
clip is left as it is and marked (`EncoderAblatedInputs`); every forward the analyses run
applies `ablation_intervention` to it, the `Zero` primitive on the modality's tokens at the
input of layer 0, so that modality's token embeddings are exactly zero (what zeroing the
encoder's output gives).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from nnsight_av.errors import InputError
from nnsight_av.inputs import AVInputs, MediaRequest
from nnsight_av.spans import AV_MODALITIES

from interventions.base import Intervention
from interventions.modality import blank_inputs, blank_request, check_same_layout, removable_modalities, \
    zero_modalities

if TYPE_CHECKING:
    from nnsight_av import AVModel

__all__ = ["ablate", "EncoderAblatedInputs", "encoder_edit", "zeroed_of", "ablation_intervention",
           "check_same_layout", "MODALITIES", "ABLATION_METHODS"]

MODALITIES = AV_MODALITIES  # the removable ones (old name, kept)
ABLATION_METHODS = ("raw", "encoder")


@dataclass
class EncoderAblatedInputs(AVInputs):
    """`AVInputs` whose ``zeroed`` modalities get their encoder outputs zeroed in the forward.

    The analyses (`option_probs`, `causal_trace`, `dominance`) apply `ablation_intervention`
    themselves; in your own trace call ``encoder_edit(model, ex)`` first thing inside it, or
    pass ``ablation_intervention(ex)`` to ``interventions.run`` / ``applied``.
    """

    zeroed: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"EncoderAblatedInputs(zeroed={list(self.zeroed)}, {self.spans!r})"


def zeroed_of(item: Any) -> tuple[str, ...]:
    """The modalities whose encoder output is zeroed for ``item`` (empty for ordinary inputs)."""
    return tuple(getattr(item, "zeroed", ()) or ())


def ablation_intervention(item: Any) -> Intervention | None:
    """The intervention every forward of ``item`` applies: `zero_modalities` of its zeroed modalities (or None).

    >>> ablation_intervention(object()) is None
    True
    """
    zeroed = zeroed_of(item)
    return zero_modalities(zeroed) if zeroed else None


def _ablate_media(media: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    out = dict(media)
    for name in names:
        if out.get(name) is None:
            raise InputError(f"cannot remove {name}: the media dict has no {name!r} entry")
        value = out[name]
        if isinstance(value, (str, bytes)) or not hasattr(value, "shape"):
            raise InputError(f"raw ablation of {name} needs decoded media (an array), got {type(value).__name__}; "
                             "decode it first (nnsight_av.media.load_video / load_audio) or pass AVInputs")
        out[name] = np.zeros_like(np.asarray(value))
    return out


def ablate(
    inputs_or_media: "AVInputs | MediaRequest | Mapping[str, Any]",
    modality: str | Sequence[str],
    model: "AVModel | None" = None,
    method: str = "raw",
) -> Any:
    """The same clip with ``modality`` ("audio" or "video", or both) removed.

    - ``AVInputs`` + ``method="raw"`` (needs ``model``): black frames / silence through
      ``model.prepare_request``; the token ids are checked to be identical (`SpanError` if not).
    - ``AVInputs`` + ``method="encoder"``: an `EncoderAblatedInputs` (same tensors) whose
      encoder output for ``modality`` is zeroed in every forward the analyses run.
    - a `MediaRequest` or a dict ``{"video": frames, "audio": wave, ...}``: the same kind
      of object with zeroed media (an `AVInputs` if ``model`` is given).

    >>> import numpy as np
    >>> media = ablate({"video": np.ones((2, 4, 4, 3), np.uint8), "audio": np.ones(8, np.float32)}, "audio")
    >>> float(media["audio"].max()), int(media["video"].min())
    (0.0, 1)
    """
    names = removable_modalities(modality)
    if method not in ABLATION_METHODS:
        raise InputError(f"method must be one of {ABLATION_METHODS}, got {method!r}")
    if isinstance(inputs_or_media, AVInputs):
        item = inputs_or_media
        for name in names:
            if getattr(item.spans, name).numel() == 0:
                raise InputError(f"cannot remove {name}: this input has no {name} tokens")
        if method == "encoder":
            if "video" in names and item.spans.image.numel():
                raise InputError("encoder ablation of video is not supported for inputs that also hold images "
                                 "(images and video share the vision encoder's calls)")
            values = {f.name: getattr(item, f.name) for f in fields(AVInputs)}
            return EncoderAblatedInputs(**values, zeroed=tuple(sorted(set(zeroed_of(item)) | set(names))))
        if model is None:
            raise InputError("raw ablation runs the processor again: pass model=")
        if zeroed_of(item):
            raise InputError("this input already has encoder-zeroed modalities; ablate the original input instead")
        return blank_inputs(model, item, names)
    if method == "encoder":
        raise InputError("encoder ablation needs prepared inputs (AVInputs): model.prepare(...) first")
    if isinstance(inputs_or_media, MediaRequest):
        request = blank_request(inputs_or_media, names)
        return model.prepare_request(request) if model is not None else request
    if isinstance(inputs_or_media, Mapping):
        return _ablate_media(inputs_or_media, names)
    raise InputError(f"ablate takes AVInputs, a MediaRequest or a dict of media, got {type(inputs_or_media).__name__}")


def encoder_edit(model: "AVModel", item: Any, offsets: Mapping[str, int] | None = None) -> None:
    """Inside a trace (or invoke): remove ``item``'s zeroed modalities (`ablation_intervention`, applied there).

    Call it first thing in the invoke, before reading any layer. ``offsets`` (where this
    input's tokens started in the packed encoder outputs of a batch) is no longer needed: the
    intervention finds its invoke's rows itself; it is accepted for old calls.
    """
    iv = ablation_intervention(item)
    if iv is not None:
        iv.apply(model, item)
