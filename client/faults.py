"""TEST HOOK: make a chosen client misbehave, to test that the server survives bad clients.

Enabled only through ``federation.fault_injection = "PARTITION:MODE,…"`` (empty in every real config).
Modes: ``raise`` (the ClientApp raises), ``nan`` (a LoRA tensor full of NaN), ``huge`` (every LoRA tensor
multiplied by 1e6, less if its dtype would overflow: finite, valid, and far too large; what
``federation.max_update_norm*`` bounds), ``shape``
(a tensor with a wrong shape), ``keys`` (a tensor missing), ``no-examples`` (``num-examples`` = 0).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised by a client told to fail (``fault_injection`` mode ``raise``)."""


def corrupt_reply(
    mode: str | None, state: dict[str, torch.Tensor], metrics: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(state, metrics)`` corrupted as ``mode`` says (unchanged when ``mode`` is None)."""
    if mode is None:
        return state, metrics
    log.warning("fault injection: this client misbehaves with mode %r", mode)
    state, metrics = dict(state), dict(metrics)
    first = sorted(state)[0]
    if mode == "raise":
        raise InjectedFault("fault injection: this client was told to raise")
    if mode == "nan":
        state[first] = torch.full_like(state[first], float("nan"))
    elif mode == "huge":  # × 1e6, or less where that would overflow the wire dtype (float16: 65504)
        state = {k: v * min(1e6, 0.5 * torch.finfo(v.dtype).max / max(float(v.abs().max()), 1e-30))
                 for k, v in state.items()}
    elif mode == "shape":
        state[first] = torch.zeros(state[first].shape[0] + 1, *state[first].shape[1:], dtype=state[first].dtype)
    elif mode == "keys":
        del state[first]
    elif mode == "no-examples":
        metrics["num-examples"] = 0
    else:
        raise ValueError(f"unknown fault injection mode={mode!r}")
    return state, metrics
