"""Sink dimensions and sink tokens (METHOD.md section 2).

- ``phi(h) = |h / sqrt(mean_j h_j^2 + 1e-6)|``: a weightless RMS norm, float32, elementwise abs.
- Sink dimensions: channels where the first token's ``phi`` is orders of magnitude above
  the median channel at middle and late layers, consistently across inputs
  (`find_sink_dims`; adapters list known ones, e.g. Qwen2.5-Omni-7B -> [458, 2570]).
- Token ``t`` is a sink at layer ``l`` iff ``max over sink dims d of phi(h_{l,t})_d > tau``,
  with ``h_{l,t}`` the input of decoder layer ``l`` (``l = 0..L-1``) on the clean prefill
  (criterion ``"phi"``, the paper's). ``phi`` can never exceed ``sqrt(hidden)`` (its squares add
  up to the hidden size), so a small model needs its own rule: criterion ``"magnitude"`` marks
  ``t`` when ``max over d of |h_{l,t,d}|`` is more than ``tau`` times the median of that value
  over the input's tokens at that layer (massive activations as in Sun et al. 2024, measured
  against the ordinary token; docs/sinks.md gives the per-layer fractions it marks).
- Global sinks: the ``K = int(T / k_divide)`` positions that are sinks in the most layers
  (ties: earlier first sink layer, then smaller position); kept text positions are then
  dropped and still use up ``K`` (the authors' behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from interventions.runtime.prefill import run_prefill
from nnsight_av.batching import as_list, progress_batches
from nnsight_av.errors import AdapterError, InputError
from nnsight_av.spans import MODALITY_CODES

from .results import JsonResult
from .plots import plot_sink_mask

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from nnsight_av import AVInputs, AVModel

__all__ = ["phi", "sink_scores", "sink_mask", "SINK_CRITERIA", "first_token_phi", "find_sink_dims", "resolve_sink_dims", "select_global_sinks",
           "SinkResult", "find_sinks", "RMS_EPS"]

RMS_EPS = 1e-6
#: How a token's score at a layer becomes "sink or not" (see the module docstring).
SINK_CRITERIA = ("phi", "magnitude")
_CODE_MODALITY = {v: k for k, v in MODALITY_CODES.items()}


def phi(h: Float[torch.Tensor, "... hidden"]) -> Float[torch.Tensor, "... hidden"]:
    """Weightless RMS norm ``|h / sqrt(mean(h^2) + 1e-6)|`` in float32.

    >>> [round(x, 5) for x in phi(torch.tensor([-3.0, 4.0])).tolist()]  # rms = sqrt(12.5)
    [0.84853, 1.13137]
    """
    h = h.float()
    return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)).abs()


def check_criterion(criterion: str) -> str:
    if criterion not in SINK_CRITERIA:
        raise InputError(f"unknown sink criterion {criterion!r}; known: {', '.join(SINK_CRITERIA)}")
    return criterion


def sink_scores(h: Float[torch.Tensor, "... hidden"], dims: Sequence[int],
                criterion: str = "phi") -> Float[torch.Tensor, "..."]:
    """Per-token score at one layer: ``max over d in dims of phi(h)_d`` (``"phi"``, without
    materialising ``phi`` for every channel) or of ``|h_d|`` (``"magnitude"``; `sink_mask` then
    divides by the median token).

    >>> h = torch.tensor([[1.0, 1.0, 10.0, 1.0]])
    >>> bool(torch.isclose(sink_scores(h, [2]), phi(h)[:, 2]).all())
    True
    >>> sink_scores(h, [2, 3], "magnitude").tolist()
    [10.0]
    """
    if not dims:
        return torch.zeros(h.shape[:-1], dtype=torch.float32, device=h.device)
    if criterion == "magnitude":
        return torch.stack([h[..., int(d)] for d in dims], -1).float().abs().amax(-1)
    ms = torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32).pow(2) / h.shape[-1]
    # Integer indexing keeps views: an index tensor built from a list would be a host-to-device copy per call.
    picked = torch.stack([h[..., int(d)] for d in dims], -1).float().abs()
    return (picked / torch.sqrt(ms + RMS_EPS)[..., None]).amax(-1)


def sink_mask(scores: Float[torch.Tensor, "layer seq"], tau: float,
              criterion: str = "phi") -> Bool[torch.Tensor, "layer seq"]:
    """Which (layer, token) pairs are sinks: ``scores > tau`` (``"phi"``), or ``scores`` above
    ``tau`` times the layer's median token (``"magnitude"``; ``scores`` of one input, no padding).

    >>> scores = torch.tensor([[400.0, 2.0, 1.0, 1.5], [3.0, 2.0, 1.0, 1.5]])
    >>> sink_mask(scores, 20.0, "magnitude").int().tolist()
    [[1, 0, 0, 0], [0, 0, 0, 0]]
    """
    if criterion == "magnitude":
        median = scores.median(-1, keepdim=True).values.clamp(min=1e-12)
        return scores > tau * median
    return scores > tau


def _default_dim_layers(num_layers: int) -> list[int]:
    """Middle and late layers: from a third of the depth to the last layer input."""
    return list(range(max(1, num_layers // 3), num_layers)) if num_layers > 1 else [0]


def first_token_phi(
    model: "AVModel",
    inputs: "AVInputs | Sequence[AVInputs]",
    layers: Sequence[int] | None = None,
    *,
    progress: bool = True,
) -> Float[torch.Tensor, "batch layer hidden"]:
    """``phi`` of the first token's residual input at ``layers`` (default: middle and late), per input."""
    items, _ = as_list(inputs)
    layer_list = _default_dim_layers(model.num_layers) if layers is None else [model.check_layer(l) for l in layers]
    out = []
    for chunk in progress_batches(items, 1, progress, "sink dims"):
        # Kept on the device during the forward (no sync per layer), moved once it is over.
        found, _ = run_prefill(model, chunk, residual_layers=layer_list, on_residual=lambda layer, h: phi(h[:, 0]))
        out.append(torch.stack([found[l][0].cpu() for l in layer_list]))
    return torch.stack(out)


