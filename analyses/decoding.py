"""Decoding over an `AVModel`'s thinker: greedy, VCD, FMD.

Every method here runs its own decode loop on the fast runtime (`interventions.runtime`:
a prefill that stops after the decoder stack, cached decode steps, the routed attention
function for what happens inside attention), so the methods can be timed against each
other on an equal footing. ``Decoder``, ``AttentionHook`` and ``boosted_attention`` are
re-exported here from their home in ``interventions`` for old imports.

Public here: `greedy_generate`, `vcd_generate`, `fmd_generate`, `DecodeOutput`,
`noised_features` (VCD's contrast input), `blank_modality` (FMD's branch inputs) and
`boosted_attention` (the attention ASD's guided branch computes, written out).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from nnsight_av.errors import InputError, LayerIndexError
from nnsight_av.inputs import AVInputs

from interventions.attention_edits import boosted_attention  # noqa: F401  (re-exported)
from interventions.modality import blank_inputs
from interventions.runtime.decoder import Decoder, Prefill, StopForward, data_on, sync_device  # noqa: F401
from interventions.runtime.hooks import applied
from interventions.runtime.routing import ATTENTION_IMPLEMENTATION, AttentionHook  # noqa: F401
from interventions.runtime.static_decoder import StaticDecoder, use_static

from .plots import plot_tokens
from .results import JsonResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["DecodeOutput", "greedy_generate", "vcd_generate", "fmd_generate", "noised_features", "diffusion_keep",
           "NOISE_SCHEDULES", "blank_modality",
           "boosted_attention", "ATTENTION_IMPLEMENTATION"]


# ---------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------
@dataclass
class DecodeOutput(JsonResult):
    """Generated text of one decoding method.

    ``token_ids``: the new tokens (EOS included when generation stopped on it);
    ``ms``: wall time of the whole call (prefill, sink analysis and decoding);
    ``params``: the method's settings; ``meta``: method-specific facts (e.g. FMD's merge weight).
    """

    method: str
    text: str
    token_ids: list[int]
    prompt_length: int
    ms: float
    finished: bool
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def ms_per_token(self) -> float:
        return self.ms / max(1, len(self.token_ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecodeOutput":
        data = {k: v for k, v in data.items() if k != "kind"}
        return cls(**data)

    def to_frame(self) -> "pd.DataFrame":
        """One row per generated token."""
        import pandas as pd

        return pd.DataFrame({"step": list(range(1, len(self.token_ids) + 1)), "token_id": self.token_ids})

    def plot(self, tokenizer: Any = None, ax: Any = None) -> "Figure":
        """The generated tokens in order (decoded with ``tokenizer``); see `analyses.plots.plot_tokens`."""
        return plot_tokens(self, tokenizer, ax)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.method!r}, tokens={len(self.token_ids)}, "
                f"ms/token={self.ms_per_token:.1f}, text={self.text[:60]!r})")


def check_new_tokens(max_new_tokens: int) -> None:
    """An `InputError` unless ``max_new_tokens`` is a positive int."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def _greedy_loop(decoder: Decoder, prefill: Prefill, max_new_tokens: int,
                 choose: Callable[[torch.Tensor], torch.Tensor], cache: Any, batch: int) -> tuple[list[int], bool]:
    """Generic loop: ``choose(logits [B, V]) -> token (0-d)``; the token is fed to every batch row."""
    ids: list[int] = []
    token = choose(prefill.logits)
    for step in range(max_new_tokens):
        value = int(token)
        ids.append(value)
        if value in decoder.eos or step == max_new_tokens - 1:
            return ids, value in decoder.eos
        logits = decoder.step(token.reshape(1).expand(batch), prefill, step, cache)
        token = choose(logits)
    return ids, False


def decode_loop(decoder: Decoder, prefill: Prefill, max_new_tokens: int,
                choose: Callable[[torch.Tensor], torch.Tensor], batch: int, static: bool,
                graph: bool | None = None) -> tuple[list[int], bool, str]:
    """`_greedy_loop` on the prefill's DynamicCache, or the same choice over a static cache.

    Returns the ids, whether EOS ended them, and how they were decoded: "dynamic", "static"
    (static cache, eager steps) or "graph" (static cache, CUDA graph replays).
    """
    if not static:
        return (*_greedy_loop(decoder, prefill, max_new_tokens, choose, prefill.cache, batch), "dynamic")
    loop = StaticDecoder(decoder, prefill, Decoder.kv(prefill.cache), max_new_tokens, graph)
    ids, finished = loop.generate(choose(prefill.logits), lambda logits, step: choose(logits))
    return ids, finished, "graph" if loop.used_graph else "static"


