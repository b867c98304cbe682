"""Qwen-Omni M-RoPE position ids, computed once per prepared input with a few tensor ops per media block.

transformers' ``get_rope_index`` (Qwen2.5-Omni and Qwen3-Omni thinkers) walks an
audio-in-video block token by token in Python (about 1600 tiny tensor ops for a
1.6k-token clip), and every forward repeats it. The functions here return the same
tensors (values, dtypes, padding fill and ``rope_deltas``), following the same block
walk, but each block is built from whole-tensor operations:

* Qwen2.5-Omni splits the video and the audio of a block into chunks of
  ``position_id_per_seconds * seconds_per_chunk`` rope steps with a sequential rule (a
  new chunk starts when a value reaches the next threshold, one threshold per element),
  then emits video chunk ``j`` followed by audio chunk ``j``. The chunk index of element
  ``i`` solves ``s_i = min(s_{i-1} + 1, v_i // step)``, i.e.
  ``s_i = min(i + 1, i + cummin(v_j // step - j))``; the interleaving is a stable sort.
* Qwen3-Omni merges video and audio by rope time (video first on ties): the merged
  index of each element is its own index plus a ``searchsorted`` count in the other
  stream.

Each text run starts one past the maximum of the previous *piece* (as transformers
does, which is not always the global maximum), and Qwen3's float positions are formed
with the same float32 operations in the same order, so the results are bit-identical.
All work happens on the host, where the processor's tensors live; the result is moved
to the input's device once (inputs already on a GPU cost one copy of their small
layout tensors back to the host).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["RopeConfig", "rope_index", "row_deltas", "collate_positions", "generation_positions", "decode_positions"]


@dataclass(frozen=True)
class RopeConfig:
    """What a Qwen-Omni rope index reads from the model config.

    ``flavour`` is ``"qwen2_5"`` (integer positions, chunked audio-in-video) or
    ``"qwen3"`` (float positions, timestamp-merged audio-in-video); ``audio_tokens`` maps
    one stream's mel-frame count to its audio token count (the adapter's own formula).
    """

    flavour: str
    image: int
    video: int
    audio: int
    vision_bos: int
    audio_bos: int
    merge: int
    position_id_per_seconds: float
    audio_tokens: Callable[[int], int]
    seconds_per_chunk: float = 2

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.flavour == "qwen3" else torch.long

    @property
    def pad_value(self) -> int:
        """Fill of padded slots in the multimodal branch (ones in Qwen2.5, zeros in Qwen3)."""
        return 0 if self.flavour == "qwen3" else 1


def _line(length: Any, start: Any) -> torch.Tensor:
    """``[3, length]`` text-like positions ``start, start + 1, ...`` (same value on every axis)."""
    return torch.arange(length).view(1, -1).expand(3, -1) + start


def _vision(config: RopeConfig, grid: Sequence[int], t_index: torch.Tensor, start: Any) -> torch.Tensor:
    """``[3, t*h*w]`` positions of one image/video: time, row, column, plus ``start``."""
    gh, gw = grid[1] // config.merge, grid[2] // config.merge
    frames = t_index.numel()
    h = torch.arange(gh).view(1, -1, 1).expand(frames, -1, gw).flatten()
    w = torch.arange(gw).view(1, 1, -1).expand(frames, gh, -1).flatten()
    if config.flavour == "qwen3":
        t = t_index.float().view(-1, 1).expand(-1, gh * gw).flatten()
        return torch.stack([t, h.float(), w.float()]) + start
    t = t_index.float().view(-1, 1).expand(-1, gh * gw).flatten().long()
    return torch.stack([t, h, w]) + start


def _sequential_chunks(values: torch.Tensor, step: int) -> torch.Tensor:
    """Chunk index of each element under transformers' ``get_chunked_index`` rule (see the module doc)."""
    index = torch.arange(values.numel())
    floor = torch.div(values, step, rounding_mode="floor")
    return torch.minimum(index + 1, index + torch.cummin(floor - index, dim=0).values)


