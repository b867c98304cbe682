"""The fast runtime: interventions and analyses on plain PyTorch hooks, without an nnsight trace.

nnsight pays a host-side cost per module it serves; a decode loop or a sweep of hundreds of
patched forwards pays it thousands of times. This runtime runs the same `Intervention`
objects on the plain modules (``model.raw(...)``) instead:

- `routing`: the routed attention function (one function registered with transformers'
  ``AttentionInterface``) and `AttentionHook`, for everything inside attention;
- `decoder`: `Decoder`, the prefill that stops after the decoder stack and cached decode
  steps (KV-cache handling, rope positions);
- `static_decoder`: `StaticDecoder`, decode steps over a preallocated KV cache that never wait
  for the host, captured as a CUDA graph on CUDA (the default decode path of the analyses);
- `hooks`: `applied`, which compiles interventions to the same ops the nnsight engine runs
  and executes them from forward hooks and the routed attention function; `observed` and
  `gradients_from` for reading sites (and taking gradients) without editing them;
- `prefill`: `run_prefill`, one prefill that hands the residual stream and each layer's
  post-rotary q/k with the attention normalisers to callbacks (what sink and MDS analyses read);
- `kv_cache`: the KV caches of partial forwards: record one run of the decoder layers and
  resume it from any layer and position (the exact sweep of causal tracing).

``interventions.run(..., runtime="hooks")`` / ``interventions.generate(..., runtime="hooks")``
use it; tests check both runtimes give the same outputs for every primitive.
"""

from .decoder import Decoder, Prefill, StopForward, data_on, sync_device
from .hooks import HookExecutor, applied, gradients_from, observed
from .kv_cache import KVRecorder, LayerRecord, PrefixKV, ScatterKV, recording, resume
from .prefill import read_attention, run_prefill
from .routing import ATTENTION_IMPLEMENTATION, AttentionHook, active_hooks, route_attention
from .static_decoder import StaticDecoder, StaticKV

__all__ = ["Decoder", "Prefill", "StopForward", "data_on", "sync_device", "ATTENTION_IMPLEMENTATION",
           "AttentionHook", "active_hooks", "route_attention", "applied", "HookExecutor", "observed", "gradients_from",
           "KVRecorder", "LayerRecord", "PrefixKV", "ScatterKV", "recording", "resume", "run_prefill", "read_attention",
           "StaticDecoder", "StaticKV"]
