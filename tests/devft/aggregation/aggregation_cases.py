"""Inputs and independent formulas shared by the aggregation tests (not a test module)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

# the native backend is built with the machine's C compiler: without one, its cases are skipped, saying why
HAS_C_COMPILER = bool(os.environ.get("CC")) or any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))
needs_c_compiler = pytest.mark.skipif(not HAS_C_COMPILER, reason="no C compiler: the native backend cannot be built")
NATIVE = pytest.param("native", marks=needs_c_compiler)

# (d_in, d_out) of the seven adapted projections of a SmolLM2-135M layer
SMOLLM2_MODULES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}


def lora_key(layer: int, module: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.{module}.{part}.weight"


def random_lora(
    layers: int, rank: int, modules: dict[str, tuple[int, int]], seed: int, dtype: torch.dtype = torch.float32,
    scale: float = 0.05,
) -> dict[str, torch.Tensor]:
    """A LoRA state with peft keys: A (r, d_in) and B (d_out, r), both random (a trained-looking state)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for module, (d_in, d_out) in modules.items():
            out[lora_key(layer, module, "lora_A")] = (scale * torch.randn(rank, d_in, generator=g)).to(dtype)
            out[lora_key(layer, module, "lora_B")] = (scale * torch.randn(d_out, rank, generator=g)).to(dtype)
    return out


SMALL_MODULES = {"self_attn.q_proj": (24, 24), "self_attn.k_proj": (24, 8), "mlp.down_proj": (40, 24)}


# (dtype, atol, rtol): the result is the fp32 (fp64) sum rounded once to the input dtype
TOLERANCES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.float16, 1e-3, 2e-3),
    (torch.bfloat16, 1e-2, 1.6e-2),
    (torch.float64, 1e-12, 1e-12),
]

# name → (clients, shapes)
CASES = {
    "non_power_of_two": (5, [(37, 19), (1001,), (3, 5, 7)]),
    "single_client": (1, [(64, 8), (8, 64)]),
    "many_tiny_tensors": (7, [(1 + i % 3,) if i % 2 else (2, 1 + i % 4) for i in range(300)]),
    "lora_like": (3, [(4, 24), (24, 4), (4, 40), (8, 4)]),
    # runs long enough for the torch backend to accumulate in place rather than stage (ACCUMULATE_MIN_RUN)
    "long_runs": (3, [(300, 701), (5,), (140001,)]),
}


def make_updates(clients: int, shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {f"t{i}": torch.randn(shape, generator=g).to(dtype) for i, shape in enumerate(shapes)}
        for _ in range(clients)
    ]


def independent(updates, weights) -> dict[str, torch.Tensor]:
    """Stack in fp64 and contract with the weights: no loop shared with any implementation."""
    w = torch.tensor(weights, dtype=torch.float64)
    return {
        key: torch.einsum("k,k...->...", w, torch.stack([u[key].double().cpu() for u in updates]))
        for key in updates[0]
    }


def weights_for(clients: int) -> list[float]:
    return [0.5 + 0.37 * k - (0.9 if k == 2 else 0.0) for k in range(clients)]  # one negative weight


def mixed_dtype_updates(clients: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Updates with an fp16, an fp32 and an fp64 key each (clipping takes one norm over all of them)."""
    out = []
    for u in make_updates(clients, [(6, 5), (9,), (4, 4)], torch.float32, seed=seed):
        out.append({"t0": u["t0"].half(), "t1": u["t1"], "t2": u["t2"].double()})
    return out


def clipped_expectation(updates, weights, clip):
    norms = [sum(float(v.double().pow(2).sum()) for v in u.values()) ** 0.5 for u in updates]
    factors = [min(1.0, clip / n) for n in norms]
    assert min(factors) < 0.2 and max(factors) == 1.0  # one client clipped, one not
    return independent(updates, [w * f for w, f in zip(weights, factors)])
