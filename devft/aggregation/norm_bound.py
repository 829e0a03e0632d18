"""Norm bounding of client updates: measure how far each reply moved, scale outliers back onto a ball.

The defence of Sun et al., "Can You Really Backdoor Federated Learning?" (2019), the server-side fixed
clipping of DP-FedAvg (McMahan et al., ICLR 2018) without the noise: a reply whose update is longer than a
bound ``C`` is replaced by ``origin + (C / ‖update‖) · update`` before the rule aggregates it, so no single
client can move the global model by more than its weight times ``C``. Replies within the bound are passed
on untouched (no copy).

What "update" means follows the rule (:meth:`~devft.aggregation.base.AggregationRule.update_norms`):

- rules whose clients start from the server's tensors (fedit, ffa, fedsa, fedex, svd): the uploaded LoRA
  factors minus those the client received, ``‖x_k − o_k‖₂`` over all uploaded tensors together;
- flora, whose clients start from fresh LoRA (B = 0) every round: the update folded into the model,
  ``(Σ_modules ‖s B_k A_k‖_F²)^{1/2}``; scaling ``B_k`` by ``c`` scales that product by ``c``.

The bound is ``max_norm`` (absolute), ``ratio × median`` of the round's update norms (relative: no need to
know the scale of a model's updates; the lower median, so that with two replies the smaller one sets it,
of the clients that moved at all, so that clients that did not train cannot make the bound 0),
or the smaller of the two when both are set. Norms are taken from the wire values (float32 per block,
float64 across blocks).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from devft.aggregation.kernels import client_sq_norms
from devft.aggregation.sources import as_sources

if TYPE_CHECKING:  # base.py imports this module
    from devft.aggregation.base import AggregationRule, ServerState


def distances(updates: Sequence[Any], origin: Mapping[str, torch.Tensor], backend: str = "auto",
              threads: int | None = None) -> list[float]:
    """``‖x_k − o‖₂`` of each update over every key of ``origin`` together, in one pass over the replies
    (the fused kernels' staging; float32 norms per 4 MiB block summed in float64, good to a few 1e-6
    relative; a block whose float32 norm overflows is redone in float64; ``inf`` where a difference
    itself overflows float32)."""
    if not updates:
        return []
    return client_sq_norms(updates, keys=list(origin), origin=origin, backend=backend, threads=threads).sqrt().tolist()


def moved_towards(source: Any, origins: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Every tensor of ``source``, those in ``origins`` replaced by ``o + factor · (x − o)`` (``x``'s dtype);
    with ``factor`` 0, by ``o`` itself, also where ``x`` holds an Inf (0 · Inf would be NaN)."""
    out = {}
    for key in source.keys():
        x = source.tensor(key)
        if key in origins:
            o = origins[key].to(device=x.device, dtype=torch.float64)
            moved = o.expand_as(x) if factor == 0 else o + factor * (x.double() - o)
            x = moved.to(x.dtype).clone(memory_format=torch.contiguous_format)
        out[key] = x
    return out


def round_bound(norms: Sequence[float], max_norm: float = 0.0, ratio: float = 0.0) -> float | None:
    """The bound of a round from its update norms: ``max_norm``, ``ratio ×`` the lower median of the
    non-zero finite norms, or the smaller; ``None`` when neither is set (0) or applies (no client moved)."""
    check_bound_settings(max_norm, ratio)
    bounds = []
    if max_norm > 0:
        bounds.append(float(max_norm))
    moved = [n for n in norms if 0 < n < math.inf]  # who did not move, or sent Inf/NaN, says nothing of the scale
    if ratio > 0 and moved:
        bounds.append(float(ratio) * statistics.median_low(moved))
    return min(bounds) if bounds else None


def check_bound_settings(max_norm: float, ratio: float, prefix: str = "") -> None:
    """Refuse a negative/non-finite ``max_norm`` or a ``ratio`` that is neither 0 (off) nor a finite >= 1."""
    if isinstance(max_norm, bool) or not (isinstance(max_norm, int | float) and math.isfinite(max_norm)
                                          and max_norm >= 0):
        raise ValueError(f"{prefix}max_update_norm must be a finite number >= 0 (0: no bound), got "
                         f"max_update_norm={max_norm!r}")
    if isinstance(ratio, bool) or not (isinstance(ratio, int | float) and math.isfinite(ratio)
                                       and (ratio == 0 or ratio >= 1)):
        raise ValueError(f"{prefix}max_update_norm_ratio must be 0 (off) or a finite number >= 1 (bound = ratio × "
                         f"the round's median update norm), got max_update_norm_ratio={ratio!r}")


@dataclass
class BoundedUpdates:
    """The replies after norm bounding, with what was measured."""

    updates: list[Any]  # the replies as given, or {key: tensor} for those scaled back
    norms: list[float]  # ‖update‖ of each reply before bounding
    scales: list[float]  # the factor applied to each update (1.0: untouched)
    bound: float | None  # the bound of this round (None: no bound set)

    @property
    def clipped(self) -> list[int]:
        """Indices of the replies that were scaled back."""
        return [i for i, c in enumerate(self.scales) if c < 1.0]


def bound_updates(rule: AggregationRule, state: ServerState, updates: Sequence[Any], *, max_norm: float = 0.0,
                  ratio: float = 0.0) -> BoundedUpdates:
    """Measure every reply's update against ``state`` (what the clients started from) and scale back those
    longer than the round's bound (:func:`round_bound`). An update of infinite length is scaled to 0:
    the client then contributes exactly what it received. A NaN norm (of an update holding NaN or Inf;
    the server refuses those before it bounds) counts as infinite, and infinite norms never set a ratio
    bound, so whenever a bound is set such an update is scaled to 0."""
    sources = as_sources(updates)
    norms = [math.inf if math.isnan(n) else n for n in rule.update_norms(state, sources)]
    bound = round_bound(norms, max_norm, ratio)
    out, scales = list(updates), [1.0] * len(norms)
    if bound is not None:
        for i, (src, norm) in enumerate(zip(sources, norms)):
            if norm > bound:
                scales[i] = bound / norm  # 0.0 for an infinite norm
                out[i] = rule.scale_update(state, src, scales[i])
    return BoundedUpdates(updates=out, norms=norms, scales=scales, bound=bound)
