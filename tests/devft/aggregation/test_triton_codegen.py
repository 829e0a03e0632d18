"""What the Triton kernel compiles to for an H100/H200 (sm_90), checked without a GPU.

Triton compiles ahead of time for a named target with its bundled LLVM and ``ptxas``, so the machine code
the GPU would run can be read here: the loads and stores that carry the bandwidth must be 128-bit when the
host found every address and length aligned, and must stay element-wise when it did not (a wrong
alignment promise would fault or read the wrong bytes)."""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from devft.aggregation.kernels import triton_wsum  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
POINTERS = ["ptrs", "weights", "out", "block_run", "block_start", "sizes", "out_offsets", "flags", "proto"]


def compile_sm90(dtype: str, vec: int, *, check_finite: bool = False, block: int = 2048, num_warps: int = 4,
                 unroll: int = 1):
    """The kernel as the runtime would compile it for 16-byte-aligned tensor arguments on sm_90."""
    fn = JITFunction(triton_wsum._weighted_sum_kernel)
    acc = "fp64" if dtype == "fp64" else "fp32"
    signature = {"ptrs": "*i64", "weights": f"*{acc}", "out": f"*{acc}", "block_run": "*i64",
                 "block_start": "*i64", "sizes": "*i64", "out_offsets": "*i64", "flags": "*i32",
                 "proto": f"*{dtype}", "n_clients": "i32", "n_runs": "i32", "BLOCK": "constexpr",
                 "CHECK_FINITE": "constexpr", "VEC": "constexpr", "UNROLL": "constexpr"}
    assert list(signature) == fn.arg_names, "the kernel's parameters changed: update this signature"
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in POINTERS}
    constexprs = {"BLOCK": block, "CHECK_FINITE": check_finite, "VEC": vec, "UNROLL": unroll}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=aligned), target=SM90,
                          options={"num_warps": num_warps})


def data_ops(ptx: str, op: str, width: str) -> int:
    """Count of ``op`` (ld/st.global) instructions that move ``width``-bit elements, vector or scalar."""
    return len(re.findall(rf"\b{op}\.global(?:\.v\d)?\.b{width}\b", ptx))


VECTOR = {"fp32": ("v4.b32", 4), "fp16": ("v4.b32", 8), "bf16": ("v4.b32", 8), "fp64": ("v2.b64", 2)}


@pytest.mark.parametrize("check_finite", [False, True])
@pytest.mark.parametrize("dtype", sorted(VECTOR))
def test_aligned_inputs_move_16_bytes_per_instruction(dtype, check_finite):
    kernel = compile_sm90(dtype, VECTOR[dtype][1], check_finite=check_finite)
    ptx, suffix = kernel.asm["ptx"], VECTOR[dtype][0]
    # 2048 elements / 128 threads = 16 per thread: 64 bytes of fp32 per client = four 16-byte loads
    per_thread_bytes = 2048 // 128 * {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}[dtype]
    assert ptx.count(f"ld.global.{suffix}") == per_thread_bytes // 16
    out_bytes = 2048 // 128 * (8 if dtype == "fp64" else 4)  # the output is in the accumulation dtype
    assert ptx.count(f"st.global.{suffix}") == out_bytes // 16
    assert len(kernel.asm["cubin"]) > 0  # ptxas accepted it for sm_90


def test_unaligned_inputs_stay_element_wise():
    ptx = compile_sm90("fp32", 1).asm["ptx"]
    assert "ld.global.v" not in ptx and "st.global.v" not in ptx
    assert data_ops(ptx, "st", "32") == 16  # one 4-byte store per element of the thread's 16


@pytest.mark.parametrize("unroll", [2, 4])
def test_unrolled_clients_issue_all_their_loads_in_one_step(unroll):
    ptx = compile_sm90("fp32", 4, unroll=unroll).asm["ptx"]
    assert ptx.count("ld.global.v4.b32") == 4 * unroll
