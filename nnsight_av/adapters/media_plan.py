"""Media index tensors computed once per prepared input, so a Qwen2.5-Omni forward never waits for the GPU.

transformers' thinker derives, on every forward, the layout of its encoders' inputs from the
data: the audio frames a feature mask selects, 100-frame chunks, packed-sequence lengths
(``cu_seqlens``), pooling indices, the vision encoder's window order and rotary positions, and
it checks placeholder counts. Each of these reads device tensors on the host (``.tolist()``,
``.item()``, ``nonzero``, boolean masks), and every read makes the host wait until the GPU
has drained: a forward then costs host time + GPU time instead of about the larger of the two.

All of it depends only on the processor's shapes (feature-mask lengths, ``*_grid_thw``), which
never change for a prepared input. `plan_media` computes it once on the host, with
transformers' own helper functions (so the tensors are equal to what the forward would
compute); it rides along as ``AVInputs.plan``, `AVInputs.to(device)` moves its index
tensors with the input, and a trace passes it to the forward under `PLAN_KEY`; and
`install_plan_paths` gives the thinker instance ``get_audio_features`` /
``get_image_features`` / ``get_video_features`` / ``get_placeholder_mask`` that use a plan
passed in the forward's keyword arguments (under `PLAN_KEY`) and fall back to transformers'
own methods without one. The encoders are still called as modules, so nnsight envoys
(``model.audio_encoder``, ``model.vision_encoder``) see them as before. The packed-sequence
boundaries stay on the host for SDPA/eager attention, which splits by them in Python
(``cu_seqlens.tolist()`` per encoder layer); flash attention gets them on the device.

Check a forward with `nnsight_av.testing.watch_syncs`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch

from .base import PLAN_KEY

__all__ = ["PLAN_KEY", "HOST_WORK", "AudioPlan", "VisionPlan", "MediaPlan", "plan_media", "collate_plans", "install_plan_paths"]

_MODALITIES = ("image", "video", "audio")


def _helpers() -> Any:
    """transformers' Qwen2.5-Omni modeling module, or None when it predates precomputed encoder inputs."""
    try:
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as modeling
        from transformers import vision_utils  # noqa: F401
    except ImportError:
        return None
    needed = ("chunk_and_pad_features", "get_valid_indices", "get_pool_indices", "get_audio_cu_seqlens")
    return modeling if all(hasattr(modeling, name) for name in needed) else None


def _move(value: Any, device: torch.device | str, non_blocking: bool) -> Any:
    return value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value


@dataclass(frozen=True)
class AudioPlan:
    """The audio encoder's inputs for one forward, derived from the feature masks.

    ``masks``: the host feature-mask rows (bool ``[streams, frames]``), kept to re-plan a
    batch. ``frames``: rows of the ``[streams * frames, mel]`` view of ``input_features`` that
    the mask selects (transformers' boolean indexing, as an index). ``chunk_rows``: for the
    padded ``[chunks, mel, longest]`` layout, which concatenated frame fills each slot (the
    extra row past the last frame is the zero padding). ``cu_seqlens`` (host, int32) and
    ``max_seqlen`` describe the packed chunks; ``tokens`` is how many audio tokens come out.
    """

    masks: torch.Tensor
    frames: torch.Tensor
    chunk_rows: torch.Tensor
    chunk_lengths: torch.Tensor
    feature_lens: torch.Tensor
    after_cnn_lens: torch.Tensor
    valid_indices: torch.Tensor
    pool_indices: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_device: torch.Tensor
    max_seqlen: int
    tokens: int
    #: Fields that live with the features on the device (the rest stay on the host).
    device_fields = ("frames", "chunk_rows", "chunk_lengths", "valid_indices", "pool_indices", "cu_seqlens_device")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "AudioPlan":
        return replace(self, **{k: _move(getattr(self, k), device, non_blocking) for k in self.device_fields})


