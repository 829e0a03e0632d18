"""The GPU check's preflight (run by gpu_check.sh before anything else): versions, CUDA usable by torch, and
a tiny Triton kernel compiled and run. Exits non-zero, saying why, when either fails.

A file, not a heredoc: ``@triton.jit`` reads the kernel's source from its file, which code fed to
``python3 -`` does not have.
"""

from __future__ import annotations

import os
import sys
import sysconfig

import numpy
import torch
import triton
import triton.language as tl


@triton.jit
def _add_one(x, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x + i, tl.load(x + i, mask=i < n) + 1.0, mask=i < n)


def main() -> int:
    print("numpy", numpy.__version__, "torch", torch.__version__, "triton", triton.__version__, "cuda",
          torch.version.cuda)
    print("Python.h:", os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
    print(f"preflight: Triton kernel {_add_one.fn.__name__} defined")  # @triton.jit found its source
    if not torch.cuda.is_available():
        print("preflight: torch sees no CUDA device (driver or CUDA build mismatch?); nothing else would mean "
              "anything", file=sys.stderr)
        return 1
    x = torch.zeros(1000, device="cuda")
    _add_one[(4,)](x, 1000, BLOCK=256)  # Triton builds its launcher with a C compiler on first use
    torch.cuda.synchronize()
    if not bool((x == 1).all()):
        print("preflight: the tiny Triton kernel ran but computed the wrong result", file=sys.stderr)
        return 1
    print("preflight: CUDA and a compiled Triton kernel work on", torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())
