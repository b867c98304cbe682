"""The adapter: everything nnsight-av needs to know about one model family.

An adapter is a small declarative class. It names where each module role lives
(several candidate paths, since transformers moves them between versions), which
config attributes hold the special token ids, how media spans are laid out, the
known sink dimensions, and how to load the thinker and its processor. Nothing
outside an adapter spells a module path.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..errors import AdapterError
from ..spans import LayoutTokens, MediaLayout, Spans, parse_spans

#: Key under which a prepared input's `Adapter.forward_plan` rides in the forward's keyword arguments.
PLAN_KEY = "media_plan"
#: Module roles every adapter resolves, with what each must be.
MODEL_ROLES = ("embed", "layers", "final_norm", "lm_head", "audio_encoder", "vision_encoder", "rotary")
#: Roles an adapter may add: the modules that map encoder features into the LM's embedding space.
OPTIONAL_MODEL_ROLES = ("audio_projector", "vision_projector")
#: Roles every adapter must resolve (a model without them cannot be traced at all).
REQUIRED_MODEL_ROLES = ("embed", "layers", "final_norm", "lm_head")
LAYER_ROLES = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
TOKEN_ROLES = ("audio", "video", "image", "audio_bos", "audio_eos", "vision_bos", "vision_eos")


def resolve_path(root: torch.nn.Module, candidates: Sequence[str]) -> str | None:
    """The first dotted path in ``candidates`` that exists under ``root``."""
    for path in candidates:
        module = root
        for part in path.split(".") if path else []:
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None:
            return path
    return None


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    module = root
    for part in path.split(".") if path else []:
        module = getattr(module, part)
    return module


class Adapter:
    """Base class; subclass it and fill in the class attributes.

    Class attributes:
        name: registry name (``nav.load(..., adapter=name)``).
        model_types: ``config.model_type`` values this adapter handles.
        roles: module role -> candidate dotted paths from the thinker root.
        layer_roles: per-layer role -> candidate paths from a decoder layer.
        token_config: token role -> candidate config attribute names.
        sink_dims: hidden size -> known sink dimensions for that checkpoint size.
        sink_tau: hidden size -> sink threshold tau.
        default_system: system prompt the checkpoint was trained with.
        processor_kwargs: defaults passed to the processor call.
        layout: how media spans are laid out ("chunked": per-2s video then audio).
        fused_decode_layers: decoder-layer class names whose forward is the Qwen2 / Llama
            pattern (RMSNorm before attention and MLP, q/k/v/o projections with rotary, no
            q/k norms, a SiLU-gated MLP), which the static decode loop may run with fewer
            kernels (`interventions.runtime.fused_layers`; each layer's parts are checked too).
    """

    name: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    roles: ClassVar[Mapping[str, Sequence[str]]] = {}
    layer_roles: ClassVar[Mapping[str, Sequence[str]]] = {
        "self_attn": ("self_attn",), "mlp": ("mlp",),
        "input_layernorm": ("input_layernorm",), "post_attention_layernorm": ("post_attention_layernorm",),
    }
    token_config: ClassVar[Mapping[str, Sequence[str]]] = {}
    sink_dims: ClassVar[Mapping[int, list[int]]] = {}
    sink_tau: ClassVar[Mapping[int, float]] = {}
    default_tau: ClassVar[float] = 25.0
    default_sink_criterion: ClassVar[str] = "phi"
    default_system: ClassVar[str | None] = None
    processor_kwargs: ClassVar[Mapping[str, Any]] = {}
    layout: ClassVar[str] = "chunked"
    fused_decode_layers: ClassVar[tuple[str, ...]] = ()
    #: Name prefix of the attention-function call inside the attention module's source
    #: (nnsight ``.source``); its inputs are (module, query, key, value, attention_mask, ...)
    #: with query and key already rotated.
    attention_call_prefix: ClassVar[str] = "attention_interface"
    #: Chat template ``AVModel.render_chat`` uses when the processor brings none (tiny test processors).
    fallback_chat_template: ClassVar[str | None] = None
    sampling_rate: ClassVar[int] = 16000
    video_fps: ClassVar[float] = 2.0

    def __init__(self, module: torch.nn.Module, processor: Any = None) -> None:
        self.module = module
        self.processor = processor
        self.paths: dict[str, str | None] = {role: resolve_path(module, cands) for role, cands in self.roles.items()}
        missing = [role for role in REQUIRED_MODEL_ROLES if not self.paths.get(role)]
        if missing:
            tried = "; ".join(f"{role}: {', '.join(self.roles.get(role, ())) or '(none)'}" for role in missing)
            raise AdapterError(f"adapter {self.name!r} cannot find module role(s) {missing} in "
                               f"{type(module).__name__} (tried {tried})")
        first_layer = get_module(module, self.paths["layers"])[0]
        self.layer_paths = {role: resolve_path(first_layer, c) for role, c in self.layer_roles.items()}
        missing = [r for r in ("self_attn", "mlp", "input_layernorm") if not self.layer_paths.get(r)]
        if missing:
            raise AdapterError(f"adapter {self.name!r} cannot find layer role(s) {missing} in "
                               f"{type(first_layer).__name__}")

    # -- config --------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.module.config

    @property
    def text_config(self) -> Any:
        config = self.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def token_id(self, role: str) -> int:
        """The id of special token ``role`` ("audio", "vision_bos", ...), read from the config."""
        for attribute in self.token_config.get(role, ()):
            value = getattr(self.config, attribute, None)
            if value is not None:
                return int(value)
        raise AdapterError(f"adapter {self.name!r}: config has none of {list(self.token_config.get(role, ()))} "
                           f"for the {role!r} token id")

    def layout_tokens(self) -> LayoutTokens:
        # Computed once per adapter: scanning a 150k-token vocabulary for newlines on every
        # prepare() call would cost seconds.
        cached = self.__dict__.get("_layout_tokens")
        if cached is not None:
            return cached
        tokenizer = getattr(self.processor, "tokenizer", None)
        im_start = im_end = None
        newline_ids: frozenset[int] = frozenset()
        system_role = user_role = None
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            im_start, im_end = vocab.get("<|im_start|>"), vocab.get("<|im_end|>")
            newline_ids = frozenset(i for t, i in vocab.items() if "\n" in tokenizer.convert_tokens_to_string([t]))
            system_role = tuple(tokenizer.encode("system", add_special_tokens=False))
            user_role = tuple(tokenizer.encode("user", add_special_tokens=False))
        self._layout_tokens = LayoutTokens(**{r: self.token_id(r) for r in TOKEN_ROLES}, im_start=im_start,
                                           im_end=im_end, newline_ids=newline_ids, system_role=system_role,
                                           user_role=user_role)
        return self._layout_tokens

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text_config, "head_dim", None) or self.hidden_size // self.num_heads)

    def known_sink_dims(self) -> list[int] | None:
        calibrated = getattr(self, "_sink_calibration", {})
        if calibrated.get("dims") is not None:
            return list(calibrated["dims"])
        return self.sink_dims.get(self.hidden_size)

    def tau(self) -> float:
        calibrated = getattr(self, "_sink_calibration", {})
        if calibrated.get("tau") is not None:
            return float(calibrated["tau"])
        return float(self.sink_tau.get(self.hidden_size, self.default_tau))

    def sink_criterion(self) -> str:
        """``"phi"`` (the paper's rule, fit for 7B models) unless this checkpoint was calibrated."""
        return str(getattr(self, "_sink_calibration", {}).get("criterion") or self.default_sink_criterion)

    def calibrate_sinks(self, dims: Sequence[int] | None = None, tau: float | None = None,
                        criterion: str | None = None) -> None:
        """Per-checkpoint sink defaults (a loader's knowledge of its weights), over the class's per-size ones."""
        object.__setattr__(self, "_sink_calibration",
                           {"dims": None if dims is None else [int(d) for d in dims], "tau": tau, "criterion": criterion})

    def attention_call(self, attn_envoy: Any) -> Any:
        """The nnsight source envoy of the attention-function call in ``attn_envoy``.

        Its ``.inputs`` are ``((module, query, key, value, attention_mask), kwargs)`` with
        query/key after rotary embedding; use it to read q/k or to edit the mask.
        """
        names = [n for n in attn_envoy.source.names if n.startswith(self.attention_call_prefix)]
        if not names:
            raise AdapterError(f"adapter {self.name!r}: no call named {self.attention_call_prefix}_* in "
                               f"{attn_envoy.path}'s source")
        # The last one is the call; earlier ones are the assignment of the looked-up function.
        return getattr(attn_envoy.source, names[-1])

    def encoder_tokens(self, role: str, output: Any) -> torch.Tensor:
        """The packed ``[tokens, dim]`` features an encoder call put into the LM, from its raw output.

        ``role`` is ``"audio_encoder"`` or ``"vision_encoder"``. The default takes a tensor
        as is, else ``pooler_output`` (merged vision tokens in Qwen-Omni), else
        ``last_hidden_state``, else the first element of a tuple; override it when an
        encoder returns something else. Call it inside a trace on ``envoy.output``.
        """
        if isinstance(output, torch.Tensor):
            return output
        for name in ("pooler_output", "last_hidden_state"):
            value = getattr(output, name, None)
            if isinstance(value, torch.Tensor):
                return value
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return output[0]
        raise AdapterError(f"adapter {self.name!r}: cannot find the token features in the {role} output "
                           f"({type(output).__name__}); override Adapter.encoder_tokens")

    def config_problems(self) -> list[str]:
        """Inconsistencies between the config and the processor this adapter can see (empty: none).

        `nnsight_av.validation.quick_check` reports them at load time; override to add
        family-specific checks (e.g. a rope time scale the processor must share).
        """
        return []

    # -- media layout ----------------------------------------------------------
    def media_layout(self, data: Mapping[str, Any]) -> MediaLayout:
        """Counts of media tokens the processor output implies, in text order."""
        raise NotImplementedError(f"adapter {self.name!r} does not describe its media layout")

    def spans(self, input_ids: Sequence[int], data: Mapping[str, Any]) -> Spans:
        return parse_spans(input_ids, self.layout_tokens(), self.media_layout(data))

    # -- rope positions ----------------------------------------------------------
    def position_ids(self, data: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(position_ids [3, B, T], rope_deltas [B, 1])`` the model computes for processor outputs ``data``.

        `prepare` stores them in the input's ``data`` so no forward recomputes them. This
        default calls the model's own ``get_rope_index`` (with the arguments of its
        signature that ``data`` provides) when it has one, and returns None otherwise: the
        model's positions are then plain ``0..T-1``, cheap enough to leave to it. Adapters
        override it with a faster computation of the same tensors.
        """
        rope = getattr(self.module, "get_rope_index", None)
        if rope is None:
            return None
        import inspect

        feature_mask = data.get("feature_attention_mask")
        offered = {
            "input_ids": data.get("input_ids"), "attention_mask": data.get("attention_mask"),
            "image_grid_thw": data.get("image_grid_thw"), "video_grid_thw": data.get("video_grid_thw"),
            "use_audio_in_video": bool(data.get("use_audio_in_video") or False),
            "audio_seqlens": feature_mask.sum(-1) if feature_mask is not None else None,
            "second_per_grids": data.get("video_second_per_grid"),
        }
        accepted = inspect.signature(rope).parameters
        return rope(**{k: v for k, v in offered.items() if k in accepted})

    def collate_position_ids(self, items: Sequence[Mapping[str, Any]], padding_side: str) -> torch.Tensor | None:
        """The batch's ``position_ids`` from the items' cached ones (None: let the model compute them)."""
        return None

    def generation_position_ids(self, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The form of cached ``position_ids`` that the model's ``generate`` expects (here: unchanged)."""
        return position_ids

    # -- forward inputs ----------------------------------------------------------
    def forward_plan(self, data: Mapping[str, Any]) -> Any:
        """What the forward of processor outputs ``data`` would derive from device data, computed once.

        `prepare` keeps it as ``AVInputs.plan`` (moved by `AVInputs.to`); a traced forward passes
        it to the module under `PLAN_KEY`, so no forward reads device tensors on the host (see
        `nnsight_av.adapters.media_plan`). The default has none.
        """
        return None

    def forward_inputs(self, kwargs: dict[str, Any], generating: bool = False) -> dict[str, Any]:
        """The keyword arguments one traced forward (or ``generate``) passes to the module, from the batch's.

        Adapters drop or replace what the model would otherwise check on the host; the default
        passes them unchanged, less a plan (`PLAN_KEY`) it has no use for.
        """
        return {k: v for k, v in kwargs.items() if k != PLAN_KEY} if PLAN_KEY in kwargs else kwargs

    # -- loading ---------------------------------------------------------------
    @classmethod
    def load_module(cls, path: str, **hf_kwargs: Any) -> torch.nn.Module:
        raise NotImplementedError(f"adapter {cls.name!r} cannot load checkpoints")

    @classmethod
    def load_processor(cls, path: str) -> Any:
        raise NotImplementedError(f"adapter {cls.name!r} cannot load processors")

    # -- forward ---------------------------------------------------------------
    def collate(self, items: list[Mapping[str, Any]], padding_side: str = "right", pad_id: int = 0) -> dict[str, Any]:
        """Combine several prepared inputs into one forward's keyword arguments."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Adapter]] = {}


def register_adapter(adapter: type[Adapter]) -> type[Adapter]:
    """Register ``adapter`` under its name and model types (usable as a decorator)."""
    if not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
        raise AdapterError(f"register_adapter expects an Adapter subclass, got {adapter!r}")
    _REGISTRY[adapter.name] = adapter
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def get_adapter(name_or_model_type: str) -> type[Adapter]:
    from ..errors import UnknownModelError

    try:
        return _REGISTRY[name_or_model_type]
    except KeyError:
        known = sorted({a.name for a in _REGISTRY.values()})
        raise UnknownModelError(
            f"no adapter for model type {name_or_model_type!r}; registered adapters: {known}. "
            "Write one (docs/adapters.md) and call nav.register_adapter(...).") from None


def registered_adapters() -> dict[str, type[Adapter]]:
    return {a.name: a for a in _REGISTRY.values()}
