"""Shared fixtures of the growth tests: tiny models, a fresh LoRA state, and an isolated submodel cache."""

from __future__ import annotations

import pytest
import torch

from devft.models import LoraSettings, attach_lora, load_model, lora_state


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, especially on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def isolated_submodel_cache(tmp_path, monkeypatch):
    """Built submodels go to a per-test folder, never to the user's cache."""
    root = tmp_path / "devft-cache"
    monkeypatch.setattr("devft.growth.submodel.cache_root", lambda: root)
    return root / "submodels"


def trained_like_lora(name: str, settings: LoraSettings, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA state of ``name`` whose B is random (as after training), deterministic for ``seed``."""
    state = lora_state(attach_lora(load_model(name).model, settings, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        k: (torch.randn(v.shape, generator=gen) * 0.05 if "lora_B" in k else v.clone()) for k, v in state.items()
    }


@pytest.fixture
def make_lora():
    """``make_lora(name, settings, seed)``: a LoRA state with random non-zero B for tiny model ``name``."""
    return trained_like_lora