def as_inputs(model: "AVModel", inputs: Any) -> "AVInputs":
    """``inputs`` if it is `AVInputs`, else an `InputError` (decoding takes prepared inputs only)."""
    if not isinstance(inputs, AVInputs):
        raise InputError(f"inputs must be AVInputs (from model.prepare), got {type(inputs).__name__}")
    return inputs


# ---------------------------------------------------------------------------------------
# greedy
# ---------------------------------------------------------------------------------------
def greedy_generate(model: "AVModel", inputs: "AVInputs", max_new_tokens: int = 64, *,
                    interventions: Any = None, static: bool | None = None, graph: bool | None = None) -> DecodeOutput:
    """Greedy decoding with a KV cache (the baseline every other method is timed against).

    Equal to ``model.generate(ex, do_sample=False)`` token for token; it stops at EOS.
    ``interventions``: applied at the prefill and every step (`interventions.runtime.applied`),
    the same as ``interventions.generate(model, ex, iv, runtime="hooks")``. ``static``: decode over a
    static KV cache with steps that never wait for the host (`interventions.runtime.static_decoder`;
    CUDA graphs on CUDA unless ``graph=False``), the same tokens as the DynamicCache loop
    (``static=False``); None (default) uses it unless ``interventions`` are given (the same holds for
    VCD, FMD and ASD). ``meta["decode"]``: "dynamic", "static" or "graph".

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(text="Describe what you see and hear in a single sentence.")
    >>> out = greedy_generate(model, ex, max_new_tokens=4)
    >>> out.method, out.num_new_tokens <= 4
    ('greedy', True)
    """
    check_new_tokens(max_new_tokens)
    ex = as_inputs(model, inputs)
    decoder = Decoder(model)
    static = use_static(decoder, static, {"interventions": interventions is not None})
    start = time.perf_counter()
    with torch.inference_mode(), applied(model, ex, interventions):
        prefill = decoder.prefill(decoder.data(ex))
        ids, finished, how = decode_loop(decoder, prefill, max_new_tokens, lambda lg: lg[0].argmax(), 1, static, graph)
    sync_device(decoder.device)
    ms = (time.perf_counter() - start) * 1000
    return DecodeOutput("greedy", decoder.decode_text(ids), ids, len(ex), ms, finished,
                        {"max_new_tokens": max_new_tokens}, {"decode": how})


# ---------------------------------------------------------------------------------------
# VCD
# ---------------------------------------------------------------------------------------
#: Feature tensors that carry the media (processor outputs of Qwen-Omni-style models).
MEDIA_FEATURES = {"video": ("pixel_values_videos", "pixel_values"), "audio": ("input_features",)}


#: Forward-diffusion schedules for VCD's contrast input (see `diffusion_keep`).
NOISE_SCHEDULES = ("sigmoid", "linear")


def diffusion_keep(noise_step: int, schedule: str = "sigmoid", steps: int = 1000) -> float:
    """``alpha_bar`` at step ``noise_step`` (0-based) of a ``steps``-step forward diffusion.

    ``schedule="sigmoid"`` (VCD's released code): ``beta = sigmoid(linspace(-6, 6, steps)) *
    (5e-3 - 1e-5) + 1e-5``. ``schedule="linear"`` (DDPM, Ho et al. 2020): ``beta`` from 1e-4
    to 0.02. ``alpha_bar = prod(1 - beta[:noise_step + 1])``; the noised input keeps
    ``sqrt(alpha_bar)`` of the signal: at step 500 about 86% (sigmoid) or 28% (linear).

    >>> round(diffusion_keep(500) ** 0.5, 3), round(diffusion_keep(500, "linear") ** 0.5, 3)
    (0.863, 0.279)
    """
    if schedule not in NOISE_SCHEDULES:
        raise InputError(f"unknown noise schedule {schedule!r}; use one of {', '.join(NOISE_SCHEDULES)}")
    if isinstance(noise_step, bool) or not isinstance(noise_step, (int, np.integer)) or not 0 <= noise_step < steps:
        raise InputError(f"noise_step must be an integer in [0, {steps}), got {noise_step!r}")
    if schedule == "sigmoid":
        betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, steps))) * (5e-3 - 1e-5) + 1e-5
    else:
        betas = np.linspace(1e-4, 0.02, steps)
    return float(np.prod(1.0 - betas[: int(noise_step) + 1]))


