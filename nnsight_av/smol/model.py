"""smol-omni: SmolLM2-135M-Instruct as the language model of a Qwen2.5-Omni thinker.

The language model is the pretrained SmolLM2 (read from its GGUF, never changed by the
conversion: `tests/test_smol.py` checks that text-only logits equal ``LlamaForCausalLM`` loaded
from the same file); the audio and vision encoders are Qwen2.5-Omni's own classes at a small
size, trained on the toy world (`scripts/train_smol.py`) and shipped in
``nnsight_av/assets/smol-omni`` together with the embedding rows of the multimodal special
tokens. Everything runs through the same `Qwen25OmniAdapter` as the 7B checkpoint.

How a Llama becomes a Qwen2.5-Omni text model:

* q/k/v biases (Qwen2 has them, Llama does not) are zero;
* ``mrope_section`` sums to ``head_dim / 2``: text tokens carry equal temporal/height/width
  positions, so their rotary embedding is exactly Llama's 1-D RoPE;
* RoPE theta, RMSNorm epsilon and sizes come from the GGUF's metadata;
* the tied embeddings become both ``embed_tokens`` and ``lm_head`` (new rows for the special
  tokens included, so the head stays tied).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UnknownModelError

__all__ = ["ASSET_DIR", "DEFAULT_SYSTEM", "PROCESSOR_KWARGS", "EncoderSizes", "smol_language_model", "smol_tokenizer",
           "smol_processor", "smol_config", "build_smol_thinker", "trained_state", "load_smol"]

#: Trained parts (encoders, special-token rows) and their training log.
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "smol-omni"
#: The system prompt used in training (the toy world's).
DEFAULT_SYSTEM = "You are a helpful assistant."
#: Toy-world frames are 112 px (see `nnsight_av.toy.PROCESSOR_KWARGS`).
PROCESSOR_KWARGS: dict[str, Any] = {
    "videos_kwargs": {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}},
    "images_kwargs": {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}},
}
#: Sink calibration of smol-omni (docs/sinks.md, "Small models"): SmolLM2's massive channel (what
#: `analyses.find_sink_dims` finds unprompted) and the magnitude rule, since phi <= sqrt(576) = 24.
SINK_DIMS, SINK_TAU, SINK_CRITERION = (507,), 20.0, "magnitude"
#: Names of the files in `ASSET_DIR`.
WEIGHTS_FILE, SIZES_FILE = "media.safetensors", "encoders.json"
#: Tensor holding the embedding rows of the tokens added to SmolLM2's vocabulary.
NEW_ROWS = "new_token_embeddings"


@dataclass(frozen=True)
class EncoderSizes:
    """Sizes of the audio and vision encoders (Qwen2.5-Omni's classes) trained for smol-omni."""

    audio_width: int = 256
    audio_layers: int = 4
    audio_heads: int = 4
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderSizes":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def smol_language_model(gguf: str | Path, dtype: torch.dtype = torch.float32):
    """SmolLM2 as transformers' ``LlamaForCausalLM``, dequantised from the GGUF (the reference)."""
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()


def _converted_folder(gguf: Path) -> Path:
    from .fetch import cache_dir

    stat = gguf.stat()
    return cache_dir() / "smol-omni-converted" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def converted_language_model(gguf: str | Path, cache: bool = True):
    """``(language_model, tokenizer)`` of SmolLM2, dequantised once and kept as safetensors in the cache.

    Dequantising the GGUF and converting its tokenizer take tens of seconds on a CPU; the float32
    copy (~0.5 GB, keyed by the file's size and mtime) loads in about a second. The weights are
    the GGUF's own dequantised values either way.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = Path(gguf)
    folder = _converted_folder(gguf)
    if cache and (folder / "model.safetensors").is_file():
        try:
            return (LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(),
                    AutoTokenizer.from_pretrained(str(folder)))
        except (OSError, ValueError):
            pass  # a damaged copy: convert again below
    language_model, tokenizer = smol_language_model(gguf), _gguf_tokenizer(gguf)
    if cache:
        import shutil
        import tempfile

        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
        try:
            language_model.config.quantization_config = None
            if hasattr(language_model, "hf_quantizer"):
                language_model.hf_quantizer = None
            language_model.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)          # atomic: a reader sees a whole copy or none
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)   # a read-only or full cache only costs speed
    return language_model, tokenizer


def _gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def smol_tokenizer(gguf: str | Path, base=None):
    """SmolLM2's own tokenizer (from the GGUF) plus Qwen2.5-Omni's multimodal special tokens.

    The added tokens get ids after SmolLM2's 49152; the text tokens keep theirs. ``base``: the
    already loaded SmolLM2 tokenizer (default: read from the GGUF).
    """
    from ..testing.tiny import NAMED_SPECIALS, SPECIAL_TOKENS

    tokenizer = base if base is not None else _gguf_tokenizer(Path(gguf))
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": missing})
    # The GGUF names <|im_start|> as eos; chat turns end with <|im_end|>.
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    for name, token in NAMED_SPECIALS.items():
        setattr(tokenizer, name, token)
    return tokenizer


def smol_processor(tokenizer):
    """The real ``Qwen2_5OmniProcessor`` around `smol_tokenizer` (call it with `PROCESSOR_KWARGS`)."""
    from ..testing.tiny import tiny_processor

    return tiny_processor(tokenizer=tokenizer, min_pixels=56 * 56, max_pixels=112 * 112)


def smol_config(language_config, tokenizer, sizes: EncoderSizes = EncoderSizes()):
    """A ``Qwen2_5OmniThinkerConfig`` whose text model is SmolLM2's architecture."""
    from transformers import Qwen2_5OmniThinkerConfig

    lm = language_config
    ids = tokenizer.get_vocab()
    head_dim = lm.hidden_size // lm.num_attention_heads
    half = head_dim // 2
    # Any split of head_dim / 2 works for text (equal positions); the temporal band gets half.
    section = [half - 2 * (half // 4), half // 4, half // 4]
    theta = (lm.rope_parameters or {}).get("rope_theta", getattr(lm, "rope_theta", 10000.0))
    text = dict(vocab_size=len(tokenizer), hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads,
                num_key_value_heads=lm.num_key_value_heads, max_position_embeddings=lm.max_position_embeddings,
                rms_norm_eps=lm.rms_norm_eps, hidden_act=lm.hidden_act,
                rope_parameters={"rope_type": "default", "rope_theta": float(theta), "mrope_section": section},
                tie_word_embeddings=False)
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=sizes.audio_layers, encoder_attention_heads=sizes.audio_heads,
                          encoder_ffn_dim=4 * sizes.audio_width, d_model=sizes.audio_width, output_dim=lm.hidden_size,
                          n_window=50, max_source_positions=1500),
        vision_config=dict(depth=sizes.vision_layers, hidden_size=sizes.vision_width,
                           intermediate_size=4 * sizes.vision_width, num_heads=sizes.vision_heads,
                           out_hidden_size=lm.hidden_size, fullatt_block_indexes=[sizes.vision_layers - 1],
                           window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=text,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
    )


def _copy_language_model(thinker, language_model) -> None:
    """SmolLM2's weights into the thinker's text model; new embedding rows start at the mean row."""
    source = language_model.state_dict()
    target = thinker.model
    with torch.no_grad():
        for name, tensor in target.state_dict().items():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                tensor.zero_()
            elif name == "embed_tokens.weight":
                rows = source["model.embed_tokens.weight"]
                tensor[: rows.shape[0]].copy_(rows)
                tensor[rows.shape[0]:].copy_(rows.mean(0, keepdim=True).expand(tensor.shape[0] - rows.shape[0], -1))
            else:
                tensor.copy_(source["model." + name])


def build_smol_thinker(gguf: str | Path, sizes: EncoderSizes = EncoderSizes(), dtype: torch.dtype = torch.float32,
                       attn_implementation: str = "sdpa", language_model=None, tokenizer=None):
    """An untrained smol-omni thinker: SmolLM2 copied in, encoders freshly initialised (seed first).

    Returns ``(thinker, processor)``. ``language_model`` / ``tokenizer`` reuse already loaded ones.
    """
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    language_model = language_model if language_model is not None else smol_language_model(gguf)
    tokenizer = tokenizer if tokenizer is not None else smol_tokenizer(gguf)
    config = smol_config(language_model.config, tokenizer, sizes)
    for sub in (config, config.text_config, config.audio_config, config.vision_config):
        sub._attn_implementation = attn_implementation
    thinker = Qwen2_5OmniThinkerForConditionalGeneration(config)
    _copy_language_model(thinker, language_model)
    thinker.lm_head.weight = thinker.model.embed_tokens.weight  # tied, as in SmolLM2 (new rows included)
    return thinker.to(dtype).eval(), smol_processor(tokenizer)


#: Prefix of the low-rank updates in the weights file (``lora.<module>.A`` / ``.B``; see `add_lora`).
LORA_PREFIX = "lora."
#: The language-model projections that get low-rank updates.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(thinker, rank: int, alpha: float | None = None) -> dict[str, torch.nn.Parameter]:
    """Trainable low-rank updates ``W + (alpha / rank) B A`` on every language-model projection.

    Added as forward hooks (the frozen weight is untouched until `merge_lora`); ``B`` starts at
    zero, so the model starts as SmolLM2. Returns the new parameters by name.
    """
    scale = (alpha if alpha is not None else 2.0 * rank) / rank
    params: dict[str, torch.nn.Parameter] = {}
    for name, module in thinker.model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS):
            continue
        a = torch.nn.Parameter(torch.randn(rank, module.in_features, device=module.weight.device) / module.in_features ** 0.5)
        b = torch.nn.Parameter(torch.zeros(module.out_features, rank, device=module.weight.device))
        module.register_parameter("lora_A", a)
        module.register_parameter("lora_B", b)

        def hook(mod, args, output, scale=scale):
            update = torch.nn.functional.linear(torch.nn.functional.linear(args[0], mod.lora_A.to(args[0].dtype)),
                                                mod.lora_B.to(args[0].dtype))
            return output + scale * update

        module.register_forward_hook(hook)
        params[f"{LORA_PREFIX}model.{name}.A"], params[f"{LORA_PREFIX}model.{name}.B"] = a, b
    thinker._smol_lora_scale = scale
    return params


def merge_lora(thinker, state: dict[str, torch.Tensor], scale: float) -> int:
    """Add ``scale * B @ A`` from ``state``'s ``lora.*`` tensors into the projections; returns how many."""
    merged = 0
    with torch.no_grad():
        for key in [k for k in state if k.startswith(LORA_PREFIX) and k.endswith(".A")]:
            path = key[len(LORA_PREFIX):-2]
            module = thinker.get_submodule(path)
            a, b = state[key].float(), state[key[:-2] + ".B"].float()
            module.weight += (scale * b @ a).to(module.weight)
            merged += 1
    return merged


def trained_state(thinker, base_vocab: int) -> dict[str, torch.Tensor]:
    """What smol-omni ships: both encoders and the embedding rows added to SmolLM2's vocabulary."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in thinker.state_dict().items()
             if name.startswith(("audio_tower.", "visual."))}
    state[NEW_ROWS] = thinker.model.embed_tokens.weight[base_vocab:].detach().cpu().contiguous()
    for name, module in thinker.model.named_modules():
        if hasattr(module, "lora_A"):
            state[f"{LORA_PREFIX}model.{name}.A"] = module.lora_A.detach().cpu().contiguous()
            state[f"{LORA_PREFIX}model.{name}.B"] = module.lora_B.detach().cpu().contiguous()
    return state


def apply_trained_state(thinker, state: dict[str, torch.Tensor], base_vocab: int, lora_scale: float = 2.0) -> int:
    """Load `trained_state` into a thinker built by `build_smol_thinker` (lm_head stays tied).

    Low-rank updates, if the weights hold any, are merged into the language model; returns how
    many projections changed (0: the language model is SmolLM2 as it is).
    """
    state = dict(state)
    rows = state.pop(NEW_ROWS)
    lora = {k: state.pop(k) for k in [k for k in state if k.startswith(LORA_PREFIX)]}
    missing, unexpected = thinker.load_state_dict(state, strict=False)
    media_missing = [m for m in missing if m.startswith(("audio_tower.", "visual."))]
    if media_missing or unexpected:
        raise UnknownModelError(f"smol-omni weights do not fit the encoders: missing {media_missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        thinker.model.embed_tokens.weight[base_vocab:].copy_(rows.to(thinker.model.embed_tokens.weight.dtype))
        if thinker.lm_head.weight is not thinker.model.embed_tokens.weight:
            thinker.lm_head.weight[base_vocab:].copy_(rows.to(thinker.lm_head.weight.dtype))
    return merge_lora(thinker, lora, lora_scale) if lora else 0


def load_smol(
    path: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    device_map: Any = None,
    validate: bool = True,
    gguf: str | Path | None = None,
    trained: bool = True,
    **hf_kwargs: Any,
):
    """smol-omni as an `AVModel` (what ``nav.load("smol-omni")`` calls).

    ``path``: a folder written by ``scripts/train_smol.py`` (default: the shipped one);
    ``gguf``: SmolLM2's file (default: found or fetched once by `nnsight_av.smol.gguf_path`);
    ``trained=False`` leaves the encoders untrained (the language model is SmolLM2 either way).
    """
    from safetensors.torch import load_file

    from ..adapters.qwen2_5_omni import Qwen25OmniAdapter
    from ..model import AVModel

    if hf_kwargs:
        raise TypeError(f"load_smol() got unexpected keyword arguments {sorted(hf_kwargs)}")
    folder = Path(path) if path is not None else ASSET_DIR
    if trained and not (folder / WEIGHTS_FILE).is_file():
        raise UnknownModelError(f"no smol-omni weights in {str(folder)!r} (expected {WEIGHTS_FILE}); "
                                "train them with `python scripts/train_smol.py`")
    if gguf is None:
        from .fetch import gguf_path

        gguf = gguf_path()
    sizes = EncoderSizes()
    lora_scale = 2.0
    if (folder / SIZES_FILE).is_file():
        meta = json.loads((folder / SIZES_FILE).read_text())
        sizes, lora_scale = EncoderSizes.from_dict(meta), float(meta.get("lora_scale", 2.0))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    language_model, base_tokenizer = converted_language_model(gguf)
    base_vocab = language_model.config.vocab_size
    thinker, processor = build_smol_thinker(gguf, sizes, dtype=torch.float32, attn_implementation=attn_implementation,
                                            language_model=language_model,
                                            tokenizer=smol_tokenizer(gguf, base=base_tokenizer))
    del language_model
    if trained:
        apply_trained_state(thinker, load_file(str(folder / WEIGHTS_FILE)), base_vocab, lora_scale)
    thinker = thinker.to(dtype)
    if device_map is not None:
        thinker = thinker.to(device_map if isinstance(device_map, (str, torch.device)) else "cpu")
    model = AVModel(thinker, adapter=Qwen25OmniAdapter, processor=processor,
                    checkpoint="smol-omni" if path is None else str(folder), default_system=DEFAULT_SYSTEM,
                    processor_kwargs=PROCESSOR_KWARGS)
    model.adapter.calibrate_sinks(dims=SINK_DIMS, tau=SINK_TAU, criterion=SINK_CRITERION)
    if validate:
        from ..validation import quick_check

        quick_check(model)
    return model