@dataclass(frozen=True)
class VisionPlan:
    """The vision encoder's precomputed inputs for the images (or videos) of one forward.

    ``grid``: the host ``[n, 3]`` grid (t, h, w), kept to re-plan a batch. ``split_sizes``:
    merged tokens per image/video; ``tokens`` their sum.
    """

    grid: torch.Tensor
    position_ids: torch.Tensor
    window_index: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_window_seqlens: torch.Tensor
    cu_seqlens_device: torch.Tensor
    cu_window_seqlens_device: torch.Tensor
    max_seqlen: int
    max_window_seqlen: int
    split_sizes: tuple[int, ...]
    tokens: int
    patches: int
    device_fields = ("position_ids", "window_index", "cu_seqlens_device", "cu_window_seqlens_device")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "VisionPlan":
        return replace(self, **{k: _move(getattr(self, k), device, non_blocking) for k in self.device_fields})

    def encoder_kwargs(self, flash: bool) -> dict[str, Any]:
        """What the vision encoder's forward takes instead of computing it from ``grid_thw``."""
        kwargs: dict[str, Any] = {"position_ids": self.position_ids, "window_index": self.window_index}
        if flash:
            kwargs.update(cu_seqlens=self.cu_seqlens_device, cu_window_seqlens=self.cu_window_seqlens_device,
                          max_seqlen=self.max_seqlen, max_window_seqlen=self.max_window_seqlen)
        else:
            # SDPA/eager split q/k/v by these lengths in Python: on the host, that costs no wait.
            kwargs.update(cu_seqlens=self.cu_seqlens, cu_window_seqlens=self.cu_window_seqlens)
        return kwargs


@dataclass(frozen=True)
class MediaPlan:
    """Everything a prepared input's forward would otherwise derive from device data.

    ``tokens``: the prompt length it was made for; ``full_mask``: the attention mask is all
    ones (then the forward can leave it out and SDPA runs causal without checking it). It is
    made from the feature masks and grids: after editing those (not the features or pixels,
    which it does not read), prepare again or drop it (``dataclasses.replace(ex, plan=None)``).
    """

    tokens: int
    full_mask: bool
    audio: AudioPlan | None = None
    image: VisionPlan | None = None
    video: VisionPlan | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MediaPlan":
        """A copy with the index tensors on ``device`` (host-side lengths stay on the host)."""
        return replace(self, **{k: getattr(self, k).to(device, non_blocking)
                                for k in ("audio", "image", "video") if getattr(self, k) is not None})

    def fits(self, kwargs: Mapping[str, Any]) -> bool:
        """Whether forward arguments ``kwargs`` have the shapes this plan was made for (host metadata only)."""
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[-1] != self.tokens:
            return False
        features = kwargs.get("input_features")
        if (features is None) != (self.audio is None) or (
                features is not None and tuple(features.shape[::2]) != tuple(self.audio.masks.shape)):
            return False
        for part, key in ((self.image, "pixel_values"), (self.video, "pixel_values_videos")):
            pixels = kwargs.get(key)
            if (pixels is None) != (part is None) or (pixels is not None and pixels.shape[0] != part.patches):
                return False
        return True

    def host_tensors(self) -> list[torch.Tensor]:
        """The tensors that stay on the host by design (packed-sequence lengths the encoders read in Python)."""
        parts = [p for p in (self.audio, self.image, self.video) if p is not None]
        return [t for p in parts for name, t in vars(p).items()
                if torch.is_tensor(t) and name not in p.device_fields]

    @property
    def device(self) -> torch.device | None:
        for part in (self.audio, self.image, self.video):
            if part is not None:
                return getattr(part, part.device_fields[0]).device
        return None


def _host(value: Any) -> torch.Tensor | None:
    """``value`` as a host tensor, or None when it is missing or lives on a device (reading it would wait)."""
    if value is None:
        return None
    value = torch.as_tensor(value)
    return value if value.device.type == "cpu" else None