def find_sink_dims(
    model: "AVModel",
    inputs: "AVInputs | Sequence[AVInputs]",
    top: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    ratio: float = 100.0,
    consistency: float = 0.5,
    progress: bool = True,
) -> list[int]:
    """Massive-activation channels of the first token, found from data.

    For each input and each layer in ``layers`` (default: from a third of the depth to the
    last), a channel passes if the first token's ``phi`` there is at least ``ratio`` times
    the median over channels. Channels passing in at least ``consistency`` of the
    (input, layer) pairs are ranked by their median ratio; the ``top`` strongest
    (default: every channel that passes; the criterion decides, not a cap) are returned in
    ascending channel order. Known defaults of an adapter:
    ``model.adapter.known_sink_dims()``; `resolve_sink_dims` picks between them.

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(text="What is making the sound?")
    >>> find_sink_dims(model, ex)  # random weights have no massive activations
    []
    """
    if top is not None and top < 1:
        raise InputError(f"top must be a positive int or None, got {top}")
    if ratio <= 1:
        raise InputError(f"ratio must be above 1 (a channel's phi over the median), got {ratio}")
    values = first_token_phi(model, inputs, layers, progress=progress)           # [N, L, H]
    ratios = values / values.median(-1, keepdim=True).values.clamp(min=1e-12)
    passing = (ratios >= ratio).float().flatten(0, 1).mean(0)                     # [H]
    strength = ratios.flatten(0, 1).median(0).values
    candidates = torch.nonzero(passing >= consistency).flatten().tolist()
    candidates.sort(key=lambda d: (-float(strength[d]), d))
    chosen = candidates if top is None else candidates[:top]
    return sorted(int(d) for d in chosen)


