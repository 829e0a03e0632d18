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
    assert main(["train", str(SMOKE), "--out", str(out), "--set", "train.max_steps=6", "--budget", "train"]) == 0
    summary = json.loads((out / "central.json").read_text())
    assert summary["train"]["steps"] == 6 and summary["train_examples"] > 0
    assert summary["budget"] == {"budget": "train"}
    assert summary["after"]["loss"] < summary["before"]["loss"]  # six steps on the training data help
    printed = capsys.readouterr().out
    assert f"after:  eval loss {summary['after']['loss']:.4f}" in printed and str(out / "adapter") in printed
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 6

    # no CONFIG: the adapter's own config.json (tiny-llama); the quickstart's SmolLM2 would not fit it
    assert main(["eval", "--adapter", str(out / "adapter")]) == 0
    captured = capsys.readouterr()
    assert f"config: {out / 'config.json'}" in captured.err
    assert json.loads(captured.out)["eval_loss"] == pytest.approx(summary["after"]["loss"], rel=1e-4)


def test_a_failed_rerun_leaves_the_earlier_adapter_whole_and_no_summary_for_it(tmp_path, capsys, monkeypatch):
    import torch
    from peft import PeftModel

    from devft.cli import main

    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    out = tmp_path / "central"
    args = ["train", str(SMOKE), "--out", str(out), "--set", "train.max_steps=2", "--budget", "train"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}

    def fails_half_way(self, directory, *a, **k):
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"torn")
        raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", fails_half_way)
    assert main(args + ["--set", "train.lr=0.01"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == before  # the earlier adapter, whole
    assert not (out / "central.json").exists()  # no summary that would pass the earlier adapter off as this run's
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.json"]  # no staging folder left


def test_train_gets_the_federated_runs_budget_by_default(tmp_path, capsys, monkeypatch):
    import torch

    from devft.cli import main

    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    out = tmp_path / "central"
    overrides = ["federation.num_rounds=3", "federation.clients_per_round=2", "train.max_steps=1",
                 "eval.generate=false"]
    assert main(["train", str(SMOKE), "--out", str(out), *[a for o in overrides for a in ("--set", o)]]) == 0
    summary = json.loads((out / "central.json").read_text())
    assert summary["budget"] == {"budget": "federated", "steps": 6, "num_rounds": 3, "clients_per_round": 2,
                                 "steps_per_client_call": 1}
    assert summary["train"]["steps"] == 6  # 3 rounds x 2 clients x 1 step, not one client call's 1
    assert "6 steps, the federated budget: 3 rounds x 2 clients x 1 steps" in capsys.readouterr().out


def test_the_federated_budget_under_epochs_is_the_mean_client_call():
    from devft.central import federated_budget
    from devft.config import load_config, parse_overrides

    config = load_config(SMOKE, parse_overrides(["train.max_steps=0", "train.epochs=1", "train.batch_size=4",
                                                 "federation.num_rounds=5", "federation.clients_per_round=2"]))
    # partitions of 10, 30 and 20 examples: 3, 8 and 5 batches of 4, a mean client call of 5.33 -> 5 steps
    assert federated_budget(config, [10, 30, 20]) == {"steps": 50, "num_rounds": 5, "clients_per_round": 2,
                                                      "steps_per_client_call": 5}


@pytest.mark.parametrize("steps", ["-1", "2.5"])
def test_train_refuses_a_bad_step_count(steps, tmp_path, capsys):
    from devft.cli import main

    assert main(["train", str(SMOKE), "--out", str(tmp_path / "x"), "--set", f"train.max_steps={steps}"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert not (tmp_path / "x" / "adapter").exists()
