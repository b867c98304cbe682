"""`nav.load`: a checkpoint (hub id or local folder) to an `AVModel`, thinker only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .adapters.base import Adapter, get_adapter, registered_adapters
from .errors import UnknownModelError
from .model import AVModel

__all__ = ["load", "KNOWN_MODELS", "DEFAULT_MODEL", "check_model_name"]

#: The model names nnsight-av knows without a path or hub id (the one list the CLI and `load` use).
KNOWN_MODELS: dict[str, str] = {
    "toy-omni": "the small trained toy model shipped with the package (offline)",
    "smol-omni": "SmolLM2-135M as a Qwen2.5-Omni thinker's language model (weights: nnsight-av fetch smol-omni)",
    "tiny": "random weights, for testing the plumbing only (its answers mean nothing)",
}
#: The model a command uses when none is named: the best one shipped with the package.
DEFAULT_MODEL = "toy-omni"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_model_name(name: str) -> str:
    """``name`` if it can name a model: a known name, an existing local path, or a hub id ``"org/name"``.

    Anything else is refused at once (no hub access) with the known names and a close match.

    >>> check_model_name("toy-omni"), check_model_name("Qwen/Qwen2.5-Omni-7B")
    ('toy-omni', 'Qwen/Qwen2.5-Omni-7B')
    >>> check_model_name("toy-omin")
    Traceback (most recent call last):
    ...
    nnsight_av.errors.UnknownModelError: unknown model 'toy-omin' (did you mean 'toy-omni'?): not a known name \
(toy-omni, smol-omni, tiny), an existing folder, or a hub id 'org/name'
    """
    import difflib

    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"a model name must be a non-empty string, got {name!r}")
    if name in KNOWN_MODELS or name == "default" or Path(name).exists():
        return name
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    close = difflib.get_close_matches(name, list(KNOWN_MODELS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownModelError(f"unknown model {name!r}{hint}: not a known name ({', '.join(KNOWN_MODELS)}), an "
                            "existing folder, or a hub id 'org/name'")


def _model_type(path: str, trust_remote_code: bool = False) -> str:
    from transformers import AutoConfig

    raw = Path(path) / "config.json"
    if raw.is_file() and not trust_remote_code:
        import json

        try:
            data = json.loads(raw.read_text())
        except ValueError as error:
            raise UnknownModelError(f"{raw} is not JSON: {error}") from None
        if isinstance(data, dict) and data.get("auto_map") and data.get("model_type") not in _known_types():
            raise UnknownModelError(
                f"{path!r} needs its own Python code (config.json has 'auto_map') and no nnsight-av adapter knows "
                f"its model_type {data.get('model_type')!r}; nnsight-av does not run a checkpoint's code unless you "
                "pass trust_remote_code=True (and an adapter for it)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        # Models built outside transformers keep a config.json whose model_type transformers does not know.
        raw = Path(path) / "config.json"
        if raw.is_file():
            import json

            model_type = json.loads(raw.read_text()).get("model_type")
            if model_type:
                return str(model_type)
        hint = "" if Path(path).exists() else " (not a local folder, and the hub could not provide it)"
        raise UnknownModelError(f"cannot read a model config from {path!r}{hint}: {error}") from None
    return config.model_type


def _known_types() -> set[str]:
    """Every name and model type an adapter is registered under."""
    return {key for name, adapter in registered_adapters().items() for key in (name, *adapter.model_types)}


def load(
    id_or_path: str,
    adapter: str | type[Adapter] | None = None,
    processor: Any = None,
    validate: bool = True,
    processor_kwargs: dict[str, Any] | None = None,
    default_system: str | None | object = "adapter",
    **hf_kwargs: Any,
) -> AVModel:
    """Load an audio-visual LLM's thinker (never the speech talker) as an `AVModel`.

    ``adapter`` is picked from the config's ``model_type`` unless named. ``hf_kwargs``
    (``dtype``, ``device_map``, ``attn_implementation``, ...) go to ``from_pretrained``.
    ``"toy-omni"`` names the small trained model shipped with the package; ``"smol-omni"`` the one
    built on the pretrained SmolLM2-135M (its GGUF is fetched once, see docs/smol-omni.md);
    ``"tiny"`` a random-weights test model (`KNOWN_MODELS`). Any other name must be an existing
    folder or a hub id ``"org/name"`` (`check_model_name`: a typo is refused before any hub
    access). A checkpoint's own Python code is never run, and transformers never asks about it,
    unless ``trust_remote_code=True`` is passed. ``validate`` runs the cheap load-time adapter
    checks. ``processor_kwargs`` are passed to
    every processor call (e.g. ``{"videos_kwargs": {"size": ...}}``); ``default_system`` replaces
    the checkpoint's system prompt.
    """
    check_model_name(id_or_path)
    if id_or_path == "toy-omni":
        from .toy import load_toy

        return load_toy(**hf_kwargs)
    if id_or_path == "smol-omni":
        from .smol.model import load_smol

        return load_smol(validate=validate, **hf_kwargs)
    if id_or_path == "tiny":
        import warnings

        from .testing import tiny_model

        warnings.warn("model 'tiny' has random weights: its outputs test the plumbing, they mean nothing",
                      stacklevel=2)
        return tiny_model()
    if id_or_path in KNOWN_MODELS:
        raise UnknownModelError(f"{id_or_path!r} is a known model name, but this install has no loader for it")
    trust = bool(hf_kwargs.pop("trust_remote_code", False))
    if trust:
        hf_kwargs["trust_remote_code"] = True        # only passed on when asked: adapters' loaders need not know it
    if adapter is None:
        adapter_cls = get_adapter(_model_type(id_or_path, trust))
    elif isinstance(adapter, str):
        adapter_cls = get_adapter(adapter)
    else:
        adapter_cls = adapter
    module = adapter_cls.load_module(id_or_path, **hf_kwargs).eval()
    if processor is None:
        processor = adapter_cls.load_processor(id_or_path)
    model = AVModel(module, adapter=adapter_cls, processor=processor, checkpoint=id_or_path,
                    processor_kwargs=processor_kwargs, default_system=default_system)
    if validate:
        from .validation import quick_check

        quick_check(model)
    return model