def resolve_sink_dims(
    model: "AVModel",
    dims: Sequence[int] | None = None,
    inputs: "AVInputs | Sequence[AVInputs] | None" = None,
) -> list[int]:
    """Sink dimensions to use: ``dims`` if given, else the adapter's known ones, else found from ``inputs``.

    >>> import nnsight_av as nav
    >>> resolve_sink_dims(nav.testing.tiny_model(), [3, 1])
    [1, 3]
    """
    hidden = model.hidden_size
    if dims is not None:
        dims = [int(d) for d in dims]
        bad = [d for d in dims if not 0 <= d < hidden]
        if bad:
            raise InputError(f"sink dims {bad} are out of range for hidden size {hidden}")
        return sorted(set(dims))
    known = model.adapter.known_sink_dims()
    if known:
        return sorted(int(d) for d in known)
    if inputs is None:
        raise AdapterError(f"adapter {model.adapter.name!r} knows no sink dims for hidden size {hidden}: pass dims=, "
                           "or inputs to find them (find_sink_dims)")
    return find_sink_dims(model, inputs, progress=False)


def select_global_sinks(
    mask: Bool[torch.Tensor, "layer seq"],
    k: int,
) -> Int[torch.Tensor, "sinks"]:
    """The ``k`` positions that are sinks in the most layers, in rank order.

    Only positions that are a sink somewhere are eligible (so fewer than ``k`` may come
    back, e.g. when ``k`` exceeds the sequence). Ties: the earlier first sink layer (row
    of ``mask``) wins, then the smaller position.

    >>> mask = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    >>> select_global_sinks(mask, 3).tolist()  # counts 2, 2, 0, 2; first layers 1, 0, -, 0
    [1, 3, 0]
    """
    if k < 0:
        raise InputError(f"the number of global sinks must be >= 0, got {k}")
    counts = mask.sum(0)
    layers = mask.shape[0]
    first = torch.where(mask.any(0), mask.float().argmax(0), torch.full_like(counts, layers))
    eligible = torch.nonzero(counts > 0).flatten()
    if eligible.numel() == 0 or k == 0:
        return torch.zeros(0, dtype=torch.long)
    # One integer key, lexicographic in (count desc, first layer asc, position asc).
    length = mask.shape[1]
    key = (-counts[eligible]) * (layers + 1) * length + first[eligible] * length + eligible
    order = torch.argsort(key, stable=True)
    return eligible[order][:k].cpu()


