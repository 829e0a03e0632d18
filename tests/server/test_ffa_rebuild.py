"""FFA-LoRA's A is shared and never trained: clients rebuild it from the seed and the stage plans, so only B
travels down (design.md §3), and they train exactly as when the server sends A."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord

from server.checkpoint import load_checkpoint


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _a_bytes(config, layers: int) -> int:
    """Wire bytes of the submodel's A (every module of a smoke layer: r × d_in)."""
    hidden, inter = 64, 128  # tiny-llama: d_in of q, k, v, o, gate, up is the hidden size, of down the MLP's
    itemsize = 2 if config.federation.wire_dtype == "float16" else 4
    return itemsize * config.lora.r * (6 * hidden + inter) * layers


CASES = {
    "devft": ({}, [4, 4, 8, 8]),
    "progfed": ({"federation.method": "progfed"}, [4, 4, 8, 8]),
    # three stages: the history the clients replay holds two plans
    "devft-3-stages": ({"growth.capacities": [2, 4, 8], "federation.num_rounds": 3}, [2, 4, 8]),
    # float16 on the wire: the rebuilt A is rounded as a sent one would be
    "devft-float16": ({"federation.wire_dtype": "float16"}, [4, 4, 8, 8]),
    # the clients' evaluation of the submodel (rounds 2 and 4) rebuilds A too
    "devft-client-eval": ({"federation.client_eval": True}, [4, 4, 8, 8]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ffa_clients_rebuild_a_and_train_exactly_as_when_it_is_sent(smoke_config, run_inprocess, tmp_path, case):
    overrides, layers = CASES[case]
    runs = {}
    for rebuild in (True, False):
        config = smoke_config(**{k.replace(".", "__"): v for k, v in overrides.items()},
                              federation__aggregation="ffa", federation__rebuild_frozen=rebuild)
        out = tmp_path / f"rebuild-{rebuild}"
        run_inprocess(config, out)
        runs[rebuild] = (config, out)
    (config, fast), (_, slow) = runs[True], runs[False]
    rebuilt, sent = _rows(fast), _rows(slow)
    assert [r["submodel_layers"] for r in rebuilt] == layers
    for a, b in zip(rebuilt, sent):
        assert a["clients_ok"] == b["clients_ok"] == 2
        assert a["train_loss"] == b["train_loss"] and a.get("eval_loss") == b.get("eval_loss"), a["round"]
        assert a.get("client_eval_loss") == b.get("client_eval_loss")
        # per message: A's bytes and their manifest entries (packed format, < 128 bytes a key), less the plans
        # and the digest that travel instead (a few kB); train and evaluate messages alike
        a_bytes, a_keys = _a_bytes(config, a["submodel_layers"]), 7 * a["submodel_layers"]
        for part in ("train", "eval"):
            messages = 2 if part == "train" else (2 if a["eval_bytes_down"] else 0)
            down = (lambda r: r["bytes_down"] - r["eval_bytes_down"]) if part == "train" else (lambda r: r["eval_bytes_down"])
            saved = down(b) - down(a)
            assert messages * (a_bytes - 4096) <= saved <= messages * (a_bytes + 128 * a_keys), (a["round"], part)
    if config.federation.client_eval:
        assert [r["client_eval_clients"] for r in rebuilt if "client_eval_loss" in r] == [2, 2]
    full, reference = load_checkpoint(fast / "checkpoint")["full_lora"], load_checkpoint(slow / "checkpoint")["full_lora"]
    assert all(torch.equal(full[k], reference[k]) for k in reference)


def test_a_resumed_run_rebuilds_a_from_the_plans_it_kept(smoke_config, run_inprocess, tmp_path):
    # three stages of two rounds; stopped mid-stage (after round 3) and at a stage boundary (after round 4),
    # each time resumed by a fresh client process: every client rebuilds A and the run ends where an
    # uninterrupted one ends
    from client.runtime import clear_process_caches

    config = smoke_config(federation__aggregation="ffa", growth__capacities=[2, 4, 8], federation__num_rounds=6,
                          federation__eval_every=6)

    class Killed(Exception):
        pass

    def kill_after(n):
        def hook(row):
            if row["round"] == n:
                raise Killed
        return hook

    run_inprocess(config, tmp_path / "whole")
    for n in (3, 4):
        with pytest.raises(Killed):
            run_inprocess(config, tmp_path / "stopped", on_round=[kill_after(n)], **({"resume": True} if n == 4 else {}))
        clear_process_caches()
    run_inprocess(config, tmp_path / "stopped", resume=True)
    whole, stopped = _rows(tmp_path / "whole"), _rows(tmp_path / "stopped")
    assert [r["clients_ok"] for r in stopped] == [2] * 6 and [r["submodel_layers"] for r in stopped] == [2, 2, 4, 4, 8, 8]
    assert [r["train_loss"] for r in stopped] == [r["train_loss"] for r in whole]
    # after each resume A still stays on the clients (the plans came back with the checkpoint)
    assert all(abs(r["bytes_down"] - w["bytes_down"]) < 64 for r, w in zip(stopped, whole))
    assert stopped[-1]["eval_loss"] == whole[-1]["eval_loss"]
    plans = load_checkpoint(tmp_path / "stopped" / "checkpoint")["plans"]
    assert [json.loads(p)["capacity"] for p in json.loads(plans)] == [2, 4, 8]


def test_a_client_whose_rebuilt_a_differs_is_a_named_failure(smoke_config, run_inprocess, tmp_path, monkeypatch):
    import client.runtime

    real = client.runtime.initial_frozen

    def drifted(config, rule):  # another machine's last bit
        return {k: torch.nextafter(v, torch.full_like(v, 2.0)) for k, v in real(config, rule).items()}

    monkeypatch.setattr(client.runtime, "initial_frozen", drifted)
    config = smoke_config(federation__aggregation="ffa", federation__num_rounds=2, federation__eval_every=2)
    out = tmp_path / "run"
    run_inprocess(config, out)
    for row in _rows(out):  # the model keeps its state; every client says why
        assert row["clients_ok"] == 0 and len(row["failures"]) == 2
        assert all("differ from the server's" in f["reason"] and "rebuild_frozen = false" in f["reason"]
                   for f in row["failures"])


def test_rebuilding_needs_factor_wise_fusion_and_known_plans(smoke_config, private_env, tmp_path):
    from devft.growth import GrowthPlan, untrained_lora_for_plan
    from server.global_model import GlobalModel
    from server.run_dir import RunDirectory
    from server.strategy import DevFTStrategy, RunState

    config = smoke_config(federation__aggregation="ffa")
    model = GlobalModel(config, test=[])
    full = model.initial_lora()
    planned = model.plan(0, full)
    svd_plan = GrowthPlan.from_dict({**json.loads(planned.plan.to_json()), "lora_fusion": "svd"})
    with pytest.raises(ValueError, match="lora_fusion='svd'"):
        untrained_lora_for_plan(full, [], svd_plan)

    state = RunState(round=0, full_lora=full)
    payload = state.to_payload(config)
    assert RunState.from_payload(payload).plans == []
    payload.pop("plans")  # a checkpoint written before the plans were kept
    old = RunState.from_payload(payload)
    assert old.plans is None
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.prepare(resume=False)
    strategy = DevFTStrategy(config, run_dir, model)
    strategy.state = old
    strategy._start_stage(0)
    assert not strategy._clients_rebuild_frozen() and strategy._frozen_config() == {}  # A is sent
    strategy.state = RunState(round=0, full_lora=full)
    strategy._start_stage(0)
    assert strategy._clients_rebuild_frozen() and json.loads(strategy._frozen_config()["plan-history"]) == []
    # a caller's own initial A (``start(initial_arrays=...)``) is not what clients draw from the seed: sent
    own = {k: 0.5 * v if ".lora_A." in k else v for k, v in full.items()}
    strategy._initialise(ArrayRecord(own))
    assert strategy.state.plans is None
    strategy._initialise(ArrayRecord({k: v.clone() for k, v in full.items()}))  # the seeded A after all: rebuilt
    assert strategy.state.plans == []


@pytest.mark.slow
def test_ffa_on_the_default_pretrained_model_rebuilds_a_through_two_stages(run_inprocess, tmp_path):
    # SmolLM2-135M: 30 layers grouped and fused into a 15-layer then a 30-layer submodel; the clients rebuild
    # A from a copy of their base model and the server's plans, and train as when A is sent
    from conftest import REPO

    from devft.config import load_config

    overrides = {"federation.aggregation": "ffa", "federation.num_rounds": 2, "federation.clients_per_round": 1,
                 "federation.eval_every": 2, "growth.num_stages": 2, "train.max_steps": 1, "data.num_train": 64,
                 "data.num_test": 8, "eval.generate": False}
    finals = {}
    for rebuild in (True, False):
        config = load_config(REPO / "simulations" / "configs" / "quickstart.toml",
                             {**overrides, "federation.rebuild_frozen": rebuild})
        out = tmp_path / f"rebuild-{rebuild}"
        run_inprocess(config, out)
        rows = _rows(out)
        assert [r["clients_ok"] for r in rows] == [1, 1]
        finals[rebuild] = (rows, load_checkpoint(out / "checkpoint")["full_lora"])
    (rebuilt, full), (sent, reference) = finals[True], finals[False]
    assert [r["submodel_layers"] for r in rebuilt] == [15, 30]
    assert [r["train_loss"] for r in rebuilt] == [r["train_loss"] for r in sent]
    assert rebuilt[-1]["eval_loss"] == sent[-1]["eval_loss"]
    assert all(torch.equal(full[k], reference[k]) for k in reference)
    # B is 5184 of a layer's 10176 LoRA elements: about half the downlink
    for a, b in zip(rebuilt, sent):
        assert 0.49 < a["bytes_down"] / b["bytes_down"] < 0.53
