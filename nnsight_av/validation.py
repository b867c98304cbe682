"""Load-time adapter checks (the cheap subset; `nav.testing.check_adapter` runs the full set).

Nothing here runs the model: it resolves every declared module role, checks the module
shapes and the layer count against the config, finds the attention-function call the
sink-column analyses read q/k from, and checks the special-token ids against the
vocabulary and the tokenizer. Each finder returns a list of messages that name the
role, path or token at fault; `quick_check` raises them together as one `AdapterError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .adapters.base import LAYER_ROLES, REQUIRED_MODEL_ROLES, TOKEN_ROLES, get_module
from .errors import AdapterError

if TYPE_CHECKING:
    from .model import AVModel

__all__ = ["quick_check", "role_problems", "token_problems"]


def _tried(adapter, role: str, layer: bool = False) -> str:
    candidates = (adapter.layer_roles if layer else adapter.roles).get(role, ())
    return ", ".join(repr(c) for c in candidates) or "(no candidate paths)"


def role_problems(model: "AVModel") -> list[str]:
    """Messages for module roles that do not resolve or do not have the shape their role needs."""
    adapter = model.adapter
    root = model._module
    problems = []
    for role in adapter.roles:
        if not adapter.paths.get(role):
            problems.append(f"module role {role!r} does not resolve in {type(root).__name__} "
                            f"(tried {_tried(adapter, role)})")
    for role in REQUIRED_MODEL_ROLES:
        if role not in adapter.roles:
            problems.append(f"adapter declares no paths for the required module role {role!r}")
    if problems:
        return problems
    for role in adapter.layer_roles:
        if role in LAYER_ROLES[:3] and not adapter.layer_paths.get(role):
            problems.append(f"layer role {role!r} does not resolve in decoder layer 0 (tried {_tried(adapter, role, True)})")
    hidden, paths = adapter.hidden_size, adapter.paths
    layers = get_module(root, paths["layers"])
    if not isinstance(layers, (torch.nn.ModuleList, torch.nn.Sequential)):
        problems.append(f"module role 'layers' at {paths['layers']!r} is a {type(layers).__name__}, "
                        "not a list of decoder layers")
    elif len(layers) != adapter.num_layers:
        problems.append(f"module role 'layers' at {paths['layers']!r} holds {len(layers)} modules but the config "
                        f"says {adapter.num_layers} decoder layers")
    embed = get_module(root, paths["embed"])
    weight = getattr(embed, "weight", None)
    vocab = None
    if not isinstance(embed, torch.nn.Embedding) or weight is None or weight.shape[-1] != hidden:
        problems.append(f"module role 'embed' at {paths['embed']!r} is a {type(embed).__name__}"
                        f"{'' if weight is None else ' with weight ' + str(tuple(weight.shape))}, not a token "
                        f"embedding of width {hidden}")
    else:
        vocab = weight.shape[0]
    head = get_module(root, paths["lm_head"])
    head_weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Linear) or head_weight is None or head_weight.shape[-1] != hidden or (
            vocab is not None and head_weight.shape[0] != vocab):
        problems.append(f"module role 'lm_head' at {paths['lm_head']!r} is a {type(head).__name__}"
                        f"{'' if head_weight is None else ' with weight ' + str(tuple(head_weight.shape))}, not a "
                        f"projection from {hidden} to the vocabulary ({vocab})")
    norm = get_module(root, paths["final_norm"])
    norm_weight = getattr(norm, "weight", None)
    if isinstance(norm, (torch.nn.ModuleList, torch.nn.Linear, torch.nn.Embedding)) or (
            norm_weight is not None and tuple(norm_weight.shape) != (hidden,)):
        problems.append(f"module role 'final_norm' at {paths['final_norm']!r} is a {type(norm).__name__}, not a "
                        f"norm over {hidden} channels")
    if not problems and adapter.layer_paths.get("self_attn"):
        try:
            adapter.attention_call(model.layers[0].self_attn)
        except AdapterError as error:
            problems.append(str(error))
        except Exception as error:  # nnsight cannot read the attention module's source
            problems.append(f"cannot read the attention call in layer 0's self_attn: {error}")
    return problems


def token_problems(model: "AVModel") -> list[str]:
    """Messages for special-token ids that are missing, outside the vocabulary, shared, or differ from the tokenizer's."""
    adapter = model.adapter
    problems, ids = [], {}
    embed_path = adapter.paths.get("embed")
    vocab = None
    if embed_path:
        weight = getattr(get_module(model._module, embed_path), "weight", None)
        vocab = int(weight.shape[0]) if weight is not None else None
    for role in TOKEN_ROLES:
        try:
            ids[role] = adapter.token_id(role)
        except Exception as error:
            problems.append(f"token {role!r}: {error}")
            continue
        if vocab is not None and not 0 <= ids[role] < vocab:
            problems.append(f"token {role!r}: id {ids[role]} is outside the embedding table (size {vocab})")
    by_id: dict[int, list[str]] = {}
    for role, token in ids.items():
        by_id.setdefault(token, []).append(role)
    for token, roles in by_id.items():
        if len(roles) > 1:
            problems.append(f"tokens {roles} share the id {token}: the adapter's token_config maps them to the same id")
    tokenizer = model.tokenizer
    if tokenizer is not None:
        names = {"audio": "audio_token", "video": "video_token", "image": "image_token",
                 "audio_bos": "audio_bos_token", "audio_eos": "audio_eos_token",
                 "vision_bos": "vision_bos_token", "vision_eos": "vision_eos_token"}
        for role, attribute in names.items():
            text = getattr(tokenizer, attribute, None)
            if text is None or role not in ids:
                continue
            expected = tokenizer.convert_tokens_to_ids(text)
            if expected != ids[role]:
                sources = ", ".join(adapter.token_config.get(role, ())) or "token_id()"
                problems.append(f"token {role!r}: the adapter reads id {ids[role]} (from config {sources}) but the "
                                f"tokenizer's {attribute} {text!r} is id {expected}")
    problems += [f"config: {p}" for p in adapter.config_problems()]
    return problems


def quick_check(model: "AVModel") -> None:
    """Roles resolve with sensible shapes, layer count and token ids agree with config and tokenizer.

    Raises one `AdapterError` that lists every problem found, each naming the role, path or token.
    """
    problems = role_problems(model)
    problems += token_problems(model)
    if problems:
        listing = "\n  - ".join(problems)
        raise AdapterError(f"adapter {model.adapter.name!r} does not fit this model:\n  - {listing}")
