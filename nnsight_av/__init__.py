"""nnsight-av: mechanistic interpretability for audio-visual LLMs, built on nnsight.

>>> import nnsight_av as nav
>>> model = nav.testing.tiny_model()
>>> model.num_layers
4
"""

from . import adapters  # noqa: F401  (registers the built-in adapters)
from . import testing  # noqa: F401
from .adapters.base import Adapter, get_adapter, register_adapter, registered_adapters
from .errors import (AdapterError, FormatError, InputError, LayerIndexError, MediaError, MissingAudioError,
                     NNsightAVError, SpanError, TokenSelectionError, UnknownModelError, WeightsChecksumError,
                     WeightsUnavailableError)
from .inputs import AVInputs, MediaRequest
from .loading import load
from .model import AVModel
from .spans import Chunk, Spans

__version__ = "0.1.0"

__all__ = ["load", "AVModel", "AVInputs", "MediaRequest", "Spans", "Chunk", "Adapter", "register_adapter",
           "get_adapter", "registered_adapters", "testing", "NNsightAVError", "UnknownModelError", "AdapterError",
           "MediaError", "MissingAudioError", "InputError", "FormatError", "SpanError", "LayerIndexError",
           "TokenSelectionError", "WeightsUnavailableError", "WeightsChecksumError"]
