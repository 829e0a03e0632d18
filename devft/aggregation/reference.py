"""Pure-PyTorch reference of the one primitive every aggregation rule and DBLF fusion is built on."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_sum_reference(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Return ``Σ_k weights[k] · tensors[k]``, accumulated in fp32, in the dtype of ``tensors[0]``.

    All tensors must have the same shape; ``len(weights) == len(tensors) >= 1``.
    """
    if len(tensors) == 0:
        raise ValueError("weighted_sum needs at least one tensor, got 0")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != len(tensors):
        raise ValueError(f"weighted_sum got {len(tensors)} tensors but {w.numel()} weights")
    shape = tensors[0].shape
    acc = torch.zeros(shape, dtype=torch.float32, device=tensors[0].device)
    for k, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"weighted_sum tensor {k} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        acc += float(w[k]) * t.to(torch.float32)
    return acc.to(tensors[0].dtype)