def plan_audio(masks: torch.Tensor, n_window: int) -> AudioPlan:
    """The `AudioPlan` for host feature masks ``[streams, frames]`` (transformers' chunking, exactly)."""
    modeling = _helpers()
    masks = masks.bool()
    frames = masks.reshape(-1).nonzero().squeeze(-1)
    feature_lens = masks.sum(-1)
    total = int(frames.numel())
    # Chunk frame numbers (1-based; 0 is padding) with the model's own function: same chunks, same padding.
    numbers = torch.arange(1, total + 1, dtype=torch.float64).unsqueeze(0)
    padded, chunk_lengths = modeling.chunk_and_pad_features(numbers, feature_lens, n_window)
    chunk_rows = padded[:, 0, :].long() - 1
    chunk_rows[chunk_rows < 0] = total
    cu_seqlens = modeling.get_audio_cu_seqlens(chunk_lengths)
    after_cnn = (feature_lens - 1) // 2 + 1
    tokens = int(((after_cnn - 2) // 2 + 1).sum())
    return AudioPlan(masks=masks, frames=frames, chunk_rows=chunk_rows, chunk_lengths=chunk_lengths,
                     feature_lens=feature_lens, after_cnn_lens=after_cnn,
                     valid_indices=modeling.get_valid_indices(chunk_lengths),
                     pool_indices=modeling.get_pool_indices(feature_lens), cu_seqlens=cu_seqlens,
                     cu_seqlens_device=cu_seqlens.clone(), max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
                     tokens=tokens)


def plan_vision(grid: torch.Tensor, vision_config: Any) -> VisionPlan:
    """The `VisionPlan` for a host ``[n, 3]`` grid (transformers' own vision helpers, on the host)."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    grid = grid.long()
    merge = int(vision_config.spatial_merge_size)
    cu_seqlens = get_vision_cu_seqlens(grid)
    window_index, cu_window = get_vision_window_index(grid, spatial_merge_size=merge,
                                                      window_size=vision_config.window_size,
                                                      patch_size=vision_config.patch_size)

    def longest(cu: torch.Tensor) -> int:
        return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0

    sizes = tuple(int(s) for s in (grid.prod(-1) // merge ** 2).tolist())
    return VisionPlan(grid=grid, position_ids=get_vision_position_ids(grid, merge), window_index=window_index,
                      cu_seqlens=cu_seqlens, cu_window_seqlens=cu_window, cu_seqlens_device=cu_seqlens.clone(),
                      cu_window_seqlens_device=cu_window.clone(), max_seqlen=longest(cu_seqlens),
                      max_window_seqlen=longest(cu_window), split_sizes=sizes, tokens=sum(sizes),
                      patches=int(grid.prod(-1).sum()))


def plan_media(config: Any, data: Mapping[str, Any], token_ids: Mapping[str, int]) -> MediaPlan | None:
    """The `MediaPlan` of processor outputs ``data`` (host tensors), or None where one cannot be made.

    ``config``: the thinker config; ``token_ids``: modality -> placeholder token id. None when
    transformers is too old to take precomputed encoder inputs, the tensors are not on the
    host, or the placeholder counts do not match the media (the forward then raises its own error).
    """
    if _helpers() is None:
        return None
    ids, mask = _host(data.get("input_ids")), _host(data.get("attention_mask"))
    if ids is None or ids.dim() != 2:
        return None
    parts: dict[str, Any] = {}
    if data.get("input_features") is not None:
        masks = _host(data.get("feature_attention_mask"))
        if masks is None:
            return None
        parts["audio"] = plan_audio(masks, int(config.audio_config.n_window))
    for modality, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        if data.get(key) is not None:
            grid = _host(data[key])
            if grid is None:
                return None
            parts[modality] = plan_vision(grid, config.vision_config)
    for modality, part in parts.items():
        if int((ids == token_ids[modality]).sum()) != part.tokens:
            return None
    full = mask is None or bool(mask.all())
    return MediaPlan(tokens=int(ids.shape[-1]), full_mask=full, **parts)


def collate_plans(plans: Sequence[MediaPlan | None], config: Any, tokens: int, padded: bool) -> MediaPlan | None:
    """One plan for a batch whose items had ``plans`` (media concatenated in item order, masks padded right).

    ``tokens``: the batch's padded length; ``padded``: some row has padding. None if any item has no plan.
    """
    if not plans or any(p is None for p in plans):
        return None
    device = next((p.device for p in plans if p.device is not None), None)
    parts: dict[str, Any] = {}
    audio = [p.audio.masks for p in plans if p.audio is not None]
    if audio:
        width = max(m.shape[-1] for m in audio)
        rows = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[-1])) for m in audio])
        parts["audio"] = plan_audio(rows, int(config.audio_config.n_window))
    for modality in ("image", "video"):
        grids = [getattr(p, modality).grid for p in plans if getattr(p, modality) is not None]
        if grids:
            parts[modality] = plan_vision(torch.cat(grids), config.vision_config)
    plan = MediaPlan(tokens=tokens, full_mask=not padded and all(p.full_mask for p in plans), **parts)
    # Moved without waiting: the copies queue behind the work already on the device.
    return plan.to(device, non_blocking=True) if device is not None and device.type != "cpu" else plan


#: The functions that build plans: host code on host tensors (`nnsight_av.testing.watch_syncs` ``host_code``).
HOST_WORK = (plan_audio, plan_vision)


def _modality_kwargs(kwargs: Mapping[str, Any], modality: str) -> dict[str, Any]:
    """``kwargs`` as transformers' ``accepts_precomputed_kwargs`` hands them to one modality's encoder."""
    others = tuple(f"{m}_" for m in _MODALITIES if m != modality)
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == PLAN_KEY or key.startswith(others):
            continue
        out[key.removeprefix(f"{modality}_") if key.startswith(f"{modality}_") else key] = value
    return out


def _flash(config: Any) -> bool:
    return "flash" in str(getattr(config, "_attn_implementation", None) or "")


def install_plan_paths(thinker: torch.nn.Module) -> bool:
    """Give ``thinker`` (a Qwen2.5-Omni thinker instance) encoder paths that use a `MediaPlan`.

    Idempotent; returns False (and changes nothing) when transformers cannot take precomputed
    encoder inputs or ``thinker`` is not a Qwen2.5-Omni thinker. Without a plan in the keyword arguments every method is transformers' own.
    """
    modeling = _helpers()
    if modeling is None or not isinstance(thinker, modeling.Qwen2_5OmniThinkerForConditionalGeneration):
        return False
    if thinker.__dict__.get("_media_plan_paths"):
        return True
    cls = type(thinker)
    own_audio = cls.get_audio_features.__get__(thinker)
    own_image = cls.get_image_features.__get__(thinker)
    own_video = cls.get_video_features.__get__(thinker)
    own_mask = cls.get_placeholder_mask.__get__(thinker)
    # Counts a plan checked on the host at preparation: the forward's own check (a host read) is skipped once.
    checked: set[str] = set()

    def get_audio_features(input_features, feature_attention_mask=None, audio_feature_lengths=None, **kwargs):
        plan = kwargs.pop(PLAN_KEY, None)
        audio = plan.audio if plan is not None else None
        if audio is None:
            return own_audio(input_features, feature_attention_mask, audio_feature_lengths, **kwargs)
        return_dict = kwargs.pop("return_dict", True)
        streams, mel, width = input_features.shape
        rows = input_features.permute(0, 2, 1).reshape(streams * width, mel)
        frames = rows.index_select(0, audio.frames)                 # [total frames, mel]
        padded = torch.cat([frames, frames.new_zeros(1, mel)]).index_select(0, audio.chunk_rows.reshape(-1))
        padded = padded.view(*audio.chunk_rows.shape, mel).transpose(1, 2)
        flash = _flash(thinker.audio_tower.config)
        outputs = thinker.audio_tower(
            frames.T, feature_lens=audio.feature_lens, aftercnn_lens=audio.after_cnn_lens, padded_feature=padded,
            chunk_lengths=audio.chunk_lengths, valid_indices=audio.valid_indices, pool_indices=audio.pool_indices,
            cu_seqlens=audio.cu_seqlens_device if flash else audio.cu_seqlens,
            **({"max_seqlen": audio.max_seqlen} if flash else {}), **kwargs)
        if outputs.last_hidden_state.shape[0] != audio.tokens:
            raise ValueError("length of audio_features should match audio_output_lengths")
        return outputs if return_dict else outputs.to_tuple()

    def vision_path(modality: str, own: Any):
        def get_features(pixel_values, grid_thw=None, **kwargs):
            plan = kwargs.get(PLAN_KEY)
            part = getattr(plan, modality, None) if plan is not None else None
            if part is None:
                checked.discard(modality)
                return own(pixel_values, grid_thw, **{k: v for k, v in kwargs.items() if k != PLAN_KEY})
            return_dict = kwargs.pop("return_dict", True)
            visual = thinker.visual
            outputs = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw,
                             **part.encoder_kwargs(_flash(visual.config)), **_modality_kwargs(kwargs, modality))
            outputs.pooler_output = list(torch.split(outputs.pooler_output, list(part.split_sizes)))
            checked.add(modality)
            return outputs if return_dict else outputs.to_tuple()
        return get_features

    def get_placeholder_mask(input_ids, inputs_embeds, image_features=None, video_features=None):
        if image_features is not None and "image" in checked:
            checked.discard("image")
            image_features = None
        if video_features is not None and "video" in checked:
            checked.discard("video")
            video_features = None
        return own_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features,
                        video_features=video_features)

    thinker.get_audio_features = get_audio_features
    thinker.get_image_features = vision_path("image", own_image)
    thinker.get_video_features = vision_path("video", own_video)
    thinker.get_placeholder_mask = get_placeholder_mask
    thinker._media_plan_paths = True
    return True