def noised_features(inputs: "AVInputs | dict[str, Any]", noise_step: int = 500, seed: int = 0,
                    modalities: Sequence[str] = ("video", "audio"), schedule: str = "sigmoid") -> dict[str, Any]:
    """VCD's distorted input: the media features diffused for ``noise_step`` of 1000 steps.

    ``x' = sqrt(abar) x + sqrt(1 - abar) eps`` on the processor's video pixels and audio
    mel features (the token layout is unchanged; text is untouched), the forward step VCD
    applies to images. ``schedule``: ``"sigmoid"`` (default, the betas of VCD's released
    code: about 86% of the signal kept at step 500) or ``"linear"`` (DDPM's linear betas:
    about 28% kept at step 500, a much noisier contrast); see `diffusion_keep`. Seeded, so
    the same call gives the same contrast input.

    >>> data = {"input_ids": torch.ones(1, 3, dtype=torch.long), "input_features": torch.zeros(1, 2, 4)}
    >>> noisy = noised_features(data, noise_step=999, schedule="linear")
    >>> bool(noisy["input_features"].std() > 0.9), bool((noisy["input_ids"] == 1).all())
    (True, True)
    """
    keep = diffusion_keep(noise_step, schedule)
    data = dict(inputs.data if hasattr(inputs, "data") else inputs)
    generator = torch.Generator().manual_seed(seed)
    touched = 0
    for modality in modalities:
        if modality not in MEDIA_FEATURES:
            raise InputError(f"unknown modality {modality!r}; use 'video' and/or 'audio'")
        for name in MEDIA_FEATURES[modality]:
            value = data.get(name)
            if torch.is_tensor(value) and value.is_floating_point():
                eps = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(value.device, value.dtype)
                data[name] = value * math.sqrt(keep) + eps * math.sqrt(1.0 - keep)
                touched += 1
    if touched == 0:
        raise InputError(f"these inputs carry no {'/'.join(modalities)} features to noise")
    return data


def vcd_generate(model: "AVModel", inputs: "AVInputs", max_new_tokens: int = 64, alpha: float = 1.0,
                 beta: float = 0.1, noise_step: int = 500, seed: int = 0,
                 modalities: Sequence[str] = ("video", "audio"), schedule: str = "sigmoid", *,
                 interventions: Any = None, static: bool | None = None, graph: bool | None = None) -> DecodeOutput:
    """Visual contrastive decoding extended to audio and video (Leng et al., 2024).

    The clean prompt and a copy whose video and audio features are noised (`noised_features`)
    run as one batch of two sharing the decoded tokens. Per step, with ``l`` the logits:
    ``(1 + alpha) * l(x) - alpha * l(x_noised)``, restricted to the plausible tokens
    ``p(x) >= beta * max p(x)``; the argmax is taken (greedy). ``noise_step`` and
    ``schedule`` set how noisy the contrast copy is (default: step 500 of VCD's sigmoid
    schedule, as in VCD's released code; ``schedule="linear"`` is DDPM's, much noisier).

    ``interventions``: applied to every forward of both rows, prompt and steps (the hook runtime).
    ``static``/``graph``: as for `greedy_generate`.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="Describe what you see and hear in a single sentence.")
    >>> vcd_generate(model, ex, max_new_tokens=3).method
    'vcd'
    """
    check_new_tokens(max_new_tokens)
    if not (math.isfinite(alpha) and alpha >= 0) or not 0 <= beta <= 1:
        raise InputError(f"VCD needs alpha >= 0 and beta in [0, 1]; got alpha={alpha}, beta={beta}")
    diffusion_keep(noise_step, schedule)  # checks both before the model runs
    ex = as_inputs(model, inputs)
    decoder = Decoder(model)
    static = use_static(decoder, static, {"interventions": interventions is not None})
    start = time.perf_counter()
    log_beta = math.log(beta) if beta > 0 else -math.inf

    def choose(logits: torch.Tensor) -> torch.Tensor:
        clean, noised = logits[0], logits[1]
        contrast = (1 + alpha) * clean - alpha * noised
        plausible = clean >= clean.max() + log_beta
        return contrast.masked_fill(~plausible, float("-inf")).argmax()

    with torch.inference_mode(), applied(model, ex, interventions):     # both rows: the clean and noised runs
        noisy = noised_features(dict(ex.data), noise_step, seed, modalities, schedule)
        # the noised copy keeps the clean input's token layout, so its media plan and positions too
        prefill = decoder.prefill(decoder.data([ex, replace(ex, data=noisy)]))
        ids, finished, how = decode_loop(decoder, prefill, max_new_tokens, choose, 2, static, graph)
    sync_device(decoder.device)
    ms = (time.perf_counter() - start) * 1000
    return DecodeOutput("vcd", decoder.decode_text(ids), ids, len(ex), ms, finished,
                        {"max_new_tokens": max_new_tokens, "alpha": alpha, "beta": beta, "noise_step": noise_step,
                         "schedule": schedule, "seed": seed, "modalities": list(modalities)}, {"decode": how})


