"""Exceptions with messages that name the problem.

Every error the library raises on bad input derives from `NNsightAVError`, so a
notebook can catch them all at once and a test can assert the exact kind.
"""

from __future__ import annotations


class NNsightAVError(Exception):
    """Base class of every error nnsight-av raises on bad input."""


class UnknownModelError(NNsightAVError, ValueError):
    """No registered adapter handles this checkpoint's ``model_type``."""


class AdapterError(NNsightAVError, ValueError):
    """An adapter does not fit the model it was given (wrong path, wrong token id, ...)."""


class MediaError(NNsightAVError, ValueError):
    """A media file or array cannot be decoded."""


class MissingAudioError(MediaError):
    """Audio was requested from a video file that has no audio track."""


class InputError(NNsightAVError, ValueError):
    """The inputs given to ``prepare`` / a trace are inconsistent or empty."""


class SpanError(NNsightAVError, ValueError):
    """Token spans disagree with the processor's layout or the encoders' output."""


class LayerIndexError(NNsightAVError, IndexError):
    """A layer index is outside ``[0, num_layers)``."""


class TokenSelectionError(NNsightAVError, ValueError):
    """A token selector is empty, out of range, or names an unknown span."""


class WeightsUnavailableError(NNsightAVError, OSError):
    """Pretrained weights the library needs are neither installed, cached, nor fetchable right now."""


class WeightsChecksumError(WeightsUnavailableError):
    """A downloaded or cached weights file does not have the sha256 the library pins (corrupt or tampered)."""


class FormatError(InputError):
    """A saved description cannot be rebuilt: a malformed intervention dict or JSON, or a bad cache file."""
