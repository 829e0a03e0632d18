"""Growth on a model on a CUDA device (gpu-marked: run by simulations/bench/gpu_check.sh): similarity, fusion
(through the Triton weighted sum) and the submodel cache give what the CPU gives, on the model's device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devft.growth import GrowthSettings, build_submodel, calibration_batch, layer_similarity, make_plan
from devft.models import LoraSettings, load_model

SETTINGS = LoraSettings(r=4, alpha=8.0)

pytestmark = pytest.mark.gpu


def test_similarity_and_submodels_of_a_cuda_model_match_the_cpu(make_lora):
    cpu, gpu = load_model("tiny-llama"), load_model("tiny-llama")
    gpu.model.cuda()
    state = make_lora("tiny-llama", SETTINGS)  # on the CPU, as the server holds it
    batch = calibration_batch(cpu.tokenizer, num_sequences=4, max_length=24)
    for view in ("cka", "hidden", "update-cka", "flat", "module"):
        on_cpu = layer_similarity(cpu.model, view, lora=state, lora_scale=SETTINGS.scale, calibration=batch)
        on_gpu = layer_similarity(gpu.model, view, lora=state, lora_scale=SETTINGS.scale, calibration=batch)
        np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4, err_msg=view)
    plan = make_plan(cpu.model, 0, 4, GrowthSettings(grouping="even", beta=0.3))  # groups of 2: fused
    expected = build_submodel(cpu.model, plan, use_cache=False)
    ids = cpu.tokenizer("The fox 12+30=42 jumps", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = expected(input_ids=ids).logits
        for _ in range(2):  # fused on the device (Triton), then read from the cache onto the device
            sub = build_submodel(gpu.model, plan)
            assert {p.device.type for p in sub.parameters()} == {"cuda"}
            torch.testing.assert_close(sub(input_ids=ids.cuda()).logits.cpu(), want, atol=2e-4, rtol=1e-3)