# ---------------------------------------------------------------------------------------
# FMD
# ---------------------------------------------------------------------------------------
def blank_modality(model: "AVModel", inputs: "AVInputs", modality: str) -> "AVInputs":
    """The same clip with ``modality`` blanked at the raw input: black frames or digital silence.

    Frame count and size, and audio length, are kept, so the token layout is identical
    (checked: a `SpanError` if the processor gives other tokens). The transform is
    `interventions.modality.blank_inputs`, the one `analyses.ablate` uses.
    """
    ex = as_inputs(model, inputs)
    if modality not in ("video", "audio"):
        raise InputError(f"modality must be 'video' or 'audio', got {modality!r}")
    return blank_inputs(model, ex, modality)


class _ForkHook(AttentionHook):
    """Measures, in the fork layers of the prefill, the attention the prompt's question rows pay to
    audio tokens (row 0, the audio-only branch) and to video tokens (row 1, the video-only branch)."""

    def __init__(self, attention_modules: Sequence[torch.nn.Module], fork: int, rows: torch.Tensor,
                 audio: torch.Tensor, video: torch.Tensor) -> None:
        super().__init__(attention_modules)
        self.fork, self.rows, self.audio, self.video = fork, rows, audio, video
        self.active = True
        self.mass: list[torch.Tensor] = []

    def attend(self, layer, module, query, key, value, mask, scale):
        if not self.active or layer >= self.fork or self.rows.numel() == 0:
            return None
        rows = self.rows.to(query.device)
        b, h, _, d = query.shape
        kv = key.shape[1]
        q = query[:, :, rows].float().reshape(b, kv, (h // kv) * rows.numel(), d)
        logits = torch.matmul(q, key.float().transpose(-1, -2)).view(b, h, rows.numel(), -1) * scale
        hidden = torch.arange(key.shape[2], device=query.device)[None, :] > rows[:, None]
        probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), -1)
        audio_mass = probs[0][..., self.audio.to(query.device)].sum(-1).mean()
        video_mass = probs[1][..., self.video.to(query.device)].sum(-1).mean()
        self.mass.append(torch.stack([audio_mass, video_mass]))
        return None


