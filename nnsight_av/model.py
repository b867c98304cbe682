"""`AVModel`: an nnsight model over an audio-visual LLM's thinker.

Standard envoys (``model.layers[i]``, ``model.embed``, ``model.logits``, ...) are
resolved by the model's adapter, so analysis code never spells a module path.
Several ``tracer.invoke(ex)`` blocks batch into one forward: inputs are padded
on the right, so each invoke's spans stay valid as they are (left padding is
used only for batched generation; see docs/gotchas.md).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable, Iterator

import torch
from nnsight.intervention.envoy import Envoy, traceable
from nnsight.modeling.mixins.remotable import Remotable

from .adapters.base import PLAN_KEY, Adapter, get_module
from .errors import AdapterError, InputError, LayerIndexError
from .inputs import AVInputs, MediaRequest, prepare, prepare_request

__all__ = ["AVModel", "register_runner"]

#: What ``AVModel.run`` calls; ``interventions`` registers its ``run`` here. The core must not import the
#: layer above it, so the dependency is inverted: the upper layer hands its entry point down.
_RUNNER: Callable[..., Any] | None = None


def register_runner(runner: Callable[..., Any]) -> None:
    """Make ``runner(model, inputs, interventions, **kwargs)`` the implementation of ``AVModel.run``."""
    global _RUNNER
    _RUNNER = runner


class _Role:
    """Class-level accessor for an adapter-resolved module role.

    It is a data descriptor, so nnsight mounting a same-named child (the thinker's
    ``lm_head``) lands in a shadow slot instead of replacing the role.
    """

    def __init__(self, role: str) -> None:
        self.role = role

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: "AVModel | None", owner: type) -> Any:
        if obj is None:
            return self
        return obj.envoy_at(obj.adapter.paths.get(self.role), self.role)

    def __set__(self, obj: "AVModel", value: Any) -> None:
        obj.__dict__[f"_child_{self.name}"] = value


class LayerView:
    """A decoder layer's envoy with role names (``self_attn``, ``mlp``, ``input_layernorm``) resolved."""

    def __init__(self, envoy: Envoy, paths: dict[str, str | None], index: int) -> None:
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_paths", paths)
        object.__setattr__(self, "index", index)

    def __getattr__(self, name: str) -> Any:
        paths = object.__getattribute__(self, "_paths")
        envoy = object.__getattribute__(self, "_envoy")
        if name in paths and paths[name]:
            target = envoy
            for part in paths[name].split("."):
                target = getattr(target, part)
            return target
        return getattr(envoy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_envoy"), name, value)

    def __repr__(self) -> str:
        return f"LayerView({self.index}, {object.__getattribute__(self, '_envoy').path})"


class LayersView:
    """``model.layers``: indexable, sized, iterable; indices checked against ``num_layers``."""

    def __init__(self, model: "AVModel") -> None:
        self._model = model

    def __len__(self) -> int:
        return self._model.num_layers

    def __getitem__(self, index: int) -> LayerView:
        index = self._model.check_layer(index)
        envoy = self._model.envoy_at(f"{self._model.adapter.paths['layers']}.{index}", "layer")
        return LayerView(envoy, self._model.adapter.layer_paths, index)

    def __iter__(self) -> Iterator[LayerView]:
        return (self[i] for i in range(len(self)))


class AVModel(Remotable):
    """An nnsight model for an audio-visual LLM thinker, with adapter-resolved envoys.

    Build one with ``nav.load(...)`` or ``nav.testing.tiny_model(...)``.
    """

    embed = _Role("embed")
    final_norm = _Role("final_norm")
    lm_head = _Role("lm_head")
    audio_encoder = _Role("audio_encoder")
    vision_encoder = _Role("vision_encoder")
    rotary = _Role("rotary")

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        adapter: type[Adapter] | Adapter,
        processor: Any = None,
        checkpoint: str | None = None,
        default_system: str | None | object = "adapter",
        processor_kwargs: dict[str, Any] | None = None,
        **envoy_kwargs: Any,
    ) -> None:
        super().__init__(module, **envoy_kwargs)
        adapter_obj = adapter if isinstance(adapter, Adapter) else adapter(module, processor)
        merged_kwargs = {**adapter_obj.processor_kwargs, **(processor_kwargs or {})}
        if processor_kwargs:
            # The adapter's layout code must see the kwargs the processor is really called with (a
            # time scale, a chunk length); a shared adapter instance keeps its own defaults.
            adapter_obj = copy.copy(adapter_obj) if isinstance(adapter, Adapter) else adapter_obj
            adapter_obj.processor_kwargs = merged_kwargs
        object.__setattr__(self, "adapter", adapter_obj)
        object.__setattr__(self, "processor", processor)
        object.__setattr__(self, "checkpoint", checkpoint)
        object.__setattr__(self, "default_system",
                           adapter_obj.default_system if default_system == "adapter" else default_system)
        object.__setattr__(self, "processor_kwargs", merged_kwargs)
        object.__setattr__(self, "_padding_offsets", [])
        self._configure_generation()

    # -- envoys ------------------------------------------------------------------
    def envoy_at(self, path: str | None, role: str = "module") -> Envoy:
        """The envoy at a dotted ``path`` from the thinker root."""
        if not path:
            raise AttributeError(f"adapter {self.adapter.name!r} has no {role!r} module for this model")
        envoy: Any = self
        for part in path.split("."):
            # _child_map first: a role descriptor may shadow a same-named child on the root.
            child = envoy.__dict__.get("_child_map", {}).get(part)
            envoy = child if child is not None else (envoy[int(part)] if part.isdigit() else getattr(envoy, part))
        return envoy

    def raw(self, role: str | None = None, layer: int | None = None) -> torch.nn.Module:
        """The plain ``torch.nn.Module`` behind a role: the one way past the envoys to the real modules.

        For code that registers PyTorch hooks or calls modules directly (the fast runtime in
        ``interventions.runtime``). ``raw()``: the thinker; ``raw("layers")``: the decoder layers
        (a ``ModuleList``); ``raw("stack")``: the decoder stack holding them; a model role
        (``"embed"``, ``"final_norm"``, ``"lm_head"``, ``"rotary"``, ...); ``raw("layer", i)``:
        decoder layer ``i``; a layer role (``"self_attn"``, ``"mlp"``, ``"input_layernorm"``, ...)
        with ``layer=i``. A role this model lacks raises `AdapterError`.

        >>> import nnsight_av as nav
        >>> model = nav.testing.tiny_model()
        >>> type(model.raw("self_attn", layer=1)).__name__, len(model.raw("layers")) == model.num_layers
        ('Qwen2_5OmniAttention', True)
        """
        root = self._module
        paths = self.adapter.paths
        if role is None:
            return root
        if role == "stack":
            parent = paths["layers"].rpartition(".")[0]
            return get_module(root, parent)
        if role == "layer" or role in self.adapter.layer_paths:
            if layer is None:
                raise AdapterError(f"raw({role!r}) needs layer=")
            block = get_module(root, paths["layers"])[self.check_layer(layer)]
            if role == "layer":
                return block
            path = self.adapter.layer_paths.get(role)
            if not path:
                raise AdapterError(f"adapter {self.adapter.name!r} has no {role!r} module in its decoder layers")
            return get_module(block, path)
        if layer is not None:
            raise AdapterError(f"raw({role!r}) is not a per-layer role; drop layer=")
        if role not in paths and role != "layers":
            raise AdapterError(f"unknown module role {role!r}; known: stack, layer, "
                               f"{', '.join([*paths, *self.adapter.layer_paths])}")
        if not paths.get(role):
            raise AdapterError(f"adapter {self.adapter.name!r} has no {role!r} module for this model")
        return get_module(root, paths[role])

    @property
    def attn_implementation(self) -> str:
        """The attention backend the decoder runs (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ...)."""
        config = self.adapter.text_config
        return str(getattr(config, "_attn_implementation", None)
                   or getattr(self.adapter.config, "_attn_implementation", None) or "sdpa")

    @property
    def layers(self) -> LayersView:
        return LayersView(self)

    @property
    def logits(self) -> Any:
        """The LM head's output ``[batch, seq, vocab]`` (read it last: modules are served in execution order)."""
        return self.lm_head.output

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def hidden_size(self) -> int:
        return self.adapter.hidden_size

    @property
    def num_heads(self) -> int:
        return self.adapter.num_heads

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", None)

    def check_layer(self, index: int) -> int:
        """``index`` as a non-negative layer index, or a `LayerIndexError` naming the valid range."""
        if not isinstance(index, int) or isinstance(index, bool):
            raise LayerIndexError(f"layer index must be an int, got {type(index).__name__}")
        n = self.num_layers
        if not -n <= index < n:
            raise LayerIndexError(f"layer {index} is out of range: this model has {n} layers (0..{n - 1})")
        return index % n

    # -- inputs ------------------------------------------------------------------
    def prepare(
        self,
        video: Any = None,
        audio: Any = None,
        images: Any = None,
        text: str | None = None,
        system: str | None = "default",
        use_audio_in_video: bool = True,
        fps: float | None = None,
        audio_rate: int | None = None,
    ) -> AVInputs:
        """Decode media, apply the chat template and processor, and locate token spans.

        ``video``: mp4 path or uint8 frames ``[T, H, W, 3]`` at ``fps``; its audio track
        is used when ``use_audio_in_video`` and ``audio`` is None. ``audio``: wav/mp3
        path or samples (at ``audio_rate``, default 16 kHz). ``images``: paths, arrays
        or PIL images. ``system="default"`` uses the checkpoint's system prompt.
        """
        return prepare(self, video=video, audio=audio, images=images, text=text, system=system,
                       use_audio_in_video=use_audio_in_video, fps=fps, audio_rate=audio_rate)

    def prepare_request(self, request: MediaRequest) -> AVInputs:
        return prepare_request(self, request)

    def render_chat(self, conversation: list[dict[str, Any]]) -> str:
        """The chat template applied to ``conversation`` with the generation prompt."""
        template = None if getattr(self.processor, "chat_template", None) else self.adapter.fallback_chat_template
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                                  chat_template=template)

    # -- batching (nnsight hooks) ----------------------------------------------------
    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        if inputs and isinstance(inputs[0], AVInputs):
            return 1
        if inputs and isinstance(inputs[0], dict) and "input_ids" in inputs[0]:
            return int(inputs[0]["input_ids"].shape[0])
        return 1 if inputs or any(k in kwargs for k in ("input_ids", "inputs_embeds")) else 0

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        if not invokes:
            return (), {}
        generating = getattr(fn, "__name__", "") == "generate"
        items, extra = [], {}
        for inputs, kwargs in invokes:
            if not inputs:
                items.append(kwargs)
                continue
            items.append(self._module_item(inputs[0]))
            extra.update(kwargs)
        batch, offsets = self._collate_items(items, generating)
        object.__setattr__(self, "_padding_offsets", offsets)
        kwargs = self.adapter.forward_inputs({**batch, **extra}, generating)
        if (not generating and "use_cache" not in kwargs and "past_key_values" not in kwargs
                and self._takes_use_cache()):
            # A traced forward reads no KV cache unless asked (``model.trace(ex, use_cache=True)``);
            # building one costs a copy of every layer's keys and values.
            kwargs["use_cache"] = False
        return (), kwargs

    def _takes_use_cache(self) -> bool:
        import inspect

        cached = self.__dict__.get("_use_cache_param")
        if cached is None:
            cached = "use_cache" in inspect.signature(type(self._module).forward).parameters
            object.__setattr__(self, "_use_cache_param", cached)
        return cached

    @staticmethod
    def _module_item(data: Any) -> dict[str, Any]:
        """One input's forward arguments: an `AVInputs`' data with its plan, or a dict as given."""
        if isinstance(data, AVInputs):
            return data.data if data.plan is None else {**data.data, PLAN_KEY: data.plan}
        if isinstance(data, dict):
            return data
        raise InputError(f"trace inputs must be AVInputs (from model.prepare) or a dict of processor "
                         f"tensors, got {type(data).__name__}")

    def _collate_items(self, items: list[dict[str, Any]], generating: bool) -> tuple[dict[str, Any], list[int]]:
        """One forward's arguments for ``items`` (padded: right, left when generating) and each row's offset."""
        if len(items) == 1:
            batch, offsets = dict(items[0]), [0]
        else:
            pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
            side = "left" if generating else "right"
            batch = self.adapter.collate(items, padding_side=side, pad_id=pad_id or 0)
            longest = batch["input_ids"].shape[1]
            offsets = [longest - item["input_ids"].shape[-1] if side == "left" else 0 for item in items]
        positions = batch.get("position_ids")
        if torch.is_tensor(positions) and positions.shape[-1] != batch["input_ids"].shape[-1]:
            raise InputError(f"the cached position_ids cover {positions.shape[-1]} tokens but input_ids has "
                             f"{batch['input_ids'].shape[-1]}: drop data['position_ids'] after editing input_ids "
                             "(or prepare the new prompt)")
        if generating and torch.is_tensor(positions) and "attention_mask" in batch:
            batch["position_ids"] = self.adapter.generation_position_ids(batch["position_ids"], batch["attention_mask"])
        return batch, offsets

    def module_inputs(self, inputs: "AVInputs | dict[str, Any] | list[AVInputs | dict[str, Any]]",
                      generating: bool = False) -> dict[str, Any]:
        """The keyword arguments a raw module call (``model.raw()(**kwargs)``) should get for ``inputs``.

        What a trace passes: a list is collated into one batch as ``tracer.invoke`` blocks are
        (right padding; left when ``generating``), a prepared input's media plan and cached
        positions are included and `Adapter.forward_inputs` is applied, so the forward makes no
        host sync. Tensors stay where ``inputs`` has them (the plan follows the model); add
        ``use_cache``/``past_key_values`` as the call needs.

        >>> import nnsight_av as nav
        >>> model = nav.testing.tiny_model()
        >>> ex = model.prepare(audio=nav.testing.synthetic_tone(1.0), text="hi")
        >>> logits = model.raw()(**model.module_inputs(ex), use_cache=False).logits
        >>> logits.shape[1] == len(ex)
        True
        """
        listed = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if not listed:
            raise InputError("module_inputs needs at least one input")
        batch, _ = self._collate_items([self._module_item(x) for x in listed], generating)
        return self.adapter.forward_inputs(batch, generating)

    @property
    def padding_offsets(self) -> list[int]:
        """Per invoke of the last batched run: how far its positions moved right (left padding in generate)."""
        return list(self._padding_offsets)

    # -- generation ----------------------------------------------------------------
    @traceable
    def generate(self, *inputs: Any, **kwargs: Any) -> Any:
        """Greedy/sampled generation through the thinker; returns prompt + new token ids.

        ``with model.generate(ex, max_new_tokens=8) as tracer:`` traces every step;
        use ``tracer.iter[...]`` to target steps, ``tracer.result`` for the ids.
        """
        return self._module.generate(*inputs, **kwargs)

    def _configure_generation(self) -> None:
        config = getattr(self._module, "generation_config", None)
        tokenizer = self.tokenizer
        if config is None or tokenizer is None:
            return
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
        if config.eos_token_id is None:
            im_end = tokenizer.get_vocab().get("<|im_end|>")
            config.eos_token_id = im_end if im_end is not None else tokenizer.eos_token_id

    # -- interventions -----------------------------------------------------------------
    def run(self, inputs: Any, interventions: Any = None, **kwargs: Any) -> Any:
        """Logits of ``inputs`` with ``interventions`` applied; see ``interventions.run``.

        The runner lives one layer up, in ``interventions``, which registers it with
        `register_runner` when imported (building an intervention imports it anyway).
        """
        if _RUNNER is None:
            raise InputError("model.run needs the interventions package: `import interventions` first "
                             "(it registers the runner)")
        return _RUNNER(self, inputs, interventions, **kwargs)

    # -- remote ----------------------------------------------------------------------
    def _remoteable_model_key(self) -> str:
        return json.dumps({"checkpoint": self.checkpoint, "adapter": self.adapter.name})

    @classmethod
    def _remoteable_from_model_key(cls, model_key: str, **kwargs: Any) -> "AVModel":
        from .loading import load

        spec = json.loads(model_key)
        return load(spec["checkpoint"], adapter=spec["adapter"], **kwargs)

    def __repr__(self) -> str:
        return (f"AVModel({self.adapter.name}, checkpoint={self.checkpoint!r}, layers={self.num_layers}, "
                f"hidden={self.hidden_size}, heads={self.num_heads})")
