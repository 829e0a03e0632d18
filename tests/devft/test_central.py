"""`devft train`: centralised LoRA training on all clients' data (the upper bound), then `devft eval` of its
adapter with the run's own config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.toml"


def test_train_then_eval_its_adapter(tmp_path, capsys, monkeypatch):
    import torch

    from devft.cli import main

    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    out = tmp_path / "central"
    assert main(["train", str(SMOKE), "--out", str(out), "--set", "train.max_steps=6"]) == 0
    summary = json.loads((out / "central.json").read_text())
    assert summary["train"]["steps"] == 6 and summary["train_examples"] > 0
    assert summary["after"]["loss"] < summary["before"]["loss"]  # six steps on the training data help
    printed = capsys.readouterr().out
    assert f"after:  eval loss {summary['after']['loss']:.4f}" in printed and str(out / "adapter") in printed
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 6

    # no CONFIG: the adapter's own config.json (tiny-llama); the quickstart's SmolLM2 would not fit it
    assert main(["eval", "--adapter", str(out / "adapter")]) == 0
    captured = capsys.readouterr()
    assert f"config: {out / 'config.json'}" in captured.err
    assert json.loads(captured.out)["eval_loss"] == pytest.approx(summary["after"]["loss"], rel=1e-4)


@pytest.mark.parametrize("steps", ["-1", "2.5"])
def test_train_refuses_a_bad_step_count(steps, tmp_path, capsys):
    from devft.cli import main

    assert main(["train", str(SMOKE), "--out", str(tmp_path / "x"), "--set", f"train.max_steps={steps}"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert not (tmp_path / "x" / "adapter").exists()
