"""`check_adapter`: run an adapter through every check the analyses rely on, on small inputs.

Checks, each reported by name with pass/fail and a message:

* ``roles``: every declared module role resolves, with the shape its role needs, and the
  attention-function call is found (`nnsight_av.validation.role_problems`);
* ``tokens``: special-token ids exist, are distinct, inside the vocabulary and agree with
  the tokenizer; family-specific config checks (`~nnsight_av.validation.token_problems`);
* ``spans:audio``, ``spans:video``, ``spans:image``, ``spans:interleaved``: the spans of
  an input of that kind hold exactly the adapter's token ids, as many as the encoders
  emit, and the features the model puts into the LM sit exactly at those positions;
  chunks of the interleaved input partition its audio and video spans in time order;
* ``hidden_shapes``: every layer's input/output, the final norm and the logits have the
  expected shapes, and HF ``output_hidden_states`` has ``num_layers + 1`` entries;
* ``wiring``: the roles are the modules the forward actually chains: embedding output =
  layer 0 input at text positions, layer ``l`` output = layer ``l + 1`` input outside
  visual positions (DeepStack-style injections go there), last layer output = final norm
  input, final norm output = LM head input;
* ``attention``: softmax of post-rope q/k read at ``adapter.attention_call`` (with the
  call's own mask and scale) sums to 1 over keys and equals eager attention
  (``output_attentions`` under ``attn_implementation="eager"``), every layer;
* ``edit``: zeroing a media span at layer 0 changes the last position's logits and
  leaves every earlier position unchanged;
* ``batch``: two different inputs in one trace (two invokes) give the logits of two
  separate runs;
* ``generate``: generation returns the prompt followed by new tokens.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import nnsight
import torch

from ..adapters.base import OPTIONAL_MODEL_ROLES, get_module
from ..errors import AdapterError

if TYPE_CHECKING:
    import pandas as pd

    from ..inputs import AVInputs
    from ..model import AVModel

__all__ = ["CheckResult", "AdapterReport", "check_adapter", "CHECKS", "status_table"]

CHECKS = ("roles", "tokens", "spans:audio", "spans:video", "spans:image", "spans:interleaved", "hidden_shapes",
          "wiring", "attention", "edit", "batch", "generate")


@dataclass
class CheckResult:
    """One named check: ``passed`` is None when it did not run (``message`` says why)."""

    name: str
    passed: bool | None
    message: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "not run"}[self.passed]


@dataclass
class AdapterReport:
    """The result of `check_adapter`: every check with pass/fail and a message.

    ``report.ok`` is True when every check that ran passed and none was left out;
    ``report.failures`` lists the failed ones; ``report.raise_for_failures()`` raises an
    `AdapterError` naming them.
    """

    adapter: str
    model: str
    versions: dict[str, str]
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.passed is False]

    def __getitem__(self, name: str) -> CheckResult:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check named {name!r}; checks: {[c.name for c in self.checks]}")

    def raise_for_failures(self) -> "AdapterReport":
        """Raise `AdapterError` listing every failed check by name (returns self when all passed)."""
        bad = [c for c in self.checks if not c.passed]
        if bad:
            lines = "\n  - ".join(f"{c.name}: {c.message}" for c in bad)
            raise AdapterError(f"adapter {self.adapter!r} failed {len(bad)} check(s) on {self.model}:\n  - {lines}")
        return self

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame([{"check": c.name, "status": c.status, "seconds": round(c.seconds, 2),
                              "message": c.message} for c in self.checks])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "AdapterReport":
        data = json.loads(text)
        data["checks"] = [CheckResult(**c) for c in data["checks"]]
        return cls(**data)

    def __str__(self) -> str:
        width = max(len(c.name) for c in self.checks) if self.checks else 5
        rows = [f"{c.name:<{width}}  {c.status:<7}  {c.message}" for c in self.checks]
        head = f"adapter {self.adapter!r} on {self.model}: {'all checks pass' if self.ok else 'FAILED'}"
        return "\n".join([head] + rows)

    def _repr_html_(self) -> str:
        return f"<b>{self.adapter}</b> on {self.model}" + self.to_frame().to_html(index=False)


def versions() -> dict[str, str]:
    import transformers

    import nnsight_av

    return {"nnsight-av": nnsight_av.__version__, "transformers": transformers.__version__,
            "nnsight": getattr(nnsight, "__version__", "?"), "torch": torch.__version__}


# -- helpers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def attention_implementation(module: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Temporarily run every transformers config under ``module`` with ``implementation``.

    Attention modules and mask builders read ``config._attn_implementation`` at call time, so
    switching the configs they hold switches the model without rebuilding it.
    """
    configs, seen = [], set()

    def visit(config: Any) -> None:
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation"):
            return
        seen.add(id(config))
        configs.append((config, config._attn_implementation))
        for name in ("text_config", "audio_config", "vision_config"):
            visit(getattr(config, name, None))

    for sub in module.modules():
        visit(getattr(sub, "config", None))
    try:
        for config, _ in configs:
            config._attn_implementation = implementation
        yield
    finally:
        for config, old in configs:
            config._attn_implementation = old