class _Row:
    """Positions of one unpadded row, appended piece by piece as transformers' walk appends them."""

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self.last_max: torch.Tensor | None = None

    def add(self, piece: torch.Tensor, last_max: torch.Tensor | None = None) -> None:
        self.pieces.append(piece)
        self.last_max = piece.max() if last_max is None else last_max

    def next_start(self) -> Any:
        return 0 if self.last_max is None else self.last_max + 1


class _Finder:
    """First index ``>= start`` of a token in one row (bisect over its sorted positions)."""

    def __init__(self, ids: torch.Tensor, token: int) -> None:
        self.where = torch.nonzero(ids == token).flatten().tolist()

    def __bool__(self) -> bool:
        return bool(self.where)

    def first(self, start: int, missing: int) -> int:
        k = bisect.bisect_left(self.where, start)
        return self.where[k] if k < len(self.where) else missing


def _qwen2_5_row(config: RopeConfig, ids: torch.Tensor, media: dict[str, Any], counters: dict[str, int],
                 use_audio_in_video: bool) -> torch.Tensor:
    n = ids.numel()
    after = ids.index_select(0, torch.nonzero(ids == config.vision_bos).flatten() + 1)
    audio_nums = int((ids == config.audio_bos).sum())
    image_nums = int((after == config.image).sum())
    video_nums = int((after == (config.audio_bos if use_audio_in_video else config.video)).sum())
    images, videos, audios = (_Finder(ids, t) for t in (config.image, config.video, config.audio))
    remain = {"image": image_nums, "video": video_nums, "audio": audio_nums}
    row, st = _Row(), 0
    pps = config.position_id_per_seconds
    total = image_nums + audio_nums if use_audio_in_video else image_nums + video_nums + audio_nums
    for _ in range(total):
        ed_image = images.first(st, n + 1) if images and remain["image"] > 0 else n + 1
        ed_video = videos.first(st, n + 1) if videos and remain["video"] > 0 else n + 1
        ed_audio = audios.first(st, n + 1) if audios and remain["audio"] > 0 else n + 1
        min_ed = min(ed_image, ed_video, ed_audio)
        interleaved = min_ed == ed_video and use_audio_in_video and min_ed not in (ed_audio, ed_image)
        text_len = min_ed - st - (2 if interleaved else 1)
        if text_len != 0:
            row.add(_line(text_len, row.next_start()))
        start = row.next_start()
        bos = _line(1, start)
        row.add(bos, start)
        if interleaved:
            row.add(bos, start)
        start = row.next_start()
        if min_ed == ed_audio:
            audio_len = int(config.audio_tokens(media["audio"][counters["audio"]]))
            row.add(_line(audio_len, start))
            used = audio_len
            counters["audio"] += 1
            remain["audio"] -= 1
        elif min_ed == ed_image:
            grid = media["image_grid"][counters["image"]]
            row.add(_vision(config, grid, (torch.arange(grid[0]) * 1 * pps).long(), start))
            used = grid[0] * grid[1] * grid[2] // config.merge ** 2
            counters["image"] += 1
            remain["image"] -= 1
        else:
            k = counters["video"]
            grid = media["video_grid"][k]
            t_index = (torch.arange(grid[0]) * media["seconds"][k].float() * pps).long()
            video = _vision(config, grid, t_index, start)
            used = grid[0] * grid[1] * grid[2] // config.merge ** 2
            if interleaved:
                audio_len = int(config.audio_tokens(media["audio"][counters["audio"]]))
                audio = _line(audio_len, start)
                step = int(pps * config.seconds_per_chunk)
                v_chunk = _sequential_chunks(video[0] - start, step)
                a_chunk = _sequential_chunks(audio[0] - start, step)
                keys = torch.cat([v_chunk * 2, a_chunk * 2 + 1])
                order = torch.sort(keys, stable=True).indices
                merged = torch.cat([video, audio], dim=1).index_select(1, order)
                # The last piece transformers appends: audio chunk j (if audio has as many chunks) else video's.
                # Chunks are runs, so the last one is a suffix.
                v_last, a_last = int(v_chunk[-1]), int(a_chunk[-1])
                if a_last >= v_last:
                    last = audio[:, int((a_chunk < a_last).sum()):].max()
                else:
                    last = video[:, int((v_chunk < v_last).sum()):].max()
                row.add(merged, last)
                used += 2 + audio_len
                counters["audio"] += 1
                remain["audio"] -= 1
            else:
                row.add(video)
            counters["video"] += 1
            remain["video"] -= 1
        start = row.next_start()
        eos = _line(1, start)
        row.add(eos, start)
        if interleaved:
            row.add(eos, start)
        st += text_len + used + 2
    if st < n:
        row.add(_line(n - st, row.next_start()))
    return torch.cat(row.pieces, dim=1).reshape(3, -1)