@dataclass
class SinkResult(JsonResult):
    """Per-layer sink scores of one input and its global sinks.

    ``scores[i, t] = max over dims of phi(h_{layers[i], t})`` (criterion ``"phi"``, ``mask =
    scores > tau``) or of ``|h|`` (``"magnitude"``, ``mask``: above ``tau`` times the median token).
    Global sinks: ``K = int(length / k_divide)`` (or ``k``), see `select_global_sinks`.
    ``positions`` holds the kept media positions (video, audio, image), ``video`` /
    ``audio`` split them, ``dropped_text`` lists the kept text positions that were
    dropped (they still use up ``K``). Re-threshold cheaply with `with_params`.
    """

    scores: Float[torch.Tensor, "layer seq"]
    layers: list[int]
    dims: list[int]
    tau: float
    k_divide: float = 2.0
    modality: str = ""            # one character per position: V video, A audio, I image, . text
    k: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    criterion: str = "phi"

    def __post_init__(self) -> None:
        check_criterion(self.criterion)
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).cpu()
        if self.scores.dim() != 2:
            raise InputError(f"scores must be [layer, token], got shape {tuple(self.scores.shape)}")
        if self.k_divide <= 0:
            raise InputError(f"k_divide must be positive, got {self.k_divide}")
        if self.modality and len(self.modality) != self.scores.shape[1]:
            raise InputError(f"modality has {len(self.modality)} labels for {self.scores.shape[1]} tokens")
        self._cache: dict[str, torch.Tensor] = {}

    # -- derived -----------------------------------------------------------------
    @property
    def length(self) -> int:
        return int(self.scores.shape[1])

    @property
    def mask(self) -> Bool[torch.Tensor, "layer seq"]:
        return sink_mask(self.scores, self.tau, self.criterion)

    @property
    def counts(self) -> Int[torch.Tensor, "seq"]:
        """In how many layers each position is a sink."""
        return self.mask.sum(0)

    @property
    def first_layer(self) -> Int[torch.Tensor, "seq"]:
        """The first layer (index into ``layers``' values) where each position is a sink; -1 if never."""
        mask = self.mask
        idx = mask.float().argmax(0)
        first = torch.tensor(self.layers, dtype=torch.long)[idx]
        return torch.where(mask.any(0), first, torch.full_like(first, -1))

    @property
    def K(self) -> int:
        return int(self.k) if self.k is not None else int(self.length / self.k_divide)

    @property
    def ranked(self) -> Int[torch.Tensor, "sinks"]:
        """The ``K`` global sinks in rank order, text positions included."""
        if "ranked" not in self._cache:
            self._cache["ranked"] = select_global_sinks(self.mask, self.K)
        return self._cache["ranked"]

    def modality_of(self, positions: torch.Tensor | None = None) -> list[str]:
        """Modality label ("video", "audio", "image", "text") of every position, or of ``positions``."""
        codes = self.codes if positions is None else self.codes[np.asarray(positions, dtype=np.int64)]
        return [_CODE_MODALITY[chr(c)] for c in codes]

    @property
    def codes(self) -> np.ndarray:
        """The modality string as a uint8 array (one ASCII code per position)."""
        if "codes" not in self._cache:
            text = self.modality or "." * self.length
            self._cache["codes"] = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        return self._cache["codes"]

    def _kept(self, which: set[str]) -> torch.Tensor:
        ranked = self.ranked
        wanted = np.array([ord(MODALITY_CODES[m]) for m in which], dtype=np.uint8)
        keep = ranked.numpy()[np.isin(self.codes[ranked.numpy()], wanted)]
        return torch.from_numpy(np.sort(keep)).long()

    @property
    def positions(self) -> Int[torch.Tensor, "sinks"]:
        """Kept global sinks of a media modality, sorted by position."""
        return self._kept({"video", "audio", "image"})

    @property
    def video(self) -> Int[torch.Tensor, "sinks"]:
        return self._kept({"video"})

    @property
    def audio(self) -> Int[torch.Tensor, "sinks"]:
        return self._kept({"audio"})

    @property
    def dropped_text(self) -> Int[torch.Tensor, "sinks"]:
        return self._kept({"text"})

    def with_params(self, tau: float | None = None, k_divide: float | None = None,
                    k: int | None | str = "keep") -> "SinkResult":
        """The same scores with another ``tau`` / ``k_divide`` / ``k`` (no forward pass)."""
        return SinkResult(self.scores, list(self.layers), list(self.dims), self.tau if tau is None else float(tau),
                          self.k_divide if k_divide is None else float(k_divide), self.modality,
                          self.k if k == "keep" else k, dict(self.meta), self.criterion)

    # -- views -------------------------------------------------------------------
    def to_frame(self) -> "pd.DataFrame":
        """One row per kept global sink (text included), in rank order."""
        import pandas as pd

        ranked = self.ranked.tolist()
        counts, first = self.counts, self.first_layer
        labels = self.modality_of()
        return pd.DataFrame({
            "rank": list(range(len(ranked))),
            "position": ranked,
            "modality": [labels[p] for p in ranked],
            "layers_as_sink": [int(counts[p]) for p in ranked],
            "first_sink_layer": [int(first[p]) for p in ranked],
            "kept": [labels[p] != "text" for p in ranked],
        })

    def facts(self) -> dict[str, Any]:
        """The headline numbers as a dict (what `summary` holds as one row)."""
        return {"length": self.length, "layers": len(self.layers), "dims": self.dims, "tau": self.tau,
                "criterion": self.criterion,
                "K": self.K, "sink_positions_any_layer": int((self.counts > 0).sum()),
                "kept": int(self.positions.numel()), "video": int(self.video.numel()),
                "audio": int(self.audio.numel()), "dropped_text": int(self.dropped_text.numel())}

    def summary(self) -> "pd.DataFrame":
        """One row: length, layers, dims, tau, K and how many sinks of each modality were kept."""
        import pandas as pd

        return pd.DataFrame([self.facts()])

    def __repr__(self) -> str:
        s = self.facts()
        dims = s["dims"] if len(s["dims"]) <= 6 else f"[{len(s['dims'])} channels]"
        return (f"SinkResult(T={s['length']}, layers={s['layers']}, dims={dims}, tau={s['tau']:g}, K={s['K']}, "
                f"video={s['video']}, audio={s['audio']}, dropped_text={s['dropped_text']})")

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in self.facts().items())
        head = self.to_frame().head(20).to_html(index=False)
        return f"<b>SinkResult</b><table>{rows}</table>{head}"

    def plot(self, **kwargs: Any) -> "Figure":
        """Sink mask heatmap (layer x token) with modality bands; see `analyses.plots.plot_sink_mask`."""
        return plot_sink_mask(self, **kwargs)

    # -- persistence -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": "SinkResult", "version": 1, "scores": [[round(float(v), 5) for v in row]
                                                                for row in self.scores.tolist()],
                "layers": list(self.layers), "dims": list(self.dims), "tau": self.tau, "k_divide": self.k_divide,
                "modality": self.modality, "k": self.k, "meta": self.meta, "criterion": self.criterion}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SinkResult":
        return cls(torch.tensor(data["scores"], dtype=torch.float32).reshape(len(data["layers"]), -1),
                   data["layers"], data["dims"], data["tau"], data["k_divide"], data["modality"], data["k"],
                   data.get("meta", {}), data.get("criterion", "phi"))