def attention_from_qk(query: torch.Tensor, key: torch.Tensor, mask: Any, scale: float) -> torch.Tensor:
    """Full softmax attention ``[B, heads, T, S]`` from post-rope q ``[B, h, T, d]`` and k ``[B, kv, S, d]``.

    ``mask``: None (causal), a boolean mask (True = attend) or an additive float mask, as
    transformers passes them to its attention functions.
    """
    q, k = query.float(), key.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    t, s = scores.shape[-2:]
    if mask is None:
        causal = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., :t, :s], float("-inf"))
    else:
        scores = scores + mask[..., :t, :s].float()
    return scores.softmax(-1)


def _default_media() -> dict[str, Any]:
    from .media import synthetic_frames, synthetic_tone

    return {
        "video": synthetic_frames(4.0, 2, 64, seed=0),
        "audio": synthetic_tone(4.0, freq=440.0),
        "image": synthetic_frames(1.0, 1, 64, seed=2)[0],
        "video_short": synthetic_frames(2.0, 2, 64, seed=1),
        "audio_short": synthetic_tone(2.0, freq=300.0),
    }


class _Fail(Exception):
    """A check's failure message."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _Fail(message)


def _visual(spans: Any) -> torch.Tensor:
    return torch.cat([spans.video, spans.image])


# -- the checks ----------------------------------------------------------------------------------
class _Checker:
    def __init__(self, model: "AVModel", media: dict[str, Any], atol: float) -> None:
        self.model, self.adapter, self.media, self.atol = model, model.adapter, media, atol
        self.inputs: dict[str, Any] = {}

    def prepare(self, kind: str) -> "AVInputs":
        if kind not in self.inputs:
            m, prompt = self.media, "What is making the sound?"
            builders: dict[str, Callable[[], "AVInputs"]] = {
                "audio": lambda: self.model.prepare(audio=m["audio_short"], text=prompt),
                "video": lambda: self.model.prepare(video=m["video_short"], use_audio_in_video=False, text=prompt),
                "image": lambda: self.model.prepare(images=[m["image"]], text=prompt),
                "interleaved": lambda: self.model.prepare(video=m["video"], audio=m["audio"], text=prompt),
                "interleaved_short": lambda: self.model.prepare(video=m["video_short"], audio=m["audio_short"],
                                                                text="Describe what you see and hear"),
            }
            self.inputs[kind] = builders[kind]()
        return self.inputs[kind]

    def clean_logits(self, kind: str) -> torch.Tensor:
        """Logits of one traced run of the ``kind`` input (cached: several checks compare against it)."""
        key = f"logits:{kind}"
        if key not in self.inputs:
            with torch.no_grad(), self.model.trace(self.prepare(kind)):
                logits = self.model.logits.save()
            self.inputs[key] = logits
        return self.inputs[key]

    def run_module(self, ex: "AVInputs", **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.model._module(**ex.data, **kwargs)

    # spans -----------------------------------------------------------------------------------
    def spans(self, kind: str) -> str:
        model, adapter = self.model, self.adapter
        ex = self.prepare(kind)
        spans, ids = ex.spans, ex.input_ids[0]
        expected = {"audio": ["audio"], "video": ["video"], "image": ["image"], "interleaved": ["audio", "video"]}[kind]
        for name in ("audio", "video", "image"):
            positions = getattr(spans, name)
            token = adapter.token_id(name)
            _require(bool((ids[positions] == token).all()),
                     f"{name} span holds ids {sorted(set(ids[positions].tolist()))[:5]}, not the adapter's "
                     f"{name} token id {token}")
            _require(int((ids == token).sum()) == len(positions),
                     f"the input has {int((ids == token).sum())} {name} tokens (id {token}) but the {name} span "
                     f"has {len(positions)} positions")
            _require((len(positions) > 0) == (name in expected),
                     f"a {kind} input gives {len(positions)} {name} positions")
        roles = {"audio": "audio_encoder", "video": "vision_encoder", "image": "vision_encoder"}
        captured = self.capture(ex, [roles[n] for n in expected])
        features: dict[str, Any] = {}
        for name in expected:
            role = roles[name]
            projector = "audio_projector" if name == "audio" else "vision_projector"
            calls = captured.get(role, [])
            _require(len(calls) == 1, f"{role} ran {len(calls)} times for a {kind} input, expected once")
            features[f"{name}:count"] = calls[0].shape[0]
            # What enters the LM: the projector's output where the adapter names one, else the encoder's.
            placed = captured.get(projector)
            features[name] = placed[0] if placed else calls[0]
        hidden = captured["layer0"][0]
        for name in expected:
            count = int(features[f"{name}:count"])
            positions = getattr(spans, name)
            _require(count == len(positions), f"{roles[name]} emitted {count} {name} tokens but the {name} span "
                                              f"has {len(positions)} positions")
            placed = features[name].reshape(-1, features[name].shape[-1])
            _require(placed.shape == (len(positions), model.hidden_size),
                     f"the {name} features entering the LM have shape {tuple(placed.shape)}, expected "
                     f"({len(positions)}, {model.hidden_size})")
            error = (hidden[0, positions].float() - placed.float()).abs().max().item() if len(positions) else 0.0
            _require(error <= self.atol, f"layer 0's input at the {name} span differs from the {name} features by "
                                         f"{error:.3g}: the span is not where the model puts them")
        if kind == "interleaved":
            _require(len(spans.chunks) >= 2, f"a 4 s clip gives {len(spans.chunks)} chunks")
            for name in ("audio", "video"):
                parts = torch.cat([getattr(c, name) for c in spans.chunks])
                _require(torch.equal(parts.sort().values, getattr(spans, name)),
                         f"the chunks' {name} positions do not partition the {name} span")
            times = [c.start_s for c in spans.chunks]
            _require(times == sorted(times) and all(c.end_s > c.start_s for c in spans.chunks),
                     f"chunk times are not increasing: {[(c.start_s, c.end_s) for c in spans.chunks]}")
        counts = ", ".join(f"{n}={len(getattr(spans, n))}" for n in expected)
        return f"{counts} tokens match the encoders and the features' positions" + (
            f"; {len(spans.chunks)} chunks" if kind == "interleaved" else "")

    def capture(self, ex: "AVInputs", encoder_roles: list[str]) -> dict[str, list[torch.Tensor]]:
        """Encoder token features, projector outputs and layer 0's input of one plain forward.

        Plain forward hooks, so encoders that run in any order (or mutate their output
        afterwards, as Qwen-Omni's vision tower does) are read as they were produced.
        """
        adapter, root = self.adapter, self.model._module
        captured: dict[str, list[torch.Tensor]] = {}
        hooks = []

        def keep(key: str, value: torch.Tensor) -> None:
            captured.setdefault(key, []).append(value.detach().clone())

        for role in dict.fromkeys(encoder_roles):
            _require(bool(adapter.paths.get(role)), f"module role {role!r} does not resolve")
            module = get_module(root, adapter.paths[role])
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, r=role: keep(r, adapter.encoder_tokens(r, out))))
        for role in OPTIONAL_MODEL_ROLES:
            if adapter.paths.get(role):
                hooks.append(get_module(root, adapter.paths[role]).register_forward_hook(
                    lambda mod, args, out, r=role: keep(r, out if isinstance(out, torch.Tensor) else out[0])))
        first = get_module(root, adapter.paths["layers"])[0]

        def layer_input(mod, args, kwargs):
            keep("layer0", args[0] if args else kwargs["hidden_states"])

        hooks.append(first.register_forward_pre_hook(layer_input, with_kwargs=True))
        try:
            self.run_module(ex)
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    # shapes and wiring -------------------------------------------------------------------------
    def hidden_shapes(self) -> str:
        model = self.model
        ex = self.prepare("interleaved")
        n, hidden = len(ex), model.hidden_size
        with torch.no_grad(), model.trace(ex):
            shapes = nnsight.save([(tuple(model.layers[i].input.shape), tuple(model.layers[i].output.shape))
                                   for i in range(model.num_layers)])
            norm = nnsight.save(tuple(model.final_norm.output.shape))
            logits = nnsight.save(tuple(model.logits.shape))
        for i, (inp, out) in enumerate(shapes):
            _require(inp == (1, n, hidden) and out == (1, n, hidden),
                     f"layer {i} input {inp} / output {out}, expected {(1, n, hidden)}")
        _require(norm == (1, n, hidden), f"final_norm output {norm}, expected {(1, n, hidden)}")
        vocab = get_module(model._module, self.adapter.paths["lm_head"]).weight.shape[0]
        _require(logits == (1, n, vocab), f"logits {logits}, expected (1, {n}, {vocab})")
        states = self.run_module(ex, output_hidden_states=True).hidden_states
        _require(len(states) == model.num_layers + 1,
                 f"HF output_hidden_states has {len(states)} entries, expected num_layers + 1 = {model.num_layers + 1}")
        return f"{model.num_layers} layers of (1, {n}, {hidden}); logits {logits}"

    def wiring(self) -> str:
        adapter, root = self.adapter, self.model._module
        ex = self.prepare("interleaved")
        # Plain hooks, not a trace: a wrong path may name a module that runs out of the expected order.
        seen: dict[str, torch.Tensor] = {}
        hooks = []

        def first_tensor(value: Any) -> torch.Tensor:
            return value if isinstance(value, torch.Tensor) else value[0]

        def record(key: str, module: torch.nn.Module, inputs: bool, outputs: bool) -> None:
            def pre(mod, args, kwargs):
                seen.setdefault(f"{key}.input", first_tensor(args) if args else kwargs.get("hidden_states",
                                                                                   next(iter(kwargs.values()))))

            def post(mod, args, out):
                seen.setdefault(f"{key}.output", first_tensor(out).detach().clone())

            if inputs:
                hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            if outputs:
                hooks.append(module.register_forward_hook(post))

        layers = get_module(root, adapter.paths["layers"])
        record("embed", get_module(root, adapter.paths["embed"]), False, True)
        for i, layer in enumerate(layers):
            record(f"layer{i}", layer, True, True)
        record("final_norm", get_module(root, adapter.paths["final_norm"]), True, True)
        record("lm_head", get_module(root, adapter.paths["lm_head"]), True, False)
        try:
            self.run_module(ex)
        finally:
            for hook in hooks:
                hook.remove()
        missing = [k for k in ("embed.output", "layer0.input", "final_norm.input", "lm_head.input") if k not in seen]
        _require(not missing, f"modules at {', '.join(k.split('.')[0] for k in missing)} did not run in the forward")
        text = ex.spans.text
        plain = torch.tensor([p for p in range(len(ex)) if p not in set(_visual(ex.spans).tolist())], dtype=torch.long)
        _require(torch.equal(seen["embed.output"][0, text], seen["layer0.input"][0, text]),
                 f"embed ({adapter.paths['embed']}) output is not layer 0's input at text positions")
        for i in range(len(layers) - 1):
            _require(torch.equal(seen[f"layer{i}.output"][0, plain], seen[f"layer{i + 1}.input"][0, plain]),
                     f"layer {i}'s output is not layer {i + 1}'s input (layers path {adapter.paths['layers']})")
        last = seen[f"layer{len(layers) - 1}.output"]
        _require(last.shape == seen["final_norm.input"].shape and torch.equal(last, seen["final_norm.input"]),
                 f"the last layer's output is not final_norm's input (final_norm path {adapter.paths['final_norm']})")
        _require(seen["final_norm.output"].shape == seen["lm_head.input"].shape
                 and torch.equal(seen["final_norm.output"], seen["lm_head.input"]),
                 f"final_norm's output is not lm_head's input (final_norm {adapter.paths['final_norm']}, "
                 f"lm_head {adapter.paths['lm_head']})")
        return "embed -> layers -> final_norm -> lm_head chain as the roles say"

    # attention ---------------------------------------------------------------------------------------
    def attention(self) -> str:
        model, adapter = self.model, self.adapter
        ex = self.prepare("interleaved_short")
        with torch.no_grad(), model.trace(ex):
            reads = []
            for i in range(model.num_layers):
                args, kwargs = adapter.attention_call(model.layers[i].self_attn).inputs
                scale = kwargs.get("scaling")
                reads.append((args[1], args[2], args[4] if len(args) > 4 else kwargs.get("attention_mask"),
                              scale if scale is not None else getattr(args[0], "scaling", None)))
            reads = nnsight.save(reads)
        with attention_implementation(model._module, "eager"):
            eager = self.run_module(ex, output_attentions=True).attentions
        _require(eager is not None and len(eager) == model.num_layers,
                 f"eager output_attentions gave {None if eager is None else len(eager)} layers, expected {model.num_layers}")
        worst_sum = worst = 0.0
        for i, (q, k, mask, scale) in enumerate(reads):
            _require(tuple(q.shape) == (1, model.num_heads, len(ex), adapter.head_dim),
                     f"layer {i}: query at the attention call has shape {tuple(q.shape)}, expected "
                     f"(1, {model.num_heads}, {len(ex)}, {adapter.head_dim})")
            _require(tuple(k.shape) == (1, adapter.num_kv_heads, len(ex), adapter.head_dim),
                     f"layer {i}: key at the attention call has shape {tuple(k.shape)}, expected "
                     f"(1, {adapter.num_kv_heads}, {len(ex)}, {adapter.head_dim})")
            probs = attention_from_qk(q, k, mask, float(scale) if scale is not None else adapter.head_dim ** -0.5)
            worst_sum = max(worst_sum, (probs.sum(-1) - 1).abs().max().item())
            worst = max(worst, (probs - eager[i].float()).abs().max().item())
            _require(worst_sum <= 1e-4, f"layer {i}: attention rows from q/k sum to 1 +- {worst_sum:.3g}")
            _require(worst <= self.atol, f"layer {i}: attention from post-rope q/k differs from eager attention by "
                                         f"{worst:.3g} (> {self.atol:g})")
        return f"rows sum to 1 (+-{worst_sum:.1e}); max |q/k softmax - eager| = {worst:.1e} over {len(reads)} layers"

    # interventions, batching, generation ------------------------------------------------------------
    def edit(self) -> str:
        model = self.model
        ex = self.prepare("interleaved")
        clean = self.clean_logits("interleaved")
        messages = []
        for name in ("video", "audio"):
            span = getattr(ex.spans, name)
            with torch.no_grad():
                with model.trace(ex):
                    model.layers[0].output[:, span] = 0
                    edited = model.logits.save()
            first = int(span.min())
            change = (edited[0, -1] - clean[0, -1]).abs().max().item()
            before = (edited[0, :first] - clean[0, :first]).abs().max().item() if first else 0.0
            _require(change > 1e-6, f"zeroing the {name} span at layer 0 leaves the last logits unchanged")
            _require(before <= 1e-6, f"zeroing the {name} span at layer 0 changed logits before the span (by {before:.3g})")
            messages.append(f"{name}: last-position change {change:.2g}")
        return "; ".join(messages)

    def batch(self) -> str:
        model = self.model
        a, b = self.prepare("interleaved"), self.prepare("interleaved_short")
        with torch.no_grad():
            with model.trace() as tracer:
                with tracer.invoke(a):
                    batch_a = model.logits.save()
                with tracer.invoke(b):
                    batch_b = model.logits.save()
        alone_a, alone_b = self.clean_logits("interleaved"), self.clean_logits("interleaved_short")
        errors = []
        for ex, batched, alone in ((a, batch_a, alone_a), (b, batch_b, alone_b)):
            errors.append((batched[0, :len(ex)] - alone[0]).abs().max().item())
        _require(max(errors) <= self.atol, f"batched logits differ from separate runs by {max(errors):.3g} "
                                           f"(lengths {len(a)} and {len(b)})")
        return f"lengths {len(a)} and {len(b)}: max difference {max(errors):.1e}"

    def generate(self) -> str:
        model = self.model
        ex = self.prepare("interleaved_short")
        with torch.no_grad():
            with model.generate(ex, max_new_tokens=2, do_sample=False) as tracer:
                ids = tracer.result.save()
        ids = torch.as_tensor(ids)
        _require(ids.shape[-1] > len(ex) and torch.equal(ids[0, :len(ex)], ex.input_ids[0]),
                 f"generate returned {tuple(ids.shape)} ids that do not start with the {len(ex)}-token prompt")
        return f"{ids.shape[-1] - len(ex)} new tokens after the prompt"


def _run(name: str, fn: Callable[[], str]) -> CheckResult:
    start = time.perf_counter()
    try:
        message, passed = fn(), True
    except _Fail as failure:
        message, passed = str(failure), False
    except Exception as error:  # a check that crashes fails, with the error named
        message, passed = f"{type(error).__name__}: {error}", False
    return CheckResult(name, passed, message, time.perf_counter() - start)


def check_adapter(
    model: "AVModel | torch.nn.Module",
    adapter: Any = None,
    processor: Any = None,
    checks: Sequence[str] | None = None,
    media: dict[str, Any] | None = None,
    atol: float = 1e-4,
    raise_on_failure: bool = False,
    **model_kwargs: Any,
) -> AdapterReport:
    """Validate the adapter of ``model`` on small synthetic inputs; returns an `AdapterReport`.

    ``model`` is an `AVModel`, or a bare ``torch.nn.Module`` together with an ``adapter``
    class and its ``processor`` (then a module role that does not resolve is reported as
    the ``roles`` failure instead of an exception). ``checks`` picks a subset of `CHECKS`;
    ``media`` replaces the synthetic clip (keys ``video``, ``audio``, ``image``,
    ``video_short``, ``audio_short``); ``raise_on_failure`` raises an `AdapterError` naming
    every failed check. Takes a few seconds on the tiny models.

    >>> import nnsight_av as nav
    >>> report = nav.testing.check_adapter(nav.testing.tiny_model(), checks=["roles", "tokens"])
    >>> [(c.name, c.passed) for c in report.checks]
    [('roles', True), ('tokens', True)]
    """
    from ..model import AVModel
    from ..validation import role_problems, token_problems

    wanted = list(CHECKS if checks is None else checks)
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(CHECKS)}")
    if not isinstance(model, AVModel):
        if adapter is None:
            raise AdapterError("check_adapter needs an AVModel, or a module together with adapter=...")
        name = getattr(adapter, "name", type(adapter).__name__)
        try:
            model = AVModel(model, adapter=adapter, processor=processor, **model_kwargs)
        except AdapterError as error:
            results = [CheckResult("roles", False, str(error))]
            results += [CheckResult(c, None, "not run: the adapter could not be built") for c in wanted if c != "roles"]
            report = AdapterReport(name, type(model).__name__, versions(), results)
            return report.raise_for_failures() if raise_on_failure else report
    checker = _Checker(model, {**_default_media(), **(media or {})}, atol)
    results: list[CheckResult] = []
    roles_ok = True
    for name in wanted:
        if name == "roles":
            result = _run(name, lambda: _problems_or_ok(role_problems(model), "every module role resolves"))
            roles_ok = bool(result.passed)
        elif name == "tokens":
            result = _run(name, lambda: _problems_or_ok(token_problems(model), "token ids agree with the tokenizer"))
        elif not roles_ok:
            result = CheckResult(name, None, "not run: module roles do not resolve")
        elif name.startswith("spans:"):
            result = _run(name, lambda kind=name.split(":", 1)[1]: checker.spans(kind))
        else:
            result = _run(name, getattr(checker, name))
        results.append(result)
    report = AdapterReport(model.adapter.name, model.checkpoint or type(model._module).__name__, versions(), results)
    return report.raise_for_failures() if raise_on_failure else report


def _problems_or_ok(problems: list[str], ok: str) -> str:
    if problems:
        raise _Fail("; ".join(problems))
    return ok


def status_table(reports: Sequence[AdapterReport]) -> str:
    """A markdown table: one row per report, with versions and the failed checks' names."""
    head = "| adapter | model | transformers | nnsight | torch | checks | result |\n|---|---|---|---|---|---|---|"
    rows = []
    for r in reports:
        ran = [c for c in r.checks if c.passed is not None]
        result = "all pass" if r.ok else "fails: " + ", ".join(c.name for c in r.checks if not c.passed)
        rows.append(f"| {r.adapter} | {r.model} | {r.versions.get('transformers')} | {r.versions.get('nnsight')} | "
                    f"{r.versions.get('torch')} | {sum(bool(c.passed) for c in ran)}/{len(r.checks)} | {result} |")
    return "\n".join([head] + rows)


def _main() -> None:  # pragma: no cover - prints the docs/adapters.md status table
    import warnings

    from .tiny import tiny_model, tiny_model_types

    warnings.filterwarnings("ignore")
    reports = []
    for model_type in tiny_model_types():
        report = check_adapter(tiny_model(model_type, seed=0))
        print(report, flush=True)
        reports.append(report)
    print(status_table(reports))


if __name__ == "__main__":  # pragma: no cover
    _main()