def _qwen3_row(config: RopeConfig, ids: torch.Tensor, media: dict[str, Any], counters: dict[str, int],
               use_audio_in_video: bool) -> torch.Tensor:
    n = ids.numel()
    after = ids.index_select(0, torch.nonzero(ids == config.vision_bos).flatten() + 1)
    audio_nums = int((ids == config.audio_bos).sum())
    image_nums = int((after == config.image).sum())
    video_nums = int((after == (config.audio_bos if use_audio_in_video else config.video)).sum())
    vision_bos, audio_bos = _Finder(ids, config.vision_bos), _Finder(ids, config.audio_bos)
    has_vision = bool(((ids == config.image) | (ids == config.video)).any())
    has_audio = bool((ids == config.audio).any())
    remain = {"image": image_nums, "video": video_nums, "audio": audio_nums}
    row, st = _Row(), 0
    pps = config.position_id_per_seconds
    total = image_nums + audio_nums if use_audio_in_video else image_nums + video_nums + audio_nums
    for _ in range(total):
        start = row.next_start()
        ed_vision = (vision_bos.first(st, n + 1) if has_vision and (remain["video"] > 0 or remain["image"] > 0)
                     else n + 1)
        ed_audio = audio_bos.first(st, n + 1) if has_audio and remain["audio"] > 0 else n + 1
        min_ed = min(ed_vision, ed_audio)
        text_len = min_ed - st
        if text_len != 0:
            row.add(_line(text_len, start))
            start = start + text_len
        interleaved = min_ed == ed_vision and ed_vision + 1 == ed_audio
        edge = 2 if interleaved else 1
        row.add(_line(edge, start))
        start = start + edge
        if min_ed == ed_audio:
            audio_len = int(config.audio_tokens(media["audio"][counters["audio"]]))
            row.add(_line(audio_len, start))
            used = int(audio_len)
            counters["audio"] += 1
            remain["audio"] -= 1
        elif int(ids[ed_vision + 1]) == config.image:
            grid = media["image_grid"][counters["image"]]
            row.add(_vision(config, grid, (torch.arange(grid[0]) * 1 * pps).float(), start))
            used = grid[0] * grid[1] * grid[2] // config.merge ** 2
            counters["image"] += 1
            remain["image"] -= 1
        elif int(ids[ed_vision + 1]) == config.video:
            k = counters["video"]
            grid = media["video_grid"][k]
            t_index = (torch.arange(grid[0]) * media["seconds"][k].float() * pps).float()
            row.add(_vision(config, grid, t_index, start))
            used = grid[0] * grid[1] * grid[2] // config.merge ** 2
            counters["video"] += 1
            remain["video"] -= 1
        elif interleaved:
            k = counters["video"]
            audio_len = int(config.audio_tokens(media["audio"][counters["audio"]]))
            audio = _line(audio_len, start)
            grid = media["video_grid"][k]
            t_index = (torch.arange(grid[0]) * media["seconds"][k].float() * pps).float()
            video = _vision(config, grid, t_index, start)
            v_time, a_time = video[0].contiguous(), audio[0].float().contiguous()
            # Merge by time, video first on ties: each element's slot is its index plus the other stream's count.
            v_slot = torch.arange(v_time.numel()) + torch.searchsorted(a_time, v_time, right=False)
            a_slot = torch.arange(a_time.numel()) + torch.searchsorted(v_time, a_time, right=True)
            merged = torch.empty(3, v_slot.numel() + a_slot.numel(), dtype=torch.float32)
            merged.index_copy_(1, v_slot, video)
            merged.index_copy_(1, a_slot, audio.float())
            # The last piece transformers appends is the tail of whichever stream outlasts the other
            # (slots increase, so the tail is a suffix of that stream).
            if a_slot.numel() and (not v_slot.numel() or int(a_slot[-1]) > int(v_slot[-1])):
                tail = audio[:, int((a_slot < (int(v_slot[-1]) if v_slot.numel() else -1)).sum()):]
            else:
                tail = video[:, int((v_slot < (int(a_slot[-1]) if a_slot.numel() else -1)).sum()):]
            row.add(merged, tail.max())
            used = int(audio_len) + grid[0] * grid[1] * grid[2] // config.merge ** 2
            counters["audio"] += 1
            counters["video"] += 1
            remain["audio"] -= 1
            remain["video"] -= 1
        else:
            used = 0
        row.add(_line(edge, row.next_start()))
        st += int(text_len + edge + used + edge)
    if st < n:
        row.add(_line(n - st, row.next_start()))
    return torch.cat([piece.float() for piece in row.pieces], dim=1).reshape(3, -1)


