"""The tiny SALMONN-style test model: random weights, a Llama decoder, wrapped as an `AVModel`.

The architecture and its processor live with their adapter, in
`nnsight_av.adapters.salmonn_style_model` (an adapter loads its model without reaching up
into the testing helpers); this module builds a random instance for tests and docs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapters.salmonn_style_model import (MODEL_TYPE, NAMED_SPECIALS, SPECIAL_TOKENS,  # noqa: F401  (re-exported)
                                            SalmonnStyleConfig, SalmonnStyleModel, SalmonnStyleProcessor)

__all__ = ["tiny_salmonn_style", "SalmonnStyleConfig", "SalmonnStyleModel", "SalmonnStyleProcessor"]


def tiny_salmonn_style(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                       hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                       words: Sequence[str] | None = None, system: str | None = "You are a helpful assistant."):
    """A random-weight `SalmonnStyleModel` with a Llama decoder, wrapped as an `AVModel`."""
    from transformers import LlamaConfig

    from ..adapters.salmonn_style import SalmonnStyleAdapter
    from ..model import AVModel
    from .tiny import DEFAULT_WORDS, tiny_tokenizer

    tokenizer = tiny_tokenizer(DEFAULT_WORDS if words is None else words, SPECIAL_TOKENS, NAMED_SPECIALS)
    ids = tokenizer.get_vocab()
    text = LlamaConfig(vocab_size=len(ids), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None,
                       eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text._attn_implementation = attn_implementation
    config = SalmonnStyleConfig(
        text_config=text, audio_token_id=ids["<AudioHere>"], video_token_id=ids["<VideoHere>"],
        image_token_id=ids["<ImageHere>"], audio_start_token_id=ids["<audio>"], audio_end_token_id=ids["</audio>"],
        vision_start_token_id=ids["<vision>"], vision_end_token_id=ids["</vision>"])
    torch.manual_seed(seed)
    module = SalmonnStyleModel(config).to(dtype).eval()
    processor = SalmonnStyleProcessor(tokenizer, config)
    return AVModel(module, adapter=SalmonnStyleAdapter, processor=processor, checkpoint=f"tiny:{MODEL_TYPE}:{seed}",
                   default_system=system)
