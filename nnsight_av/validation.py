"""Load-time adapter checks (the cheap subset; `nav.testing.check_adapter` runs the full set)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adapters.base import TOKEN_ROLES
from .errors import AdapterError

if TYPE_CHECKING:
    from .model import AVModel


def quick_check(model: "AVModel") -> None:
    """Roles resolve, layer count and token ids agree with the config; raises `AdapterError` naming the fault."""
    adapter = model.adapter
    layers = model.envoy_at(adapter.paths["layers"])._module
    if len(layers) != adapter.num_layers:
        raise AdapterError(f"adapter {adapter.name!r}: {len(layers)} decoder layers at {adapter.paths['layers']!r} "
                           f"but the config says {adapter.num_layers}")
    vocab = int(model.envoy_at(adapter.paths["embed"])._module.weight.shape[0])
    for role in TOKEN_ROLES:
        token = adapter.token_id(role)
        if not 0 <= token < vocab:
            raise AdapterError(f"adapter {adapter.name!r}: the {role!r} token id {token} is outside the "
                               f"embedding table (size {vocab})")
    tokenizer = model.tokenizer
    if tokenizer is not None:
        for role, attribute in (("audio", "audio_token"), ("video", "video_token"), ("image", "image_token")):
            text = getattr(tokenizer, attribute, None)
            if text is not None and tokenizer.convert_tokens_to_ids(text) != adapter.token_id(role):
                raise AdapterError(f"adapter {adapter.name!r}: the config's {role!r} token id "
                                   f"{adapter.token_id(role)} differs from the tokenizer's {text!r} "
                                   f"({tokenizer.convert_tokens_to_ids(text)})")
