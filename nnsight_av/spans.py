"""Named token positions of one prepared input.

`Spans` answers "which positions are the video tokens of chunk 2?" from the
token ids and the processor's layout, never from hard-coded integers. Every
span is a sorted 1-D ``LongTensor`` of positions, usable directly as an index:
``hidden[:, spans.video] = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from jaxtyping import Int

from .errors import SpanError, TokenSelectionError

Positions = Int[torch.Tensor, "positions"]

MODALITY_SPANS = ("audio", "video", "image")
#: The modality of a token, in the order per-modality tables use (means, stds of `interventions`).
MODALITIES = (*MODALITY_SPANS, "text")
#: The modalities a clip's media carry, the ones the dominance test removes.
AV_MODALITIES = ("audio", "video")
#: One character per modality, as in ``AVInputs.layout()`` and ``SinkResult.layout`` (the one definition).
MODALITY_CODES = {"video": "V", "audio": "A", "image": "I", "text": "."}
NAMED_SPANS = ("audio", "video", "image", "text", "system", "prompt", "media", "first", "assistant")


def _positions(values: Iterable[int]) -> torch.Tensor:
    return torch.tensor(sorted(set(int(v) for v in values)), dtype=torch.long)


@dataclass(frozen=True)
class Chunk:
    """One time chunk (2 s by default) of an audio-visual block."""

    index: int
    video: torch.Tensor
    audio: torch.Tensor
    start_s: float
    end_s: float

    @property
    def all(self) -> torch.Tensor:
        return _positions(self.video.tolist() + self.audio.tolist())

    def __repr__(self) -> str:
        return (f"Chunk({self.index}, {self.start_s:.1f}-{self.end_s:.1f}s, "
                f"video={len(self.video)}, audio={len(self.audio)})")


@dataclass(frozen=True)
class Spans:
    """Token positions by role for one input of length ``length``.

    Attributes are sorted position tensors: ``audio``, ``video``, ``image``,
    ``text`` (every non-media position), ``system`` (system message content),
    ``prompt`` (the user's text), ``media`` (audio, video and image),
    ``first`` (position 0, the attention sink of most LMs), ``assistant``
    (the assistant header the answer follows); ``chunks`` lists per-chunk
    video and audio positions for interleaved audio-in-video blocks.
    """

    length: int
    audio: torch.Tensor
    video: torch.Tensor
    image: torch.Tensor
    system: torch.Tensor
    prompt: torch.Tensor
    assistant: torch.Tensor
    chunks: tuple[Chunk, ...] = field(default_factory=tuple)

    @property
    def media(self) -> torch.Tensor:
        return _positions(self.audio.tolist() + self.video.tolist() + self.image.tolist())

    @property
    def text(self) -> torch.Tensor:
        media = set(self.media.tolist())
        return torch.tensor([p for p in range(self.length) if p not in media], dtype=torch.long)

    @property
    def first(self) -> torch.Tensor:
        return torch.tensor([0], dtype=torch.long)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def get(self, name: str) -> torch.Tensor:
        """A span by name: ``"video"``, ``"audio"``, ``"chunk2"``, ``"chunk2.video"``, ...

        >>> spans = Spans.empty(4)
        >>> spans.get("text").tolist()
        [0, 1, 2, 3]
        """
        if name in NAMED_SPANS:
            return getattr(self, name)
        if name.startswith("chunk"):
            head, _, part = name.partition(".")
            try:
                chunk = self.chunks[int(head[len("chunk"):])]
            except (ValueError, IndexError):
                raise TokenSelectionError(
                    f"unknown chunk {name!r}: this input has {len(self.chunks)} chunks") from None
            return chunk.all if not part else getattr(chunk, part)
        raise TokenSelectionError(f"unknown span {name!r}; known: {', '.join(NAMED_SPANS)}, chunkK[.video|.audio]")

    def modality_of(self) -> list[str]:
        """Per position: ``"audio"``, ``"video"``, ``"image"`` or ``"text"``."""
        labels = ["text"] * self.length
        for name in MODALITY_SPANS:
            for p in getattr(self, name).tolist():
                labels[p] = name
        return labels

    def shift(self, offset: int, length: int | None = None) -> "Spans":
        """The same spans moved right by ``offset`` (e.g. after left padding)."""
        move = lambda t: t + offset  # noqa: E731
        return Spans(
            length=length if length is not None else self.length + offset,
            audio=move(self.audio), video=move(self.video), image=move(self.image),
            system=move(self.system), prompt=move(self.prompt), assistant=move(self.assistant),
            chunks=tuple(Chunk(c.index, move(c.video), move(c.audio), c.start_s, c.end_s) for c in self.chunks),
        )

    def summary(self) -> dict[str, int]:
        """Token counts per span, for printing."""
        return {"length": self.length, "audio": len(self.audio), "video": len(self.video),
                "image": len(self.image), "text": len(self.text), "prompt": len(self.prompt),
                "system": len(self.system), "chunks": len(self.chunks)}

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.summary().items())
        return f"Spans({parts})"

    @classmethod
    def empty(cls, length: int) -> "Spans":
        none = torch.zeros(0, dtype=torch.long)
        return cls(length, none, none, none, none, none, none, ())


@dataclass(frozen=True)
class LayoutTokens:
    """Token ids a layout parser needs (resolved by the adapter from the config)."""

    audio: int
    video: int
    image: int
    audio_bos: int
    audio_eos: int
    vision_bos: int
    vision_eos: int
    im_start: int | None = None
    im_end: int | None = None
    newline_ids: frozenset[int] = frozenset()
    #: Token ids of the role names in turn headers ("system", "user"), when the tokenizer is known;
    #: without them the system turn is recognised by position only.
    system_role: tuple[int, ...] | None = None
    user_role: tuple[int, ...] | None = None


@dataclass
class MediaLayout:
    """What the processor put into one input, in text order, for span checks."""

    video_tokens_per_patch: list[int]           # merged tokens per temporal patch, per video
    video_patches: list[int]                    # temporal patches per video
    video_seconds_per_patch: list[float]
    audio_token_counts: list[int]               # per audio stream, in order of appearance
    image_token_counts: list[int]
    position_id_per_seconds: float = 25.0
    seconds_per_chunk: float = 2.0
    #: How an audio-in-video block is ordered: "chunked" (Qwen2.5-Omni: per chunk, all video
    #: then all audio) or "timestamp" (Qwen3-Omni: token by token by rope time, video first on ties).
    interleave: str = "chunked"


def chunk_bounds(token_times: Sequence[float], tokens_per_chunk: int) -> list[tuple[int, int]]:
    """Split monotonically increasing token times (in rope units) into chunks.

    Element ``i`` opens a new chunk when its time reaches the next multiple of
    ``tokens_per_chunk``, as Qwen-Omni's processor does; returns ``(start, end)``
    index pairs.

    >>> chunk_bounds([0, 0, 25, 25, 50, 50], 50)
    [(0, 4), (4, 6)]
    """
    bounds, start, boundary = [], 0, tokens_per_chunk
    for i, t in enumerate(token_times):
        if t >= boundary:
            bounds.append((start, i))
            start = i
            boundary += tokens_per_chunk
    bounds.append((start, len(token_times)))
    return bounds


def expect_token(ids: Sequence[int], position: int, token: int, what: str) -> None:
    """Raise `SpanError` unless ``ids[position] == token`` (the layout a parser predicted).

    >>> expect_token([5, 7, 9], 1, 7, "video")
    >>> expect_token([5, 7, 9], 3, 7, "video")
    Traceback (most recent call last):
    ...
    nnsight_av.errors.SpanError: layout mismatch at position 3: expected video token 7, found end of sequence
    """
    if position >= len(ids) or ids[position] != token:
        found = ids[position] if position < len(ids) else "end of sequence"
        raise SpanError(f"layout mismatch at position {position}: expected {what} token {token}, found {found}")


def next_block(iterator: Iterator[Any], what: str) -> Any:
    """The processor's record of the next ``what`` block; `SpanError` if the ids hold more blocks.

    >>> counts = iter([52])
    >>> next_block(counts, "audio")
    52
    >>> next_block(counts, "audio")
    Traceback (most recent call last):
    ...
    nnsight_av.errors.SpanError: the token ids contain more audio blocks than the processor produced
    """
    try:
        return next(iterator)
    except StopIteration:
        raise SpanError(f"the token ids contain more {what} blocks than the processor produced") from None


def parse_spans(input_ids: Sequence[int], tokens: LayoutTokens, layout: MediaLayout) -> Spans:
    """Build `Spans` for one sequence of ``input_ids`` (no padding).

    Media blocks are found by their boundary tokens; an interleaved
    audio-in-video block (``<vision_bos><audio_bos> V0 A0 V1 A1 ... <audio_eos><vision_eos>``)
    is cut into chunks with the processor's chunk rule, and every position is
    checked to hold the token id the layout predicts.
    """
    ids = [int(i) for i in input_ids]
    n = len(ids)
    audio_pos, video_pos, image_pos, chunks = [], [], [], []
    videos, audios, images = iter(range(len(layout.video_patches))), iter(layout.audio_token_counts), iter(layout.image_token_counts)
    tpc = int(layout.position_id_per_seconds * layout.seconds_per_chunk)

    def expect(position: int, token: int, what: str) -> None:
        expect_token(ids, position, token, what)


    i = 0
    while i < n:
        tok = ids[i]
        if tok == tokens.vision_bos and i + 1 < n and ids[i + 1] == tokens.audio_bos and layout.interleave == "timestamp":
            v = next_block(videos, "video")
            a_count = next_block(audios, "audio")
            vp, ap, block_chunks, pos = _timestamp_block(ids, i + 2, tokens, layout, v, a_count)
            video_pos += vp; audio_pos += ap
            chunks += [Chunk(len(chunks) + c.index, c.video, c.audio, c.start_s, c.end_s) for c in block_chunks]
            expect(pos, tokens.audio_eos, "audio_eos"); expect(pos + 1, tokens.vision_eos, "vision_eos")
            i = pos + 2
        elif tok == tokens.vision_bos and i + 1 < n and ids[i + 1] == tokens.audio_bos:
            v = next_block(videos, "video")
            a_count = next_block(audios, "audio")
            per_patch, patches = layout.video_tokens_per_patch[v], layout.video_patches[v]
            sec = layout.video_seconds_per_patch[v]
            video_times = [p * sec * layout.position_id_per_seconds for p in range(patches) for _ in range(per_patch)]
            vchunks = chunk_bounds(video_times, tpc)
            achunks = chunk_bounds(list(range(a_count)), tpc)
            pos = i + 2
            for j in range(max(len(vchunks), len(achunks))):
                vp, ap = [], []
                if j < len(vchunks):
                    for _ in range(vchunks[j][1] - vchunks[j][0]):
                        expect(pos, tokens.video, "video"); vp.append(pos); pos += 1
                if j < len(achunks):
                    for _ in range(achunks[j][1] - achunks[j][0]):
                        expect(pos, tokens.audio, "audio"); ap.append(pos); pos += 1
                video_pos += vp; audio_pos += ap
                chunks.append(Chunk(len(chunks), _positions(vp), _positions(ap),
                                    j * layout.seconds_per_chunk, (j + 1) * layout.seconds_per_chunk))
            expect(pos, tokens.audio_eos, "audio_eos"); expect(pos + 1, tokens.vision_eos, "vision_eos")
            i = pos + 2
        elif tok == tokens.vision_bos and i + 1 < n and ids[i + 1] == tokens.video:
            v = next_block(videos, "video")
            count = layout.video_tokens_per_patch[v] * layout.video_patches[v]
            for k in range(count):
                expect(i + 1 + k, tokens.video, "video")
            video_pos += range(i + 1, i + 1 + count)
            expect(i + 1 + count, tokens.vision_eos, "vision_eos")
            i += count + 2
        elif tok == tokens.vision_bos and i + 1 < n and ids[i + 1] == tokens.image:
            count = next_block(images, "image")
            for k in range(count):
                expect(i + 1 + k, tokens.image, "image")
            image_pos += range(i + 1, i + 1 + count)
            expect(i + 1 + count, tokens.vision_eos, "vision_eos")
            i += count + 2
        elif tok == tokens.audio_bos and i + 1 < n and ids[i + 1] == tokens.audio:
            count = next_block(audios, "audio")
            for k in range(count):
                expect(i + 1 + k, tokens.audio, "audio")
            audio_pos += range(i + 1, i + 1 + count)
            expect(i + 1 + count, tokens.audio_eos, "audio_eos")
            i += count + 2
        elif tok in (tokens.audio, tokens.video, tokens.image):
            raise SpanError(f"media token {tok} at position {i} outside a media block")
        else:
            i += 1
    leftover = [name for name, it in (("video", videos), ("audio", audios), ("image", images)) if next(it, None) is not None]
    if leftover:
        raise SpanError(f"the processor produced {', '.join(leftover)} inputs that have no tokens in the sequence")

    system, prompt, assistant = _turn_spans(ids, tokens, set(audio_pos) | set(video_pos) | set(image_pos))
    return Spans(n, _positions(audio_pos), _positions(video_pos), _positions(image_pos),
                 _positions(system), _positions(prompt), _positions(assistant), tuple(chunks))


def _timestamp_block(ids: list[int], start: int, tokens: LayoutTokens, layout: MediaLayout, video: int,
                     audio_count: int) -> tuple[list[int], list[int], list[Chunk], int]:
    """Positions and 2 s chunks of one audio-in-video block interleaved token by token by time.

    Video token ``k`` of temporal patch ``p`` has rope time ``p * seconds_per_patch * pps``,
    audio token ``j`` has time ``j``; the processor emits the video token first while its
    time is ``<=`` the next audio token's. The order found in ``ids`` is checked against
    that rule; within ``1e-4`` of a tie either order is accepted, since the processor's
    float64 times and the float32 ``video_second_per_grid`` tensor may differ in the last
    bits (positions are read from the token ids either way, so spans stay exact). Every
    token goes to the chunk ``floor(time / (seconds_per_chunk * pps))``.
    """
    per_patch, patches = layout.video_tokens_per_patch[video], layout.video_patches[video]
    pps, sec = layout.position_id_per_seconds, layout.video_seconds_per_patch[video]
    video_times = [p * sec * pps for p in range(patches) for _ in range(per_patch)]
    per_chunk = layout.seconds_per_chunk * pps
    eps = 1e-4
    vp: list[int] = []
    ap: list[int] = []
    by_chunk: dict[int, tuple[list[int], list[int]]] = {}
    pos, vi, ai = start, 0, 0
    while vi < len(video_times) or ai < audio_count:
        found = ids[pos] if pos < len(ids) else None
        want_video = vi < len(video_times) and (ai >= audio_count or video_times[vi] <= ai + eps)
        want_audio = ai < audio_count and (vi >= len(video_times) or video_times[vi] >= ai - eps)
        if found == tokens.video and want_video:
            chunk = int((video_times[vi] + eps) // per_chunk)
            by_chunk.setdefault(chunk, ([], []))[0].append(pos); vp.append(pos); vi += 1
        elif found == tokens.audio and want_audio:
            chunk = int((ai + eps) // per_chunk)
            by_chunk.setdefault(chunk, ([], []))[1].append(pos); ap.append(pos); ai += 1
        else:
            expected = " or ".join(n for n, w in (("video", want_video), ("audio", want_audio)) if w)
            what = "end of sequence" if found is None else found
            raise SpanError(f"layout mismatch at position {pos}: by the timestamp rule the next token is {expected} "
                            f"(video {vi}/{len(video_times)}, audio {ai}/{audio_count} placed), found {what}")
        pos += 1
    chunks = [Chunk(c, _positions(by_chunk.get(c, ([], []))[0]), _positions(by_chunk.get(c, ([], []))[1]),
                    c * layout.seconds_per_chunk, (c + 1) * layout.seconds_per_chunk)
              for c in range(max(by_chunk, default=-1) + 1)]
    return vp, ap, chunks, pos


def turn_spans(ids: Sequence[int], tokens: LayoutTokens, media: Iterable[int]) -> tuple[list[int], list[int], list[int]]:
    """System content, user text and assistant-header positions of a ChatML-style sequence.

    Public for adapters that parse their own media layout (see docs/adapters.md);
    ``media`` holds the positions of media tokens, left out of the user text.

    >>> t = LayoutTokens(*range(10, 17), im_start=1, im_end=2, newline_ids=frozenset({3}))
    >>> ids = [1, 4, 3, 9, 2, 1, 5, 3, 7, 8, 2, 1, 6, 3]  # system "9", user "7 8", open assistant turn
    >>> turn_spans(ids, t, media={8})
    ([3], [9], [11, 12, 13])
    """
    return _turn_spans([int(i) for i in ids], tokens, set(int(m) for m in media))


def _turn_spans(ids: list[int], tokens: LayoutTokens, media: set[int]) -> tuple[list[int], list[int], list[int]]:
    """System content, user text and assistant header from the chat turns.

    A turn is ``<im_start> role \\n content <im_end>``; the role header ends at
    the first token that contains a newline. The user text is the last user
    turn's content minus media and media-boundary tokens.
    """
    if tokens.im_start is None:
        return [], [p for p in range(len(ids)) if p not in media], []
    boundary = {tokens.audio_bos, tokens.audio_eos, tokens.vision_bos, tokens.vision_eos}
    starts = [p for p, t in enumerate(ids) if t == tokens.im_start]
    turns = []
    for k, s in enumerate(starts):
        header_end = s + 1
        while header_end < len(ids) and ids[header_end] not in tokens.newline_ids:
            header_end += 1
        end = next((p for p in range(header_end + 1, len(ids)) if ids[p] == tokens.im_end), len(ids))
        turns.append((s, header_end, end))
    system, prompt, assistant = [], [], []

    def role(s: int, header_end: int) -> tuple[int, ...]:
        return tuple(ids[s + 1:header_end])

    for index, (s, header_end, end) in enumerate(turns):
        content = [p for p in range(header_end + 1, end) if p not in media and ids[p] not in boundary]
        if tokens.system_role is not None:
            if role(s, header_end) == tokens.system_role:
                system = content
        elif index == 0 and len(turns) > 1 and not any(p in media for p in range(s, end)) and index < len(turns) - 2:
            system = content
        if end == len(ids):  # the open assistant turn the answer will follow
            assistant = list(range(s, len(ids)))
    user_turns = [t for t in turns if t[2] < len(ids)]
    if tokens.user_role is not None:
        user_turns = [t for t in user_turns if role(t[0], t[1]) == tokens.user_role] or user_turns
    if user_turns:
        s, header_end, end = user_turns[-1]
        prompt = [p for p in range(header_end + 1, end) if p not in media and ids[p] not in boundary]
    return system, prompt, assistant