def fmd_generate(model: "AVModel", inputs: "AVInputs", max_new_tokens: int = 64, fork_layer: int | None = None,
                 merge: str | float = "attention", eps: float = 1e-8, *, interventions: Any = None,
                 static: bool | None = None, graph: bool | None = None) -> DecodeOutput:
    """Fork-merge decoding (Jung et al., 2025), as we read it.

    Fork: decoder layers ``0 .. fork_layer - 1`` run on two versions of the prompt, an
    audio-only one (video blanked to black frames) and a video-only one (audio blanked to
    silence), same layout (`blank_modality`). Merge: at the input of layer ``fork_layer`` the
    two hidden states are combined at every position, ``h = w h_audio_only + (1 - w) h_video_only``,
    and the remaining layers run on the merged states (both batch rows then carry the same
    values, so one batch of two serves both phases and shares one KV cache layout).
    ``merge="attention"`` (default): ``w = A / (A + V)``, where ``A`` is the attention mass the
    question rows (text after the last media token) pay to the audio tokens in the audio-only
    branch and ``V`` the mass they pay to the video tokens in the video-only branch, averaged
    over heads, those rows and the fork layers, measured once on the prompt; ``"mean"``:
    ``w = 0.5``; a float: that ``w``. Generated tokens go through the same fork and merge
    with the prompt's ``w``. ``fork_layer`` defaults to a quarter of the depth. Building the two
    blanked inputs runs the processor; its time is in ``meta["prepare_ms"]``, not in ``ms``.

    ``interventions``: applied to every forward of both rows, prompt and steps (the hook runtime).
    ``static``/``graph``: as for `greedy_generate`.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(video=nav.testing.synthetic_frames(2.0, 2, 56), audio=nav.testing.synthetic_tone(2.0),
    ...                    text="Describe what you see and hear in a single sentence.")
    >>> out = fmd_generate(model, ex, max_new_tokens=3)
    >>> out.method, 0.0 <= out.meta["merge_weight_audio"] <= 1.0
    ('fmd', True)
    """
    check_new_tokens(max_new_tokens)
    ex = as_inputs(model, inputs)
    decoder = Decoder(model)
    static = use_static(decoder, static, {"interventions": interventions is not None})
    layers = decoder.num_layers
    fork = max(1, layers // 4) if fork_layer is None else fork_layer
    if not isinstance(fork, int) or not 1 <= fork <= layers - 1:
        raise LayerIndexError(f"fork_layer must be in [1, {layers - 1}] for this {layers}-layer model, got {fork}")
    if not (merge in ("attention", "mean") or isinstance(merge, (int, float)) and not isinstance(merge, bool)):
        raise InputError(f"merge must be 'attention', 'mean' or a weight in [0, 1], got {merge!r}")
    if isinstance(merge, (int, float)) and not 0 <= float(merge) <= 1:
        raise InputError(f"a fixed merge weight must lie in [0, 1], got {merge}")
    spans = ex.spans
    if spans.audio.numel() == 0 or spans.video.numel() == 0:
        raise InputError("fork-merge decoding needs both audio and video tokens in the input")
    last_media = int(spans.media.max())
    rows = torch.arange(last_media + 1, len(ex))
    hook = _ForkHook(decoder.attention, fork, rows, spans.audio, spans.video)
    weight: dict[str, torch.Tensor] = {}

    def merge_states(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "w" not in weight:
            if merge == "attention" and hook.mass:
                mass = torch.stack(hook.mass).mean(0)
                weight["w"] = mass[0] / (mass[0] + mass[1] + eps)
            else:
                weight["w"] = torch.tensor(0.5 if merge in ("attention", "mean") else float(merge),
                                           device=decoder.device)
            hook.active = False
        hidden = args[0] if args else kwargs["hidden_states"]
        w = weight["w"].to(hidden.dtype)
        merged = (w * hidden[0] + (1 - w) * hidden[1])[None].expand_as(hidden).contiguous()
        if args:
            return (merged, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": merged}

    # Building the branch inputs runs the processor (CPU work that belongs to input preparation, like
    # `model.prepare` for the other methods), so it is timed apart: meta["prepare_ms"].
    prepare_start = time.perf_counter()
    audio_only = blank_modality(model, ex, "video")
    video_only = blank_modality(model, ex, "audio")
    prepare_ms = (time.perf_counter() - prepare_start) * 1000
    start = time.perf_counter()
    with torch.inference_mode(), applied(model, ex, interventions):     # both branches (one layout)
        handle = decoder.layers[fork].register_forward_pre_hook(merge_states, with_kwargs=True)
        try:
            with decoder.hooked(hook):
                prefill = decoder.prefill(decoder.data([audio_only, video_only]))
                ids, finished, how = decode_loop(decoder, prefill, max_new_tokens, lambda lg: lg[0].argmax(), 2,
                                                 static, graph)
        finally:
            handle.remove()
    sync_device(decoder.device)
    ms = (time.perf_counter() - start) * 1000
    w = float(weight["w"]) if "w" in weight else float("nan")
    return DecodeOutput("fmd", decoder.decode_text(ids), ids, len(ex), ms, finished,
                        {"max_new_tokens": max_new_tokens, "fork_layer": fork,
                         "merge": merge if isinstance(merge, str) else float(merge)},
                        {"merge_weight_audio": w, "prepare_ms": prepare_ms, "decode": how})