def modality_codes(item: "AVInputs") -> str:
    """One character per position: V video, A audio, I image, . text (as ``AVInputs.layout()``)."""
    codes = np.full(len(item), ord("."), dtype=np.uint8)
    for name in ("video", "audio", "image"):
        codes[item.spans.get(name).numpy()] = ord(MODALITY_CODES[name])
    return codes.tobytes().decode("ascii")


def check_k(k_divide: float, k: int | None) -> None:
    """An `InputError` unless ``k_divide`` (N) is positive and ``k`` is None or >= 0."""
    if not k_divide > 0:
        raise InputError(f"k_divide (N in K = int(T / N)) must be positive, got {k_divide}")
    if k is not None and k < 0:
        raise InputError(f"k must be >= 0, got {k}")


def find_sinks(
    model: "AVModel",
    inputs: "AVInputs | Sequence[AVInputs]",
    dims: Sequence[int] | None = None,
    tau: float | None = None,
    k_divide: float = 2,
    *,
    k: int | None = None,
    layers: Sequence[int] | None = None,
    criterion: str | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> "SinkResult | list[SinkResult]":
    """Per-layer sink mask and global sinks of each input (one prefill per batch, no logits).

    ``dims``: sink dimensions (default: the adapter's known ones, else found from these
    inputs with `find_sink_dims`, which costs one more pass). ``tau``: threshold (default
    ``model.adapter.tau()``). ``k_divide``: N in ``K = int(T / N)``; ``k`` overrides K.
    ``layers``: which layer inputs enter the count (default: all, ``0..L-1``). ``criterion``:
    ``"phi"`` or ``"magnitude"`` (default ``model.adapter.sink_criterion()``; module docstring).

    >>> import nnsight_av as nav
    >>> model = nav.testing.tiny_model()
    >>> ex = model.prepare(audio=nav.testing.synthetic_tone(1.0), text="What is making the sound?")
    >>> res = find_sinks(model, ex, dims=[0], tau=1e9)   # nothing crosses tau
    >>> res.positions.tolist(), res.mask.shape == (4, len(ex))
    ([], True)
    """
    items, single = as_list(inputs)
    check_k(k_divide, k)
    dims = resolve_sink_dims(model, dims, items)
    tau = float(model.adapter.tau() if tau is None else tau)
    criterion = check_criterion(model.adapter.sink_criterion() if criterion is None else criterion)
    layer_list = list(range(model.num_layers)) if layers is None else sorted({model.check_layer(l) for l in layers})
    results: list[SinkResult] = []
    for chunk in progress_batches(items, batch_size, progress, "sinks"):
        found, _ = run_prefill(model, chunk, residual_layers=layer_list,
                               on_residual=lambda layer, h: sink_scores(h, dims, criterion))
        found = {l: found[l].cpu() for l in layer_list}          # after the forward: no sync per layer
        for i, item in enumerate(chunk):
            scores = torch.stack([found[l][i, :len(item)] for l in layer_list])
            results.append(SinkResult(scores, layer_list, list(dims), tau, float(k_divide), modality_codes(item), k,
                                      criterion=criterion))
    return results[0] if single else results
