"""Removing a modality from a clip, the two ways of METHOD.md section 4.

- At the raw input (the paper's way, the default of `analyses.ablate` and of the dominance
  test): black frames of the same size / digital silence of the same length go through the
  processor again, so the token ids and positions are unchanged. This is an *input-level
  transform*, not an activation edit: it changes what the encoders see, so it is applied to
  the inputs (`blank_request`, `blank_inputs`) before any forward, on either runtime.
- At the embeddings (the option METHOD.md welcomes, "zero the encoder outputs"): the
  modality's tokens enter the decoder as zero vectors. This *is* an activation edit, the
  `Zero` primitive on the modality's span at the input of layer 0 (`zero_modalities`), so it
  runs on both runtimes and composes with other interventions. For Qwen-Omni, whose encoder
  output (vision merger and audio projection included) is merged as it is, it equals zeroing
  the encoder's output; a SALMONN-style model projects after its encoder, where zeroing the
  encoder's output would leave ``projector(0)`` (a constant, not nothing) in the embeddings.

>>> zero_modalities("audio").to_dict()["site"], zero_modalities(["video", "audio"]).site.tokens
('resid_pre', ('audio', 'video'))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from nnsight_av.errors import InputError, SpanError
from nnsight_av.inputs import AVInputs, MediaRequest
from nnsight_av.spans import AV_MODALITIES

from .primitives import Zero

if TYPE_CHECKING:
    from nnsight_av.model import AVModel

__all__ = ["removable_modalities", "blank_request", "blank_inputs", "zero_modalities", "check_same_layout"]


def removable_modalities(modality: str | Sequence[str]) -> list[str]:
    """``modality`` as a sorted list of names from ``AV_MODALITIES`` (`InputError` otherwise).

    >>> removable_modalities(["video", "audio"])
    ['audio', 'video']
    """
    names = [modality] if isinstance(modality, str) else list(modality)
    bad = [m for m in names if m not in AV_MODALITIES]
    if bad or not names:
        raise InputError(f"modality must be 'audio' or 'video' (or a list of them), got {modality!r}")
    return sorted(set(names))


def blank_request(request: MediaRequest, modality: str | Sequence[str]) -> MediaRequest:
    """``request`` with ``modality``'s media replaced by zeros of the same shape (black frames, silence)."""
    changes: dict[str, Any] = {}
    for name in removable_modalities(modality):
        value = request.video if name == "video" else request.audio
        if value is None:
            raise InputError(f"cannot remove {name}: this clip has no {name}")
        changes[name] = np.zeros_like(value)
    return request.with_media(**changes)


def blank_inputs(model: "AVModel", inputs: AVInputs, modality: str | Sequence[str]) -> AVInputs:
    """The same clip with ``modality`` removed at the raw input, prepared again (METHOD.md section 4).

    The token ids are checked to be identical to ``inputs``' (`SpanError` if the processor gives
    other tokens), so positions line up for patching and for the three dominance runs.
    """
    if not isinstance(inputs, AVInputs):
        raise InputError(f"blank_inputs needs AVInputs (from model.prepare), got {type(inputs).__name__}")
    names = removable_modalities(modality)
    out = model.prepare_request(blank_request(inputs.request, names))
    check_same_layout(inputs, out, f"the clip and its {'+'.join(names)}-removed version")
    return out


def check_same_layout(a: AVInputs, b: AVInputs, what: str = "the two inputs") -> None:
    """Raise `SpanError` unless ``a`` and ``b`` have identical token ids (hence identical positions)."""
    ia, ib = a.input_ids.reshape(-1).cpu(), b.input_ids.reshape(-1).cpu()
    if ia.shape != ib.shape or not torch.equal(ia, ib):
        where = "lengths differ" if ia.shape != ib.shape else \
            f"first difference at position {int((ia != ib).nonzero()[0])}"
        raise SpanError(f"{what} have different token layouts ({len(ia)} vs {len(ib)} tokens, {where}); "
                        "an ablation or a clean/corrupt pair must keep every token in place")


def zero_modalities(modality: str | Sequence[str]) -> Zero:
    """`Zero` on ``modality``'s tokens at the input of layer 0: the modality enters the decoder as zero vectors.

    Equal to zeroing the encoder's output where the adapter's encoder output is merged as it
    is (Qwen-Omni; see the module docstring for projectors after the encoder); an input
    without tokens of the modality is left alone.
    """
    names = removable_modalities(modality)
    return Zero(site="resid_pre", layers=0, tokens=names[0] if len(names) == 1 else names, allow_empty=True)
