"""Tiny offline models built from transformers' own classes, with real processors built locally.

The processor is the real ``Qwen2_5OmniProcessor`` around a byte-level BPE
tokenizer with the Omni special tokens, a Whisper feature extractor and the
Qwen2-VL image and video processors, so ``prepare()`` runs the same code as for
a real checkpoint. Weights are random (seeded) unless trained.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
)
NAMED_SPECIALS = {
    "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}
#: Words merged into single tokens, so answers such as " A" and short captions are one token each.
DEFAULT_WORDS = tuple("ABCDEFGHIJKLMNOPQRST") + (
    "user", "assistant", "system", "What", "is", "making", "the", "sound", "Answer", "with", "one", "letter",
    "Describe", "what", "you", "see", "and", "hear", "a", "in", "single", "sentence", "Options",
)
#: Frame sizes small enough for CPU tests: 56x56 to 112x112 pixels (4 to 16 merged tokens per frame pair).
TINY_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
#: Qwen-Omni's processor defaults (at least 128 x 28 x 28 pixels a frame) override the image and video
#: processors' own sizes, so tiny models pass their frame size with every call.
TINY_PROCESSOR_KWARGS = {"videos_kwargs": {"size": TINY_PIXELS}, "images_kwargs": {"size": TINY_PIXELS}}


def _byte_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def tiny_tokenizer(words: Sequence[str] = DEFAULT_WORDS, specials: Sequence[str] = SPECIAL_TOKENS,
                   named: dict[str, str] | None = None):
    """A byte-level BPE tokenizer: 256 byte tokens, merges for ``words`` (and " word"), then ``specials``.

    ``named`` maps tokenizer attributes (``audio_token``, ...) to special tokens; the
    defaults are Qwen2.5-Omni's.
    """
    from transformers import Qwen2Tokenizer

    b2u = _byte_unicode()
    vocab: dict[str, int] = {b2u[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []

    def add_word(word: str) -> None:
        symbols = [b2u[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append(pair)
            symbols = [merged] + symbols[2:]

    for word in words:
        add_word(word)
        add_word(" " + word)
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", extra_special_tokens=NAMED_SPECIALS if named is None else named,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


def tiny_processor(words: Sequence[str] = DEFAULT_WORDS, tokenizer: Any = None,
                   min_pixels: int = TINY_PIXELS["shortest_edge"], max_pixels: int = TINY_PIXELS["longest_edge"]):
    """The real ``Qwen2_5OmniProcessor`` around locally built parts (``tokenizer`` defaults to `tiny_tokenizer`)."""
    from transformers import (Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                              WhisperFeatureExtractor)

    from ..adapters.qwen2_5_omni import CHATML_TEMPLATE

    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
        tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(words),
        chat_template=CHATML_TEMPLATE,
    )


def tiny_qwen2_5_omni_config(tokenizer, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                             **text_overrides: Any):
    from transformers import Qwen2_5OmniThinkerConfig

    ids = tokenizer.get_vocab()
    head_dim = hidden // heads
    # mrope sections split half the head dim into temporal / height / width frequencies.
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=len(ids), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                tie_word_embeddings=False)
    text.update(text_overrides)
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, output_dim=hidden, n_window=50, max_source_positions=1500),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=text,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
    )


def tiny_model(
    model_type: str = "qwen2_5_omni",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    words: Sequence[str] = DEFAULT_WORDS,
    system: str | None = "You are a helpful assistant.",
    validate: bool = True,
):
    """A tiny random-weight `AVModel` of ``model_type`` with a real, locally built processor.

    ``model_type``: ``"qwen2_5_omni"``, ``"qwen3_omni_moe"`` (MoE thinker, 4 experts) or
    ``"salmonn_style"`` (a model outside transformers, see `nnsight_av.adapters.salmonn_style_model`).
    ``validate`` runs the load-time adapter checks (`nnsight_av.validation.quick_check`).

    >>> model = tiny_model(seed=0)
    >>> model.num_layers, model.hidden_size
    (4, 64)
    """
    if model_type not in _BUILDERS:
        from ..errors import UnknownModelError

        raise UnknownModelError(f"no tiny model for {model_type!r}; available: {sorted(_BUILDERS)}")
    model = _BUILDERS[model_type](seed=seed, attn_implementation=attn_implementation, dtype=dtype, hidden=hidden,
                                  layers=layers, heads=heads, kv_heads=kv_heads, words=words, system=system)
    if validate:
        from ..validation import quick_check

        quick_check(model)
    return model


def _build_qwen2_5_omni(seed, attn_implementation, dtype, hidden, layers, heads, kv_heads, words, system):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from ..adapters.qwen2_5_omni import Qwen25OmniAdapter
    from ..model import AVModel

    processor = tiny_processor(words)
    config = tiny_qwen2_5_omni_config(processor.tokenizer, hidden=hidden, layers=layers, heads=heads,
                                      kv_heads=kv_heads)
    config._attn_implementation = attn_implementation
    for sub in (config.text_config, config.audio_config, config.vision_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    module = Qwen2_5OmniThinkerForConditionalGeneration(config).to(dtype).eval()
    return AVModel(module, adapter=Qwen25OmniAdapter, processor=processor, checkpoint=f"tiny:qwen2_5_omni:{seed}",
                   default_system=system, processor_kwargs=TINY_PROCESSOR_KWARGS)


QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
QWEN3_NAMED_SPECIALS = {
    "image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}
#: Qwen3-Omni's processor call defaults to 128-768 32x32 blocks per frame; tiny tests want 2x2 merged tokens.
QWEN3_TINY_SIZE = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}


def tiny_qwen3_omni_processor(words: Sequence[str] = DEFAULT_WORDS):
    """The real ``Qwen3OmniMoeProcessor`` around a locally built tokenizer with Qwen3-Omni's specials.

    Frames use 16-pixel patches (as Qwen3-Omni's vision encoder does), so a 64x64 frame pair is
    a 4x4 patch grid, 4 merged tokens; pass ``size=QWEN3_TINY_SIZE`` to the call (the tiny
    model's ``processor_kwargs`` do) to keep the processor's large default sizes away.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor, WhisperFeatureExtractor

    from ..adapters.qwen3_omni import QWEN3_CHATML_TEMPLATE

    pixels = dict(min_pixels=QWEN3_TINY_SIZE["shortest_edge"], max_pixels=QWEN3_TINY_SIZE["longest_edge"],
                  patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
        tokenizer=tiny_tokenizer(words, QWEN3_SPECIAL_TOKENS, QWEN3_NAMED_SPECIALS),
        chat_template=QWEN3_CHATML_TEMPLATE,
    )


def tiny_qwen3_omni_config(tokenizer, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                           experts: int = 4, experts_per_token: int = 2, position_id_per_seconds: int = 13,
                           **text_overrides: Any):
    """A small ``Qwen3OmniMoeThinkerConfig``: MoE decoder (``experts``, top-``experts_per_token``),
    interleaved mrope (always, in this model), one DeepStack level, 16-pixel vision patches,
    Qwen3's windowed audio encoder; the boundary-token ids the released config leaves to the
    tokenizer are set here too."""
    from transformers import Qwen3OmniMoeThinkerConfig

    ids = tokenizer.get_vocab()
    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=len(ids), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                moe_intermediate_size=hidden // 2, num_experts=experts, num_experts_per_tok=experts_per_token,
                max_position_embeddings=8192, decoder_sparse_step=1, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    text.update(text_overrides)
    return Qwen3OmniMoeThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, output_dim=hidden, n_window=50, n_window_infer=400,
                          max_source_positions=1500, downsample_hidden_size=8),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        text_config=text,
        position_id_per_seconds=position_id_per_seconds,
        audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        audio_start_token_id=ids["<|audio_start|>"], audio_end_token_id=ids["<|audio_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def _build_qwen3_omni_moe(seed, attn_implementation, dtype, hidden, layers, heads, kv_heads, words, system):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from ..adapters.qwen3_omni import Qwen3OmniAdapter
    from ..model import AVModel

    processor = tiny_qwen3_omni_processor(words)
    config = tiny_qwen3_omni_config(processor.tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    config._attn_implementation = attn_implementation
    for sub in (config.text_config, config.audio_config, config.vision_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    module = Qwen3OmniMoeThinkerForConditionalGeneration(config).to(dtype).eval()
    return AVModel(module, adapter=Qwen3OmniAdapter, processor=processor, checkpoint=f"tiny:qwen3_omni_moe:{seed}",
                   default_system=system, processor_kwargs={"size": dict(QWEN3_TINY_SIZE)})


def _build_salmonn_style(seed, attn_implementation, dtype, hidden, layers, heads, kv_heads, words, system):
    from .salmonn import tiny_salmonn_style

    return tiny_salmonn_style(seed=seed, attn_implementation=attn_implementation, dtype=dtype, hidden=hidden,
                              layers=layers, heads=heads, kv_heads=kv_heads, words=words, system=system)


_BUILDERS = {
    "qwen2_5_omni": _build_qwen2_5_omni,
    "qwen3_omni_moe": _build_qwen3_omni_moe,
    "salmonn_style": _build_salmonn_style,
}


def tiny_model_types() -> list[str]:
    """The model types `tiny_model` builds.

    >>> "qwen2_5_omni" in tiny_model_types()
    True
    """
    return list(_BUILDERS)
