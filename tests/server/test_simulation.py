"""Real Flower simulations with the Ray backend on tiny-llama, each in a subprocess that is cleaned up.

- a 2-stage DevFT run, which must end with the same adapter, bit for bit, as the in-process run;
- a FedIT run in which one client always raises;
- a run killed (SIGKILL, with its Ray) after its round-2 checkpoint, resumed, compared bit for bit with an
  uninterrupted run;
- DevFT with FedSA-LoRA, whose clients keep their own full-model B on their disk across the stages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from simulation_helpers import ray_pids, run, simulate_cmd, start, stop

from server.checkpoint import load_checkpoint

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.toml"


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a_dir, b_dir):
    a, b = adapter(a_dir), adapter(b_dir)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_devft_two_stages_on_ray_matches_the_in_process_run(private_env, devft_run, tmp_path):
    out = tmp_path / "ray"
    code = run(simulate_cmd(SMOKE, out), private_env, tmp_path / "log.txt")
    assert code == 0, (tmp_path / "log.txt").read_text()[-3000:]
    table = rows(out)
    assert [(r["round"], r["stage"], r["submodel_layers"]) for r in table] == [(1, 0, 4), (2, 0, 4), (3, 1, 8), (4, 1, 8)]
    assert all(r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in table)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["train_flops"] > 0 for r in table)
    for name in ("summary.json", "config.json", "report.md", "adapter/adapter_config.json", "checkpoint/state.pt"):
        assert (out / name).exists(), name
    assert not ray_pids(private_env["RAY_TMPDIR"])

    _, reference, _ = devft_run  # the same config run on the in-process grid
    assert_same_adapter(out, reference)
    assert [r["train_loss"] for r in rows(reference)] == [r["train_loss"] for r in table]


def test_fedit_on_ray_survives_a_client_that_always_raises(private_env, tmp_path):
    out = tmp_path / "ray"
    sets = {"federation.method": "fedit", "federation.clients_per_round": 4, "federation.num_rounds": 3,
            "federation.fault_injection": "2:raise", "federation.eval_every": 3,
            "federation.client_cpus": 2}  # one Ray actor: enough here, and cheaper on a 2-core machine
    code = run(simulate_cmd(SMOKE, out, sets), private_env, tmp_path / "log.txt")
    assert code == 0, (tmp_path / "log.txt").read_text()[-3000:]
    table = rows(out)
    assert [r["submodel_layers"] for r in table] == [8, 8, 8]
    for r in table:
        assert (r["clients_sampled"], r["clients_ok"], r["clients_failed"], r["aggregated"]) == (4, 3, 1, True)
        # the client's own exception, read out of Ray's wrapper (colours, tracebacks) into one line
        assert r["failures"][0] == {"partition": 2, "reason": "client raised: InjectedFault: fault injection: "
                                                              "partition 2 was told to raise"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedit" and summary["totals"]["clients_failed"] == 3
    assert summary["final"]["eval_loss"] is not None
    assert not ray_pids(private_env["RAY_TMPDIR"])


def test_resume_after_kill_ends_with_the_same_adapter(private_env, run_inprocess, smoke_config, tmp_path):
    sets = {"federation.num_rounds": 6, "federation.client_cpus": 2}
    out = tmp_path / "killed"
    proc = start(simulate_cmd(SMOKE, out, sets), private_env, tmp_path / "killed.txt")
    try:
        deadline = time.monotonic() + 240
        checkpointed = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "checkpoint" / "state.pt").exists():
                try:
                    checkpointed = load_checkpoint(out / "checkpoint")["round"]
                except Exception:  # noqa: BLE001 - being replaced right now; read it again
                    checkpointed = 0
                if checkpointed >= 2:
                    break
            time.sleep(0.05)
    finally:
        stop(proc, private_env)  # SIGKILL to the run and its Ray
    assert checkpointed >= 2, (tmp_path / "killed.txt").read_text()[-3000:]
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    assert not ray_pids(private_env["RAY_TMPDIR"])

    code = run(simulate_cmd(SMOKE, out, sets, resume=True), private_env, tmp_path / "resumed.txt")
    assert code == 0, (tmp_path / "resumed.txt").read_text()[-3000:]
    assert [r["round"] for r in rows(out)] == list(range(1, 7))

    run_inprocess(smoke_config(federation__num_rounds=6), tmp_path / "uninterrupted")
    assert_same_adapter(out, tmp_path / "uninterrupted")  # bitwise, not to a tolerance


def test_invalid_config_fails_before_ray_starts(private_env, smoke_config, tmp_path):
    import ray

    from devft.config import load_config
    from server.launch import simulate

    config = smoke_config(growth__num_stages=9)  # valid on its own; too many stages for 8 layers
    with pytest.raises(ValueError, match=r"growth.num_stages=9"):
        simulate(config, tmp_path / "bad")
    assert not ray.is_initialized()
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match=r"partitions \[9\], but data.num_clients=4"):
        simulate(smoke_config(federation__fault_injection="9:raise"), tmp_path / "bad")
    with pytest.raises(ValueError, match=r"federation.aggregation='flora' with federation.method='devft'"):
        simulate(smoke_config(federation__aggregation="flora"), tmp_path / "bad")
    assert not ray.is_initialized()
    with pytest.raises(ValueError, match=r"fault_injection='1:explode'"):
        load_config(SMOKE, {"federation.fault_injection": "1:explode"})
    with pytest.raises(ValueError, match=r"clients_per_round=9"):
        load_config(SMOKE, {"federation.clients_per_round": 9})


def test_fedsa_with_devft_on_ray_keeps_each_clients_full_model_b(private_env, tmp_path):
    import math

    from client.runtime import load_personal

    out = tmp_path / "ray"
    sets = {"federation.aggregation": "fedsa", "federation.client_cpus": 2}
    code = run(simulate_cmd(SMOKE, out, sets), private_env, tmp_path / "log.txt")
    assert code == 0, (tmp_path / "log.txt").read_text()[-3000:]
    table = rows(out)
    assert [(r["stage"], r["submodel_layers"]) for r in table] == [(0, 4), (0, 4), (1, 8), (1, 8)]
    assert all(r["clients_ok"] == 2 and r["aggregated"] for r in table)
    assert all(math.isfinite(r["eval_loss"]) for r in table if r["round"] % 2 == 0)  # eval_every = 2
    key = load_checkpoint(out / "checkpoint")["client_state_key"]
    b_keys = {k for k in adapter(out) if ".lora_B." in k}
    trained = sorted({p for r in table for p in r["sampled_partitions"]})
    states = [load_personal(key, pid, 5) for pid in trained]
    assert len(trained) >= 2 and all(set(s.full) == b_keys for s in states)
    some = sorted(b_keys)[0]
    assert not torch.equal(states[0].full[some], states[1].full[some])
    assert not ray_pids(private_env["RAY_TMPDIR"])


@pytest.mark.slow
def test_compare_over_seeds_runs_real_simulations_and_pairs_them(private_env, tmp_path):
    """``devft compare --seeds`` end to end: FedIT against DevFT on tiny-llama with seeds 0 and 1, every run a
    real Flower simulation. A seed is one federation for both configs (the same clients sampled each round);
    two seeds are two federations; the table pairs the configs seed by seed."""
    import sys

    out = tmp_path / "cmp"
    fedit = tmp_path / "smoke_fedit.toml"
    fedit.write_text(f'extends = "{SMOKE}"\n[federation]\nmethod = "fedit"\n')
    cmd = [sys.executable, "-m", "devft.cli", "compare", str(SMOKE), str(fedit), "--out", str(out),
           "--seeds", "0", "1", "--set", "federation.client_cpus=2"]
    code = run(cmd, private_env, tmp_path / "log.txt", timeout=600)
    assert code == 0, (tmp_path / "log.txt").read_text()[-3000:]
    sampled = {(name, seed): [r["sampled_partitions"] for r in rows(out / name / f"seed-{seed}")]
               for name in ("smoke", "smoke_fedit") for seed in (0, 1)}
    assert sampled[("smoke", 0)] == sampled[("smoke_fedit", 0)] and sampled[("smoke", 1)] == sampled[("smoke_fedit", 1)]
    assert sampled[("smoke", 0)] != sampled[("smoke", 1)]
    for seed in (0, 1):
        config = json.loads((out / "smoke" / f"seed-{seed}" / "config.json").read_text())
        assert config["federation"]["seed"] == config["train"]["seed"] == seed and config["data"]["seed"] == 0
    finals = {(name, seed): json.loads((out / name / f"seed-{seed}" / "summary.json").read_text())["final"]["eval_loss"]
              for name in ("smoke", "smoke_fedit") for seed in (0, 1)}
    table = (out / "comparison.md").read_text()
    diffs = ", ".join(f"{s}: {finals[('smoke_fedit', s)] - finals[('smoke', s)]:+.4f}" for s in (0, 1))
    paired_row = [line for line in table.splitlines() if diffs in line]
    assert len(paired_row) == 1 and paired_row[0].startswith("| smoke_fedit | 2 | "), table
    assert (out / "plots" / "eval_loss_vs_bytes.png").exists()
    assert not ray_pids(private_env["RAY_TMPDIR"])
