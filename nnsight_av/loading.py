"""`nav.load`: a checkpoint (hub id or local folder) to an `AVModel`, thinker only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapters.base import Adapter, get_adapter
from .errors import UnknownModelError
from .model import AVModel

__all__ = ["load"]


def _model_type(path: str) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
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
    built on the pretrained SmolLM2-135M (its GGUF is fetched once, see docs/smol-omni.md).
    ``validate`` runs the cheap load-time adapter checks. ``processor_kwargs`` are passed to
    every processor call (e.g. ``{"videos_kwargs": {"size": ...}}``); ``default_system`` replaces
    the checkpoint's system prompt.
    """
    if id_or_path == "toy-omni":
        from .toy import load_toy

        return load_toy(**hf_kwargs)
    if id_or_path == "smol-omni":
        from .smol.model import load_smol

        return load_smol(validate=validate, **hf_kwargs)
    if adapter is None:
        adapter_cls = get_adapter(_model_type(id_or_path))
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
