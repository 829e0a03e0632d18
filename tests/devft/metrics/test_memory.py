"""Peak memory of a block: the sampler sees a transient allocation; a CPU process is never given a CUDA context."""

import time

import pytest
import torch

from devft.metrics.memory import PeakMemory, current_rss_mb


def test_the_peak_holds_an_allocation_freed_inside_the_block():
    before = current_rss_mb()
    with PeakMemory(interval=0.005) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        # held until the sampler has seen it (a loaded machine may not run the sampler thread for a while: CI's
        # 2 cores, shared with a simulation, once left it unscheduled for all of a 50 ms sleep); 10 s at most
        deadline = time.monotonic() + 10.0
        while memory.peak_rss_mb < before + 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        del block
    assert memory.peak_rss_mb >= before + 60
    assert current_rss_mb() < memory.peak_rss_mb - 30  # freed again: only the sampler saw it


def test_a_process_that_never_used_cuda_is_not_given_a_context(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine whose clients train on CPU
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for name in ("reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("CUDA statistics asked for"))
    with PeakMemory() as memory:
        pass
    assert memory.peak_cuda_mb == 0.0
