"""Shared fixtures of the aggregation tests; Triton runs in its CPU interpreter when there is no GPU.

``TRITON_INTERPRET=1`` is set here, at collection time; devft's Triton backend reads it when called (and
Triton itself, if it is imported only after this). On a GPU machine it is left alone and the same Triton
tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run these tests on one intra-op thread: on a shared 2-core machine, torch's thread barriers under
    other people's load made a tiny model's training step 10-50x slower than single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
