"""Offline tiny models, synthetic media and adapter checks for tests, docs and demos."""

from .check import AdapterReport, CheckResult, check_adapter, status_table
from .syncs import SyncEvent, SyncLog, cuda_sync_calls, watch_syncs
from .media import synthetic_frames, synthetic_tone, write_mp4, write_png, write_wav
from .tiny import tiny_model, tiny_processor, tiny_qwen3_omni_processor, tiny_tokenizer

__all__ = ["tiny_model", "tiny_processor", "tiny_qwen3_omni_processor", "tiny_tokenizer", "write_mp4", "write_wav",
           "write_png", "synthetic_frames", "synthetic_tone", "check_adapter", "AdapterReport", "CheckResult",
           "status_table", "watch_syncs", "cuda_sync_calls", "SyncLog", "SyncEvent"]
