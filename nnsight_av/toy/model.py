"""The toy-omni model: a small Qwen2.5-Omni thinker trained on the toy world, shipped with the package.

Weights, config and processor files live in ``nnsight_av/assets/toy-omni``; they are
written by ``scripts/train_toy.py`` and read offline by `load_toy` (also reachable as
``nav.load("toy-omni")``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UnknownModelError
from .dataset import CAPTION_PROMPT, LETTERS, MC_INSTRUCTION, MC_QUESTION
from .world import COLOURS, DISTRACTOR_COLOUR, ENTITY_NAMES, FRAME_SIZE, SHAPES

__all__ = ["ASSET_DIR", "TOY_WORDS", "DEFAULT_SYSTEM", "PROCESSOR_KWARGS", "toy_tokenizer", "toy_processor",
           "toy_config", "load_toy"]

#: Where the shipped model lives.
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy-omni"
#: The system prompt the toy model was trained with.
DEFAULT_SYSTEM = "You are a helpful assistant."
#: Frames of the toy world are 112 px; the Omni processor's own default size (at least
#: 128 merged tokens per frame) would upsample them to 336 px, so the size is passed per call.
PROCESSOR_KWARGS: dict[str, Any] = {
    "videos_kwargs": {"size": {"shortest_edge": 56 * 56, "longest_edge": FRAME_SIZE * FRAME_SIZE}},
    "images_kwargs": {"size": {"shortest_edge": 56 * 56, "longest_edge": FRAME_SIZE * FRAME_SIZE}},
}


def _words() -> tuple[str, ...]:
    text = " ".join([DEFAULT_SYSTEM, MC_QUESTION, MC_INSTRUCTION, CAPTION_PROMPT, "I see a and hear",
                     "user assistant system"])
    words = [w for w in text.replace(".", " ").replace("?", " ").split()]
    words += list(LETTERS) + list(ENTITY_NAMES) + list(SHAPES) + list(COLOURS) + [DISTRACTOR_COLOUR[0]]
    return tuple(dict.fromkeys(words))


#: Every word of the toy prompts and captions: each is one token, with and without a leading space.
TOY_WORDS: tuple[str, ...] = _words()


def toy_tokenizer(words: Sequence[str] = TOY_WORDS):
    """A byte-level BPE tokenizer in which each of ``words`` and ``" " + word`` is a single token.

    Merges are added until every word encodes to one token (a word's merges can be
    pre-empted by higher-ranked merges of another word; adding the merge of the two
    pieces that remain fixes that without splitting words already whole).

    >>> tok = toy_tokenizer()
    >>> [len(tok(w)["input_ids"]) for w in (" A", "A", " phone", "triangle")]
    [1, 1, 1, 1]
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from ..testing.tiny import NAMED_SPECIALS, SPECIAL_TOKENS

    b2u = bytes_to_unicode()
    vocab: dict[str, int] = {b2u[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    targets = [w for word in words for w in (word, " " + word)]

    def build():
        tokenizer = Qwen2Tokenizer(vocab=dict(vocab, **{t: len(vocab) + i for i, t in enumerate(SPECIAL_TOKENS)}),
                                   merges=list(merges), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", extra_special_tokens=NAMED_SPECIALS)
        tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        return tokenizer

    for _ in range(64):
        tokenizer = build()
        pieces = [(word, tokenizer.tokenize(word)) for word in targets]
        broken = [(word, p) for word, p in pieces if len(p) > 1]
        if not broken:
            return tokenizer
        for _word, p in broken:
            pair = (p[0], p[1])
            if pair[0] + pair[1] not in vocab:
                vocab[pair[0] + pair[1]] = len(vocab)
                merges.append(pair)
    raise RuntimeError(f"could not make single tokens of {[w for w, _ in broken]}")


def toy_processor(words: Sequence[str] = TOY_WORDS):
    """The real ``Qwen2_5OmniProcessor`` around `toy_tokenizer` (call it with `PROCESSOR_KWARGS`)."""
    from ..testing.tiny import tiny_processor

    return tiny_processor(tokenizer=toy_tokenizer(words), min_pixels=56 * 56, max_pixels=FRAME_SIZE * FRAME_SIZE)


def toy_config(tokenizer, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 512, encoder_width: int = 64):
    """A small ``Qwen2_5OmniThinkerConfig``: the toy model's architecture (see docs/toy-model.md)."""
    from transformers import Qwen2_5OmniThinkerConfig

    ids = tokenizer.get_vocab()
    head_dim = hidden // heads
    half = head_dim // 2
    # mrope splits half the head dim into temporal / height / width frequency bands.
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=len(ids), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                tie_word_embeddings=False)
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=2 * encoder_width, d_model=encoder_width, output_dim=hidden, n_window=50,
                          max_source_positions=1500),
        vision_config=dict(depth=2, hidden_size=encoder_width, intermediate_size=2 * encoder_width, num_heads=2,
                           out_hidden_size=hidden, fullatt_block_indexes=[1], window_size=FRAME_SIZE, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=text,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
    )


def load_toy(
    path: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    device_map: Any = None,
    validate: bool = True,
    **hf_kwargs: Any,
):
    """The shipped toy-omni model as an `AVModel` (offline: reads ``nnsight_av/assets/toy-omni``).

    ``path`` points at another folder written by ``scripts/train_toy.py``. Other
    keyword arguments go to ``from_pretrained``.

    >>> model = load_toy()
    >>> model.num_layers, model.hidden_size, model.checkpoint
    (4, 128, 'toy-omni')
    """
    from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    from ..adapters.qwen2_5_omni import Qwen25OmniAdapter
    from ..model import AVModel

    folder = Path(path) if path is not None else ASSET_DIR
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise UnknownModelError(f"no toy model in {str(folder)!r} (expected config.json and model.safetensors); "
                                "train one with `python scripts/train_toy.py`")
    module = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=attn_implementation, device_map=device_map,
        local_files_only=True, **hf_kwargs).eval()
    processor = Qwen2_5OmniProcessor.from_pretrained(str(folder), local_files_only=True)
    model = AVModel(module, adapter=Qwen25OmniAdapter, processor=processor,
                    checkpoint="toy-omni" if path is None else str(folder), default_system=DEFAULT_SYSTEM,
                    processor_kwargs=PROCESSOR_KWARGS)
    if validate:
        from ..validation import quick_check

        quick_check(model)
    return model
