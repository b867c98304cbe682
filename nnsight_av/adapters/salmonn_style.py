"""Adapter for a video-SALMONN-style model built outside transformers (the worked example of docs/adapters.md).

The model (`nnsight_av.adapters.salmonn_style_model.SalmonnStyleModel`) is a plain ``torch.nn.Module``:
audio and vision encoders, linear projectors, and a transformers ``LlamaForCausalLM`` as
the decoder. Its processor interleaves audio with video frame by frame; this adapter
parses that layout itself instead of using the Qwen-style parser.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..errors import SpanError
from ..spans import Chunk, Spans, expect_token, next_block, turn_spans
from .base import Adapter, register_adapter
from .salmonn_style_model import SalmonnStyleModel, SalmonnStyleProcessor


@register_adapter
class SalmonnStyleAdapter(Adapter):
    """Decoder = ``lm`` (a Llama); encoders and projectors sit beside it on the root module."""

    name = "salmonn_style"
    model_types = ("salmonn_style",)
    fused_decode_layers = ("LlamaDecoderLayer",)

    # 1. Where each module role lives, as dotted paths from the root module.
    roles = {
        "embed": ("lm.model.embed_tokens",),
        "layers": ("lm.model.layers",),
        "final_norm": ("lm.model.norm",),
        "lm_head": ("lm.lm_head",),
        "rotary": ("lm.model.rotary_emb",),
        "audio_encoder": ("audio_encoder",),
        "vision_encoder": ("vision_encoder",),
        "audio_projector": ("audio_projector",),
        "vision_projector": ("vision_projector",),
    }
    # Per decoder layer (Llama's names, the base class default), listed here for the guide.
    layer_roles = {
        "self_attn": ("self_attn",), "mlp": ("mlp",),
        "input_layernorm": ("input_layernorm",), "post_attention_layernorm": ("post_attention_layernorm",),
    }
    # 2. Which config attributes hold the special-token ids.
    token_config = {
        "audio": ("audio_token_id",), "video": ("video_token_id",), "image": ("image_token_id",),
        "audio_bos": ("audio_start_token_id",), "audio_eos": ("audio_end_token_id",),
        "vision_bos": ("vision_start_token_id",), "vision_eos": ("vision_end_token_id",),
    }
    # 3. Known sink dimensions per hidden size: none known for this family (find them from data).
    sink_dims: dict[int, list[int]] = {}
    default_system = "You are a helpful assistant."
    # Llama calls ALL_ATTENTION_FUNCTIONS' function as ``attention_interface(self, q, k, v, mask, ...)``.
    attention_call_prefix = "attention_interface"
    video_fps = 2.0
    seconds_per_chunk = 2.0

    # 4. Token positions of one prepared input.
    def spans(self, input_ids: Sequence[int], data: Mapping[str, Any]) -> Spans:
        ids = [int(i) for i in input_ids]
        tok = self.layout_tokens()
        config = self.config
        window = config.audio_window
        lengths = data.get("audio_feature_lengths")
        audio_counts = iter([-(-int(n) // window) for n in (lengths.tolist() if lengths is not None else [])])
        frame_counts = data.get("video_frame_counts")
        fps_values = data.get("video_fps")
        videos = iter(zip(frame_counts.tolist() if frame_counts is not None else [],
                          fps_values.tolist() if fps_values is not None else []))
        tpf, token_s = config.tokens_per_frame, config.audio_token_seconds
        audio, video, image, chunks = [], [], [], []

        def run(start: int, token: int) -> int:
            """Length of the run of ``token`` starting at ``start``."""
            end = start
            while end < len(ids) and ids[end] == token:
                end += 1
            return end - start

        def expect(pos: int, token: int, what: str) -> None:
            expect_token(ids, pos, token, what)


        i = 0
        while i < len(ids):
            if ids[i] == tok.vision_bos and i + 1 < len(ids) and ids[i + 1] == tok.audio_bos:
                # <vision><audio> then per frame: tpf video tokens, the audio tokens that start during it.
                frames, fps = next_block(videos, "video")
                n_audio, j, pos = next_block(audio_counts, "audio"), 0, i + 2
                per_chunk: dict[int, tuple[list[int], list[int]]] = {}
                for f in range(frames):
                    expect(pos, tok.video, "video")
                    if run(pos, tok.video) != tpf:
                        raise SpanError(f"frame {f} at position {pos} has {run(pos, tok.video)} video tokens, "
                                        f"expected {tpf}")
                    per_chunk.setdefault(int(f / fps // self.seconds_per_chunk), ([], []))[0].extend(range(pos, pos + tpf))
                    pos += tpf
                    for _ in range(run(pos, tok.audio)):
                        starts = j * token_s
                        # The last frame also keeps the audio that outlasts the video.
                        end = (f + 1) / fps if f < frames - 1 else float("inf")
                        if not f / fps <= starts + 1e-9 < end:
                            raise SpanError(f"audio token {j} (starts at {starts:.2f}s) at position {pos} "
                                            f"follows frame {f}, which covers {f / fps:.2f}-{end:.2f}s")
                        per_chunk.setdefault(int(starts // self.seconds_per_chunk), ([], []))[1].append(pos)
                        j, pos = j + 1, pos + 1
                if j != n_audio:
                    raise SpanError(f"the interleaved block holds {j} audio tokens, the processor produced {n_audio}")
                expect(pos, tok.audio_eos, "audio_eos")
                expect(pos + 1, tok.vision_eos, "vision_eos")
                for c in sorted(per_chunk):
                    v, a = per_chunk[c]
                    chunks.append(Chunk(len(chunks), torch.tensor(v, dtype=torch.long),
                                        torch.tensor(a, dtype=torch.long), self.seconds_per_chunk * c,
                                        self.seconds_per_chunk * (c + 1)))
                    video += v
                    audio += a
                i = pos + 2
            elif ids[i] in (tok.vision_bos, tok.audio_bos) and i + 1 < len(ids):
                # Separate blocks: <audio> A.. </audio>, <vision> V.. </vision>, <vision> I.. </vision>.
                token, eos = ids[i + 1], (tok.audio_eos if ids[i] == tok.audio_bos else tok.vision_eos)
                if token == tok.audio and ids[i] == tok.audio_bos:
                    count, target = next_block(audio_counts, "audio"), audio
                elif token == tok.video and ids[i] == tok.vision_bos:
                    count, target = next_block(videos, "video")[0] * tpf, video
                elif token == tok.image and ids[i] == tok.vision_bos:
                    count, target = tpf, image
                else:
                    i += 1
                    continue
                if run(i + 1, token) != count:
                    raise SpanError(f"media block at position {i} has {run(i + 1, token)} tokens, the processor "
                                    f"produced {count}")
                target += range(i + 1, i + 1 + count)
                expect(i + 1 + count, eos, "block end")
                i += count + 2
            elif ids[i] in (tok.audio, tok.video, tok.image):
                raise SpanError(f"media token {ids[i]} at position {i} outside a media block")
            else:
                i += 1
        if next(audio_counts, None) is not None or next(videos, None) is not None:
            raise SpanError("the processor produced audio or video inputs that have no tokens in the sequence")
        media = set(audio) | set(video) | set(image)
        system, prompt, assistant = turn_spans(ids, tok, media)
        as_tensor = lambda values: torch.tensor(sorted(values), dtype=torch.long)  # noqa: E731
        return Spans(len(ids), as_tensor(audio), as_tensor(video), as_tensor(image), as_tensor(system),
                     as_tensor(prompt), as_tensor(assistant), tuple(chunks))

    # 5. Batching several prepared inputs into one forward.
    def collate(self, items: list[Mapping[str, Any]], padding_side: str = "right", pad_id: int = 0) -> dict[str, Any]:
        # The layout is fully in the token ids, so inputs with and without audio-in-video mix freely.
        longest = max(item["input_ids"].shape[-1] for item in items)
        ids, masks = [], []
        for item in items:
            pad = longest - item["input_ids"].shape[-1]
            row_ids, row_mask = item["input_ids"].reshape(1, -1), item["attention_mask"].reshape(1, -1)
            fill_ids, fill_mask = row_ids.new_full((1, pad), pad_id), row_mask.new_zeros((1, pad))
            left = padding_side == "left"
            ids.append(torch.cat([fill_ids, row_ids] if left else [row_ids, fill_ids], 1))
            masks.append(torch.cat([fill_mask, row_mask] if left else [row_mask, fill_mask], 1))
        out: dict[str, Any] = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
        audio = [item for item in items if item.get("audio_features") is not None]
        if audio:
            frames = max(item["audio_features"].shape[1] for item in audio)
            out["audio_features"] = torch.cat([torch.nn.functional.pad(item["audio_features"],
                                                                       (0, 0, 0, frames - item["audio_features"].shape[1]))
                                               for item in audio])
            out["audio_feature_lengths"] = torch.cat([item["audio_feature_lengths"] for item in audio])
        for key in ("pixel_values_videos", "video_frame_counts", "video_fps", "pixel_values"):
            parts = [item[key] for item in items if item.get(key) is not None]
            if parts:
                out[key] = torch.cat(parts)
        return out

    # 6. Loading a saved checkpoint (the model is not a transformers class, so it brings its own).
    @classmethod
    def load_module(cls, path: str, **kwargs: Any) -> torch.nn.Module:
        return SalmonnStyleModel.from_pretrained(path, **kwargs)

    @classmethod
    def load_processor(cls, path: str) -> Any:
        return SalmonnStyleProcessor.from_pretrained(path)