def _host(value: Any) -> torch.Tensor | None:
    return None if value is None else torch.as_tensor(value).detach().cpu()


def rope_index(config: RopeConfig, data: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids [3, B, T], rope_deltas [B, 1])`` for processor outputs ``data``, equal to the model's ``get_rope_index``.

    ``data`` holds ``input_ids`` and ``attention_mask`` ``[B, T]`` and, as the processor
    returns them, ``image_grid_thw``, ``video_grid_thw``, ``video_second_per_grid``,
    ``feature_attention_mask`` and ``use_audio_in_video``. The result is on the device of
    ``input_ids``.

    >>> cfg = RopeConfig("qwen2_5", image=5, video=6, audio=7, vision_bos=8, audio_bos=9, merge=2,
    ...                  position_id_per_seconds=25, audio_tokens=lambda frames: frames // 4)
    >>> ids = torch.tensor([[1, 2, 8, 5, 5, 10, 3]])          # text, <vision> 2 image tokens </vision>, text
    >>> pos, deltas = rope_index(cfg, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
    ...                                "image_grid_thw": torch.tensor([[1, 2, 4]])})
    >>> pos[:, 0].tolist(), deltas.tolist()
    ([[0, 1, 2, 3, 3, 5, 6], [0, 1, 2, 3, 3, 5, 6], [0, 1, 2, 3, 4, 5, 6]], [[0]])
    """
    input_ids = data["input_ids"]
    device = input_ids.device
    mask = data.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    image_grid, video_grid = data.get("image_grid_thw"), data.get("video_grid_thw")
    if image_grid is None and video_grid is None:
        # transformers' text-only branch: cumulative positions, padded slots set to 1.
        counts = (mask.float() if config.flavour == "qwen3" else mask.long()).cumsum(-1) - 1
        counts = counts.masked_fill(mask == 0, 1)
        positions = counts.unsqueeze(0).expand(3, -1, -1).contiguous()
        # amax, not max(dim) (same values): the indexed reduction's CPU kernel costs ~20 ms on a busy host.
        deltas = positions.amax(dim=(0, 2)).reshape(-1, 1) + 1 - mask.sum(-1, keepdim=True)
        return positions, deltas
    ids_host, keep = _host(input_ids), _host(mask) == 1
    feature_mask = data.get("feature_attention_mask")
    media = {
        "image_grid": _host(image_grid).tolist() if image_grid is not None else [],
        "video_grid": _host(video_grid).tolist() if video_grid is not None else [],
        "seconds": _host(data.get("video_second_per_grid")),
        "audio": (_host(feature_mask).sum(1) if feature_mask is not None
                  else _host(data.get("audio_feature_lengths"))),  # mel frames per audio stream
    }
    use_audio_in_video = bool(data.get("use_audio_in_video") or False)
    row_fn = _qwen3_row if config.flavour == "qwen3" else _qwen2_5_row
    counters = {"image": 0, "video": 0, "audio": 0}
    positions = torch.full((3, *ids_host.shape), config.pad_value, dtype=config.dtype)
    deltas = []
    # index_select / index_copy_ rather than boolean indexing: the latter's CPU kernel costs ~10 ms on a busy host.
    for i in range(ids_host.shape[0]):
        kept = torch.nonzero(keep[i]).flatten()
        row = row_fn(config, ids_host[i].index_select(0, kept), media, counters, use_audio_in_video)
        positions[:, i].index_copy_(1, kept, row.to(config.dtype))
        deltas.append(row.max() + 1 - kept.numel())
    return positions.to(device), torch.stack(deltas).reshape(-1, 1).to(device)


def row_deltas(position_ids: torch.Tensor) -> torch.Tensor:
    """``rope_deltas [1, 1]`` of one unpadded row's ids ``[3, 1, T]``: largest position + 1 - T (transformers' rule)."""
    return (position_ids.max() + 1 - position_ids.shape[-1]).reshape(1, 1)


def collate_positions(config: RopeConfig, items: Sequence[torch.Tensor], padding_side: str,
                      multimodal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch the cached ``position_ids`` ``[3, 1, T_i]`` of prepared inputs, padded to the longest.

    Returns ``(position_ids [3, B, T], rope_deltas [B, 1])`` equal to `rope_index` of the
    collated batch: padded slots are filled as the branch transformers takes for the whole
    batch (``multimodal``: any image or video grid in it) fills them, and the text-only
    branch measures ``rope_deltas`` over the padded row, as transformers does.
    """
    lengths = [int(pos.shape[-1]) for pos in items]
    longest = max(lengths)
    pad = config.pad_value if multimodal else 1
    rows = []
    for pos, n in zip(items, lengths):
        pos = pos.reshape(3, 1, n)
        filler = pos.new_full((3, 1, longest - n), pad)
        rows.append(torch.cat([filler, pos] if padding_side == "left" else [pos, filler], dim=-1))
    positions = torch.cat(rows, dim=1)
    if multimodal:
        deltas = torch.cat([row_deltas(pos) for pos in items])
    else:
        real = torch.tensor(lengths, device=positions.device).reshape(-1, 1)
        deltas = positions.amax(dim=(0, 2)).reshape(-1, 1) + 1 - real
    return positions, deltas


def generation_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The ``[4, B, T]`` ids the Qwen-Omni ``generate`` builds: a text row (mask cumsum) above the 3 rope rows."""
    text = attention_mask.long().cumsum(-1) - 1
    text = text.masked_fill(attention_mask == 0, 0)
    return torch.cat([text[None].to(position_ids.device), position_ids], dim=0)


def decode_positions(rope_deltas: torch.Tensor, attention_mask: torch.Tensor, count: int = 1) -> torch.Tensor:
    """``[3, B, count]`` positions of the next ``count`` tokens, as the thinker's cached-decode branch computes them.

    ``attention_mask`` ``[B, T]`` covers the prompt and the tokens generated so far, the
    new ones included (its last ``count`` columns); positions are ``cumsum(mask) - 1 +
    rope_deltas``, so the first generated token sits at the prompt's largest position + 1.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)[:, -count:]
    return positions[None].expand(3, -1, -1) + rope_deltas.to(positions.device)
