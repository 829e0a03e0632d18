"""``devft simulate`` and ``devft compare`` around the run itself: an earlier run is never lost to a new
one that fails, bad ``--out`` paths and stale ``--reuse`` runs are refused before anything runs."""

from __future__ import annotations

import json

import pytest
from conftest import SMOKE

from devft.config import config_to_dict


def fake_run(path, summary: bool = True) -> None:
    """The files of a run directory (contents are beside the point)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text('{"round": 1}\n')
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    if summary:
        (path / "summary.json").write_text('{"rounds": 1}')


def test_an_earlier_run_survives_a_new_run_that_fails(smoke_config, private_env, tmp_path, monkeypatch):
    import flwr.simulation

    from server.launch import PREVIOUS_RUN, simulate

    out = tmp_path / "run"
    fake_run(out)
    (out / "notes.txt").write_text("mine")  # not devft's: never moved

    def ray_fails(**kwargs):
        raise RuntimeError("ray failed to start")

    monkeypatch.setattr(flwr.simulation, "run_simulation", ray_fails)
    with pytest.raises(RuntimeError, match="ray failed to start"):
        simulate(smoke_config(), out, progress=False)
    aside = out / PREVIOUS_RUN
    assert (aside / "summary.json").read_text() == '{"rounds": 1}'
    assert (aside / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not (out / "summary.json").exists() and (out / "notes.txt").read_text() == "mine"


def test_set_aside_keeps_the_last_complete_run(tmp_path):
    from server.launch import PREVIOUS_RUN, drop_previous_run, set_aside_previous_run
    from server.run_dir import RunDirectory

    out = tmp_path / "run"
    assert set_aside_previous_run(RunDirectory(out)) is None  # nothing there
    fake_run(out)
    aside = set_aside_previous_run(RunDirectory(out))
    assert aside == out / PREVIOUS_RUN and (aside / "summary.json").exists() and not (out / "metrics.jsonl").exists()
    fake_run(out, summary=False)  # a new run interrupted before its end
    assert set_aside_previous_run(RunDirectory(out)) == aside
    assert (aside / "summary.json").exists() and not (out / "metrics.jsonl").exists()  # the partial one is gone
    fake_run(out)  # a complete run replaces the set-aside one
    (out / "summary.json").write_text('{"rounds": 2}')
    set_aside_previous_run(RunDirectory(out))
    assert (aside / "summary.json").read_text() == '{"rounds": 2}'
    drop_previous_run(aside)
    assert not aside.exists()


def test_out_that_is_a_file_is_refused_before_anything_runs(smoke_config, private_env, tmp_path):
    from server.launch import simulate

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        simulate(smoke_config(), target, progress=False)
    assert target.read_text() == "mine"


def test_compare_reuse_refuses_a_run_of_another_config(smoke_config, private_env, tmp_path, capsys):
    from devft.cli import main

    out = tmp_path / "cmp"
    fake_run(out / SMOKE.stem)
    (out / SMOKE.stem / "config.json").write_text(json.dumps(config_to_dict(smoke_config())))
    code = main(["compare", str(SMOKE), "--out", str(out), "--reuse", "--set", "lora.r=2"])
    assert code == 2
    assert "was run with another config" in capsys.readouterr().err

    # a run written before a config key existed ran with its default: it is the same config
    older = config_to_dict(smoke_config())
    del older["federation"]["max_update_norm"], older["federation"]["max_update_norm_ratio"]
    (out / SMOKE.stem / "config.json").write_text(json.dumps(older))
    assert main(["compare", str(SMOKE), "--out", str(out), "--reuse"]) == 0
    assert f"reusing {out / SMOKE.stem}" in capsys.readouterr().out
    assert main(["compare", str(SMOKE), "--out", str(out), "--reuse", "--set", "federation.max_update_norm=2"]) == 2


def test_eval_of_an_adapter_for_another_model_names_the_mismatch(smoke_config, private_env, tmp_path, capsys):
    from devft.cli import main
    from devft.models import LoraSettings, attach_lora, load_model

    other = attach_lora(load_model("tiny-gpt2").model, LoraSettings(r=4))  # the smoke config runs tiny-llama
    other.save_pretrained(tmp_path / "adapter")
    assert main(["eval", str(SMOKE), "--adapter", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert "does not load onto model.name='tiny-llama'" in err and "not found in the base model" in err
