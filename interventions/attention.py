"""Attention primitives: `AttentionKnockout` and `AttentionBoost`, for any attention backend.

How they work without attention maps (and their exact biases): see
`interventions.attention_edits`, whose `apply_attention_edits` both runtimes call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from nnsight_av.errors import InputError

from .attention_edits import AttentionEdit, apply_attention_edits
from .base import Intervention, register_intervention
from .context import ApplyContext
from .engine import Op
from .params import real
from .selectors import normalize_selector, selector_to_json

if TYPE_CHECKING:
    from nnsight_av.model import AVModel

__all__ = ["AttentionKnockout", "AttentionBoost", "AttentionEdit", "apply_attention_edits"]


class _AttentionIntervention(Intervention):
    attention = True
    kind = ""

    def __init__(self, *, queries: Any = None, keys: Any = None, tokens: Any = None, layers: Any = None,
                 heads: Any = None, site: Any = None, sets: Mapping[str, Any] | None = None,
                 allow_empty: bool = False) -> None:
        if tokens is not None and keys is not None:
            raise InputError(f"{type(self).__name__}: pass keys= (tokens= is its alias), not both")
        keys = keys if keys is not None else tokens
        if keys is None:
            raise InputError(f"{type(self).__name__} needs keys= (the key columns, e.g. a sink set)")
        if site not in (None, "attn_logits"):
            raise InputError(f"{type(self).__name__} acts on the 'attn_logits' site, got site={site!r}")
        super().__init__(layers=layers, tokens=keys, site="attn_logits", heads=heads, sets=sets,
                         allow_empty=allow_empty)
        self.queries = normalize_selector(queries)

    @property
    def keys(self) -> Any:
        return self.site.tokens

    def compile(self, model: "AVModel", ctx: ApplyContext) -> list[Op]:
        heads = self._heads(model)
        return [Op(layer, "attn_call", self._op(heads), label=type(self).__name__)
                for layer in self.site.layer_indices(model)]

    def _op(self, heads: torch.Tensor | None):
        def run(ctx: ApplyContext) -> list[AttentionEdit]:
            queries = self._positions(ctx, self.queries)
            rows, _ = ctx.rows(queries)
            keys = self._positions(ctx, self.keys)
            if len(rows) == 0 or len(keys) == 0:
                return []
            return [AttentionEdit(self.kind, rows, ctx.keys(keys), heads, self.alpha_value())]

        return run

    def alpha_value(self) -> float:
        return 0.0

    def params(self) -> dict[str, Any]:
        base = super().params()
        out = {"queries": selector_to_json(self.queries), "keys": base.pop("tokens"), "layers": base["layers"],
               "heads": base["heads"]}
        for name in ("sets", "allow_empty"):
            if name in base:
                out[name] = base[name]
        return out


@register_intervention
class AttentionKnockout(_AttentionIntervention):
    """Block attention from ``queries`` to ``keys`` (information-flow knockout).

    >>> AttentionKnockout(queries="text", keys="video", layers=range(2, 4)).to_dict()["keys"]
    'video'
    """

    kind = "knockout"


@register_intervention
class AttentionBoost(_AttentionIntervention):
    """Raise attention from ``queries`` to ``keys`` by ``alpha``.

    ``mode="pre_softmax"`` (default, METHOD.md section 6): ``a <- a + alpha * |a|`` on the
    logits of the selected pairs. ``mode="multiplicative"``: the selected keys' probabilities
    times ``1 + alpha``, each row renormalised (``alpha >= -1``; ``-1`` is a knockout).
    """

    modes = ("pre_softmax", "multiplicative")

    def __init__(self, *, queries: Any = None, keys: Any = None, alpha: float = 0.2, mode: str = "pre_softmax",
                 **kwargs: Any) -> None:
        super().__init__(queries=queries, keys=keys, **kwargs)
        if not isinstance(mode, str) or mode not in self.modes:
            raise InputError(f"AttentionBoost mode must be one of {self.modes}, got {mode!r}")
        alpha = real(alpha, "AttentionBoost alpha")
        if mode == "multiplicative" and alpha < -1:
            raise InputError(f"multiplicative AttentionBoost needs alpha >= -1 (probabilities stay >= 0), got {alpha}")
        self.alpha, self.mode = alpha, mode
        self.kind = mode

    def alpha_value(self) -> float:
        return self.alpha

    def params(self) -> dict[str, Any]:
        return {**super().params(), "alpha": self.alpha, "mode": self.mode}
