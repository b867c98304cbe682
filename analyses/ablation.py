"""Removing one modality from a clip while keeping its token layout (METHOD.md section 4).

``method="raw"`` (default, the paper's): black frames of the same size / digital silence
of the same length go through the processor again, so the token ids and positions are
unchanged (checked). ``method="encoder"``: the clip is left as it is and the packed
output of the modality's encoder is zeroed inside the forward (an nnsight edit), so that
modality's token embeddings are exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from nnsight_av.errors import InputError, SpanError
from nnsight_av.inputs import AVInputs, MediaRequest
from nnsight_av.spans import AV_MODALITIES

if TYPE_CHECKING:
    from nnsight_av import AVModel

__all__ = ["ablate", "EncoderAblatedInputs", "encoder_edit", "zeroed_of", "check_same_layout", "MODALITIES",
           "ABLATION_METHODS"]

MODALITIES = AV_MODALITIES  # the removable ones (old name, kept)
ABLATION_METHODS = ("raw", "encoder")
_ENCODER_ROLE = {"audio": "audio_encoder", "video": "vision_encoder"}


@dataclass
class EncoderAblatedInputs(AVInputs):
    """`AVInputs` whose ``zeroed`` modalities get their encoder outputs zeroed in the forward.

    The analyses (`option_probs`, `causal_trace`, `dominance`) apply the edit themselves;
    in your own trace call ``encoder_edit(model, ex)`` first thing inside it.
    """

    zeroed: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"EncoderAblatedInputs(zeroed={list(self.zeroed)}, {self.spans!r})"


def zeroed_of(item: Any) -> tuple[str, ...]:
    """The modalities whose encoder output is zeroed for ``item`` (empty for ordinary inputs)."""
    return tuple(getattr(item, "zeroed", ()) or ())


def _modalities(modality: str | Sequence[str]) -> list[str]:
    names = [modality] if isinstance(modality, str) else list(modality)
    bad = [m for m in names if m not in MODALITIES]
    if bad or not names:
        raise InputError(f"modality must be 'audio' or 'video' (or a list of them), got {modality!r}")
    return names


def _ablate_request(request: MediaRequest, names: list[str]) -> MediaRequest:
    changes: dict[str, Any] = {}
    for name in names:
        value = request.video if name == "video" else request.audio
        if value is None:
            raise InputError(f"cannot remove {name}: this clip has no {name}")
        changes[name] = np.zeros_like(value)
    return request.with_media(**changes)


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


def check_same_layout(a: AVInputs, b: AVInputs, what: str = "the two inputs") -> None:
    """Raise `SpanError` unless ``a`` and ``b`` have identical token ids (hence identical positions)."""
    ia, ib = a.input_ids.reshape(-1).cpu(), b.input_ids.reshape(-1).cpu()
    if ia.shape != ib.shape or not torch.equal(ia, ib):
        where = "lengths differ" if ia.shape != ib.shape else \
            f"first difference at position {int((ia != ib).nonzero()[0])}"
        raise SpanError(f"{what} have different token layouts ({len(ia)} vs {len(ib)} tokens, {where}); "
                        "an ablation or a clean/corrupt pair must keep every token in place")


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
    names = _modalities(modality)
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
        out = model.prepare_request(_ablate_request(item.request, names))
        check_same_layout(item, out, f"the clip and its {'+'.join(names)}-removed version")
        return out
    if method == "encoder":
        raise InputError("encoder ablation needs prepared inputs (AVInputs): model.prepare(...) first")
    if isinstance(inputs_or_media, MediaRequest):
        request = _ablate_request(inputs_or_media, names)
        return model.prepare_request(request) if model is not None else request
    if isinstance(inputs_or_media, Mapping):
        return _ablate_media(inputs_or_media, names)
    raise InputError(f"ablate takes AVInputs, a MediaRequest or a dict of media, got {type(inputs_or_media).__name__}")


def encoder_edit(model: "AVModel", item: Any, offsets: Mapping[str, int] | None = None) -> None:
    """Inside a trace (or invoke): zero ``item``'s share of the packed encoder outputs it marks.

    Encoder outputs have no batch dimension (every input's tokens are packed in order),
    so ``offsets[modality]`` says where this input's tokens start: the count of that
    modality's tokens in the inputs before it in the batch (0 for a single input).
    """
    for name in sorted(zeroed_of(item), key=lambda m: 0 if m == "audio" else 1):  # execution order
        role = _ENCODER_ROLE[name]
        envoy = getattr(model, role)
        tokens = model.adapter.encoder_tokens(role, envoy.output)
        start = int((offsets or {}).get(name, 0))
        count = int(getattr(item.spans, name).numel())
        tokens[start:start + count] = 0
