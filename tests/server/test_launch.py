"""``devft simulate`` and ``devft compare`` around the run itself: an earlier run is never lost to a new
one that fails, bad ``--out`` paths and stale ``--reuse`` runs are refused before anything runs."""

from __future__ import annotations

import json

import pytest
from conftest import SMOKE

from devft.config import config_to_dict


def fake_run(path, summary: bool = True, checkpoint_round: int = 1, overrides: dict | None = None) -> None:
    """The files of a run directory of the smoke config (with ``overrides``); their contents are beside the
    point, bar the checkpoint's config and round, which ``--resume`` checks before it starts anything."""
    from devft.config import config_to_flat, load_config
    from server.checkpoint import save_checkpoint

    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text('{"round": 1}\n')
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    config = load_config(SMOKE, overrides)
    save_checkpoint(path / "checkpoint", {"config": json.dumps(config_to_flat(config)), "round": checkpoint_round})
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


def test_set_aside_keeps_the_last_complete_and_the_last_interrupted_run(tmp_path):
    from server.launch import PREVIOUS_PARTIAL, PREVIOUS_RUN, drop_previous_runs, set_aside_previous_run
    from server.run_dir import RunDirectory

    out = tmp_path / "run"
    directory = RunDirectory(out)
    assert set_aside_previous_run(directory) == []  # nothing there
    fake_run(out)
    complete, partial = out / PREVIOUS_RUN, out / PREVIOUS_PARTIAL
    assert set_aside_previous_run(directory) == [complete]
    assert (complete / "summary.json").exists() and not (out / "metrics.jsonl").exists()
    fake_run(out, summary=False)  # a new run interrupted before its end: its checkpoint is kept too
    assert set_aside_previous_run(directory) == [complete, partial]
    assert (complete / "summary.json").exists() and (partial / "checkpoint" / "state.pt").exists()
    assert not (out / "metrics.jsonl").exists()
    fake_run(out)  # a complete run replaces the set-aside complete one
    (out / "summary.json").write_text('{"rounds": 2}')
    set_aside_previous_run(directory)
    assert (complete / "summary.json").read_text() == '{"rounds": 2}' and partial.exists()
    drop_previous_runs(directory)
    assert not complete.exists() and not partial.exists()


def test_an_interrupted_run_that_got_further_is_never_pushed_out_by_one_that_failed_early(tmp_path):
    from server.launch import PREVIOUS_PARTIAL, set_aside_previous_run
    from server.run_dir import RunDirectory

    out = tmp_path / "run"
    directory = RunDirectory(out)
    fake_run(out, summary=False)
    (out / "metrics.jsonl").write_text("".join(f'{{"round": {r}}}\n' for r in range(1, 16)))  # 15 rounds run
    set_aside_previous_run(directory)
    partial = out / PREVIOUS_PARTIAL
    out.joinpath("metrics.jsonl").write_text('{"round": 1}\n')  # a fresh run that failed in round 2
    set_aside_previous_run(directory)
    assert len((partial / "metrics.jsonl").read_text().splitlines()) == 15 and (partial / "checkpoint").exists()
    assert not (out / "metrics.jsonl").exists()
    fake_run(out, summary=False)  # one that got further (a checkpoint and 20 rounds) takes the place
    (out / "metrics.jsonl").write_text("".join(f'{{"round": {r}}}\n' for r in range(1, 21)))
    set_aside_previous_run(directory)
    assert len((partial / "metrics.jsonl").read_text().splitlines()) == 20


def test_a_refused_start_leaves_no_run_directory_behind(smoke_config, private_env, tmp_path):
    from server.launch import simulate

    typo = tmp_path / "typo" / "run"
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        simulate(smoke_config(), typo, progress=False, resume=True)
    assert not typo.exists()


def test_a_completed_run_new_or_resumed_drops_the_set_aside_runs(smoke_config, private_env, tmp_path, monkeypatch):
    import flwr.simulation

    from server.launch import PREVIOUS_PARTIAL, PREVIOUS_RUN, simulate

    out = tmp_path / "run"
    fake_run(out)
    (out / PREVIOUS_PARTIAL).mkdir()

    def completes(**kwargs):
        (out / "summary.json").write_text('{"rounds": 3}')

    monkeypatch.setattr(flwr.simulation, "run_simulation", completes)
    simulate(smoke_config(), out, progress=False, resume=True)  # resumed: nothing new set aside, old ones dropped
    assert not (out / PREVIOUS_RUN).exists() and not (out / PREVIOUS_PARTIAL).exists()


def test_resume_with_a_changed_key_is_refused_before_the_data_the_model_or_ray(smoke_config, private_env, tmp_path,
                                                                              monkeypatch):
    import flwr.simulation

    from server import launch

    out = tmp_path / "run"
    fake_run(out, summary=False)
    before = sorted(p.name for p in out.iterdir())

    def must_not_run(*args, **kwargs):
        raise AssertionError("started before the config was checked")

    for target, name in ((flwr.simulation, "run_simulation"), (launch, "build_federated_data"), (launch, "GlobalModel")):
        monkeypatch.setattr(target, name, must_not_run)
    with pytest.raises(ValueError, match=r"cannot resume .*run: the config differs from the checkpoint's "
                                         r"\(federation.num_rounds: 4 -> 6\)"):
        launch.simulate(smoke_config(federation__num_rounds=6), out, progress=False, resume=True)
    assert sorted(p.name for p in out.iterdir()) == before


def test_resuming_a_complete_run_says_that_nothing_is_left_to_train(smoke_config, private_env, tmp_path, monkeypatch,
                                                                    caplog):
    import flwr.simulation

    from server.launch import simulate

    out, partial = tmp_path / "run", tmp_path / "partial"
    fake_run(out, checkpoint_round=4)
    fake_run(partial, summary=False, checkpoint_round=2)
    monkeypatch.setattr(flwr.simulation, "run_simulation",
                        lambda **kwargs: (partial / "summary.json").write_text('{"rounds": 4}'))
    with caplog.at_level("WARNING", logger="server.launch"):
        simulate(smoke_config(), out, progress=False, resume=True)
    assert "holds a complete run (round 4 of 4): nothing is left to train" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="server.launch"):
        simulate(smoke_config(), partial, progress=False, resume=True)
    assert "complete run" not in caplog.text


def test_out_that_is_a_file_is_refused_before_anything_runs(smoke_config, private_env, tmp_path):
    from server.launch import simulate

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        simulate(smoke_config(), target, progress=False)
    assert target.read_text() == "mine"


@pytest.mark.parametrize("target", ["-1", "nan", "inf"])
def test_compare_refuses_a_target_loss_that_no_run_can_reach_before_running(target, private_env, tmp_path, capsys):
    from devft.cli import main

    assert main(["compare", str(SMOKE), "--out", str(tmp_path / "cmp"), "--target-eval-loss", target]) == 2
    assert f"--target-eval-loss must be a loss > 0 (or 0: the configs' own target), got {float(target)!r}" in \
        capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


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

    # a run summed on one thread (the default until it became one per CPU) has the same bits: reused
    one_thread = config_to_dict(smoke_config())
    one_thread["federation"]["aggregation_threads"] = 1
    (out / SMOKE.stem / "config.json").write_text(json.dumps(one_thread))
    capsys.readouterr()
    assert main(["compare", str(SMOKE), "--out", str(out), "--reuse"]) == 0
    assert f"reusing {out / SMOKE.stem}" in capsys.readouterr().out


@pytest.mark.parametrize("finished,same_config,resumed", [(True, True, False), (False, True, True),
                                                          (False, False, False), (False, "timeout", True),
                                                          (False, "garbage", False)])
def test_compare_runs_finished_runs_again_and_resumes_interrupted_ones_of_the_same_config(
        smoke_config, private_env, tmp_path, monkeypatch, capsys, finished, same_config, resumed):
    import devft.reports
    import server.launch
    from devft.cli import main

    out = tmp_path / "cmp"
    fake_run(out / SMOKE.stem, summary=finished)
    # a run of another lora.r is not this config; one of another reply timeout is (resume may change it)
    config = {True: smoke_config(), False: smoke_config(lora__r=2), "timeout": smoke_config(
        federation__reply_timeout_s=7.0), "garbage": smoke_config()}[same_config]
    (out / SMOKE.stem / "config.json").write_text(json.dumps(config_to_dict(config)))
    if same_config == "garbage":
        (out / SMOKE.stem / "config.json").write_bytes(b"\xff\xfe not utf-8")
    calls = []
    monkeypatch.setattr(server.launch, "simulate", lambda config, run_dir, resume, stop: calls.append(resume))
    table = tmp_path / "comparison.md"
    table.write_text("table")
    monkeypatch.setattr(devft.reports, "write_comparison", lambda *a, **k: table)
    assert main(["compare", str(SMOKE), "--out", str(out)]) == 0
    assert calls == [resumed]
    said = capsys.readouterr().out
    assert ("resuming the interrupted run in" in said) == resumed and "reusing" not in said


def test_ctrl_c_in_the_last_round_of_a_compared_run_stops_the_comparison(smoke_config, private_env, tmp_path,
                                                                        monkeypatch, capsys):
    import server.launch
    from devft.cli import main

    ran = []

    def simulate(config, run_dir, resume, stop):  # the first run completes, with Ctrl-C in its last round
        fake_run(run_dir)
        ran.append(run_dir.name)
        stop.set()

    monkeypatch.setattr(server.launch, "simulate", simulate)
    other = tmp_path / "other.toml"
    other.write_text(f'extends = "{SMOKE}"\n[lora]\nr = 2\n')
    assert main(["compare", str(SMOKE), str(other), "--out", str(tmp_path / "cmp")]) == 130
    assert ran == [SMOKE.stem]  # the second config never started
    assert "stopped on request after smoke completed; the same command with --reuse" in capsys.readouterr().err


def test_eval_of_an_adapter_for_another_model_names_the_mismatch(smoke_config, private_env, tmp_path, capsys):
    from devft.cli import main
    from devft.models import LoraSettings, attach_lora, load_model

    other = attach_lora(load_model("tiny-gpt2").model, LoraSettings(r=4))  # the smoke config runs tiny-llama
    other.save_pretrained(tmp_path / "adapter")
    assert main(["eval", str(SMOKE), "--adapter", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert "does not load onto model.name='tiny-llama'" in err and "not found in the base model" in err


def test_eval_of_a_run_directory_points_to_its_adapter_before_loading_anything(private_env, tmp_path, capsys,
                                                                             monkeypatch):
    from devft import cli, models
    from devft.cli import main

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model for a wrong --adapter"))
    monkeypatch.setattr(cli, "_config", lambda *a, **k: pytest.fail("read a config for a wrong --adapter"))
    assert main(["eval", "--adapter", str(run)]) == 2
    assert f"a run directory's adapter is --adapter '{run / 'adapter'}'" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no adapter_config.json (not a peft adapter)" in err and "run directory's" not in err


def test_a_reader_that_leaves_early_gets_no_error_from_devft(private_env, monkeypatch, capsys):
    """`devft config | head -1`: the pipe breaks under devft's print; it stops quietly with 141, as a writer
    killed by SIGPIPE would, instead of printing an error about the pipe."""
    import os
    import sys

    from devft.cli import main

    read_end, write_end = os.pipe()

    class LeftPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return write_end

    monkeypatch.setattr(sys, "stdout", LeftPipe())
    try:
        assert main(["config"]) == 141
        assert capsys.readouterr().err == ""
        os.write(write_end, b"after")  # the descriptor now goes to /dev/null: Python's exit flush cannot fail
        os.close(write_end)
        assert os.read(read_end, 16) == b""  # nothing reached the reader that left
    finally:
        os.close(read_end)


def test_a_second_run_in_a_busy_run_directory_is_refused_naming_the_holder(smoke_config, private_env, tmp_path,
                                                                         capsys):
    import os
    import subprocess
    import sys
    import time

    from server.launch import simulate
    from server.run_dir import LOCK_FILE, RunDirectoryBusy, locked

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, '.'); from server.run_dir import locked\n"
        f"with locked({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=str(SMOKE.parents[2]))
    try:
        assert holder.stdout.readline().strip() == "held"
        fake_run(out)  # the other run's files: nothing may move them
        with pytest.raises(RunDirectoryBusy, match=f"in use by another devft run \\(pid {holder.pid} on "):
            simulate(smoke_config(), out, progress=False)
        assert (out / "summary.json").exists() and not (out / ".previous-run").exists()
        # the command line says it in one line, as it does other errors a user can act on (no traceback)
        from devft.cli import main

        assert main(["simulate", str(SMOKE), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("devft:")]
        assert line.startswith("devft: error: run directory") and f"pid {holder.pid} on" in line
        assert "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with locked(out), locked(out):  # free again, and re-entrant within a process
        assert (out / LOCK_FILE).read_text().startswith(f"{os.getpid()} on ")


def _other_process_can_lock(path) -> bool:
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, '.'); from server.run_dir import locked, RunDirectoryBusy\n"
            f"try:\n    with locked({str(path)!r}): print('got it')\nexcept RunDirectoryBusy: print('busy')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(SMOKE.parents[2]))
    return done.stdout.strip() == "got it"


def test_the_lock_is_released_by_its_last_holder_in_any_thread(tmp_path, monkeypatch):
    # devft simulate holds the directory and so does the ServerApp thread it starts, which Flower never joins:
    # the main thread leaving first (Ctrl-C) must not free the directory while the server thread still writes
    import errno
    import threading

    import server.run_dir
    from server.run_dir import RunDirectoryBusy, locked

    out = tmp_path / "run"
    inside, leave, errors = threading.Event(), threading.Event(), []

    def server_thread():
        try:
            with locked(out):
                inside.set()
                leave.wait(30)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    with locked(out):
        thread = threading.Thread(target=server_thread)
        thread.start()
        assert inside.wait(30)
    assert not _other_process_can_lock(out)  # the server thread still holds it
    leave.set()
    thread.join(30)
    assert errors == [] and _other_process_can_lock(out)

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(server.run_dir.fcntl, "flock", no_locks)
    with pytest.raises(RunDirectoryBusy, match=r"cannot lock run directory .*\.devft-lock: \[Errno 37\]"):
        with locked(tmp_path / "nfs"):
            pass


def test_eval_of_a_runs_adapter_uses_that_runs_config(smoke_config, private_env, tmp_path, capsys, monkeypatch):
    # without a CONFIG, `devft eval --adapter RUN/adapter` reads RUN/config.json (the smoke run's tiny model
    # and data), not the quickstart's SmolLM2, onto which this adapter would not even load
    from devft.cli import main
    from devft.models import LoraSettings, attach_lora, load_model

    config = smoke_config(eval__generate=False)
    run = tmp_path / "run"
    attach_lora(load_model("tiny-llama").model, LoraSettings(r=config.lora.r)).save_pretrained(run / "adapter")
    (run / "config.json").write_text(json.dumps(config_to_dict(config)))
    assert main(["eval", "--adapter", str(run / "adapter"), "--set", "eval.max_examples=3"]) == 0
    captured = capsys.readouterr()
    assert f"config: {run / 'config.json'}" in captured.err
    result = json.loads(captured.out)
    assert result["num_examples"] == 3 and result["eval_accuracy"] is None
    monkeypatch.chdir(run / "adapter")  # `--adapter .` from inside the adapter: the same run's config
    assert main(["eval", "--adapter", ".", "--set", "eval.max_examples=3"]) == 0
    assert f"config: {(run / 'config.json').resolve()}" in capsys.readouterr().err


def test_compare_with_seeds_runs_every_config_once_per_seed_seed_by_seed(smoke_config, private_env, tmp_path,
                                                                          monkeypatch, capsys):
    import devft.reports
    import server.launch
    from devft.cli import main

    ran = []

    def simulate(config, run_dir, resume, stop):
        ran.append((run_dir.relative_to(tmp_path / "cmp").as_posix(), config.federation.seed, config.train.seed,
                    config.data.seed, config.lora.r))
        fake_run(run_dir)

    seen = {}

    def write_seed_comparison(groups, out, **kwargs):
        seen.update(groups=groups, **kwargs)
        return fake_table(tmp_path)

    monkeypatch.setattr(server.launch, "simulate", simulate)
    monkeypatch.setattr(devft.reports, "write_seed_comparison", write_seed_comparison)
    other = tmp_path / "other.toml"
    other.write_text(f'extends = "{SMOKE}"\n[lora]\nr = 2\n')
    assert main(["compare", str(SMOKE), str(other), "--out", str(tmp_path / "cmp"), "--seeds", "3", "5"]) == 0
    # seed by seed; federation.seed and train.seed follow the seed, data.seed and the configs' own keys do not
    assert ran == [("smoke/seed-3", 3, 3, 0, 4), ("other/seed-3", 3, 3, 0, 2),
                   ("smoke/seed-5", 5, 5, 0, 4), ("other/seed-5", 5, 5, 0, 2)]
    assert seen["groups"] == {"smoke": {3: tmp_path / "cmp/smoke/seed-3", 5: tmp_path / "cmp/smoke/seed-5"},
                              "other": {3: tmp_path / "cmp/other/seed-3", 5: tmp_path / "cmp/other/seed-5"}}
    assert tuple(seen["seed_keys"]) == ("federation.seed", "train.seed")

    ran.clear()
    assert main(["compare", str(SMOKE), "--out", str(tmp_path / "cmp"), "--seeds", "1", "--seed-key", "data.seed"]) == 0
    assert ran == [("smoke/seed-1", 0, 0, 1, 4)] and seen["seed_keys"] == ["data.seed"]


@pytest.mark.parametrize("argv,match", [
    (["--seeds", "1", "1"], r"--seeds must be distinct integers >= 0, got \[1, 1\]"),
    (["--seeds", "-1"], r"--seeds must be distinct integers >= 0"),
    (["--seeds", "1", "--set", "train.seed=4"], r"--set train.seed=4 conflicts with --seeds"),
    (["--seeds", "1", "--seed-key", "lora.r"], r"--seed-key 'lora.r' is not a seed"),
    (["--seeds", "1", "--seed-key", "data.nonsense"], r"data.nonsense"),
    (["--seed-key", "data.seed"], r"--seed-key names what --seeds varies; give --seeds too"),
])
def test_compare_refuses_bad_seed_options_before_anything_runs(smoke_config, private_env, tmp_path, monkeypatch,
                                                               capsys, argv, match):
    import re

    import server.launch
    from devft.cli import main

    monkeypatch.setattr(server.launch, "simulate", lambda *a, **k: pytest.fail("nothing may run"))
    assert main(["compare", str(SMOKE), "--out", str(tmp_path / "cmp"), *argv]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("extra,argv,match", [
    ("[train]\nmax_steps = 7\n", [], r"compare runs every config on the same setting \(model, data and partition, "
     r"local training, evaluation, rounds, clients per round, seeds\), but train.max_steps differs \(smoke: 2, "
     r"other: 7\); make it the same, or give --vary train.max_steps to compare on purpose"),
    ("[federation]\nnum_rounds = 6\n", ["--seeds", "0", "1"], r"but federation.num_rounds differs \(smoke: 4, other: 6\)"),
    ("[data]\nalpha = 0.1\n", ["--vary", "train.max_steps"], r"but data.alpha differs"),
    ("[lora]\nr = 2\n", ["--vary", "lora.r"], r"--vary lora.r: not part of the setting"),
    ("[lora]\nr = 2\n", ["--vary", "train.nonsense"], r"--vary train.nonsense: no such config key"),
])
def test_compare_refuses_configs_on_different_settings_before_anything_runs(smoke_config, private_env, tmp_path,
                                                                           monkeypatch, capsys, extra, argv, match):
    import re

    import server.launch
    from devft.cli import main

    monkeypatch.setattr(server.launch, "simulate", lambda *a, **k: pytest.fail("nothing may run"))
    other = tmp_path / "other.toml"
    other.write_text(f'extends = "{SMOKE}"\n{extra}')
    assert main(["compare", str(SMOKE), str(other), "--out", str(tmp_path / "cmp"), *argv]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "cmp").exists()


def test_compare_runs_a_named_difference_and_takes_the_configs_shared_target(smoke_config, private_env, tmp_path,
                                                                            monkeypatch, capsys):
    import devft.reports
    import server.launch
    from devft.cli import main

    ran, seen = [], {}

    def simulate(config, run_dir, resume, stop):
        ran.append((run_dir.name, config.train.max_steps))
        if not run_dir.exists():
            fake_run(run_dir)

    def write_comparison(run_dirs, out, **kwargs):
        seen.update(kwargs)
        return fake_table(tmp_path)

    monkeypatch.setattr(server.launch, "simulate", simulate)
    monkeypatch.setattr(devft.reports, "write_comparison", write_comparison)
    other = tmp_path / "other.toml"
    other.write_text(f'extends = "{SMOKE}"\n[train]\nmax_steps = 7\n')
    argv = ["compare", str(SMOKE), str(other), "--out", str(tmp_path / "cmp"), "--vary", "train.max_steps",
            "--set", "federation.target_eval_loss=1.25"]
    assert main(argv) == 0
    assert ran == [("smoke", 2), ("other", 7)] and seen["target_eval_loss"] == 1.25
    assert main(argv + ["--target-eval-loss", "2.5"]) == 0 and seen["target_eval_loss"] == 2.5
    assert main(argv[:-2] + ["--set", "federation.num_rounds=4"]) == 0 and seen["target_eval_loss"] == 0.0


def test_an_interrupted_comparison_over_seeds_continues_with_reuse(smoke_config, private_env, tmp_path, monkeypatch,
                                                                   capsys):
    import server.launch
    from devft.cli import main

    ran = []

    def simulate(config, run_dir, resume, stop):  # a real run's files, with Ctrl-C in the second run's last round
        fake_run(run_dir)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(config)))
        ran.append(run_dir.relative_to(tmp_path / "cmp").as_posix())
        if len(ran) == 2:
            stop.set()

    monkeypatch.setattr(server.launch, "simulate", simulate)
    other = tmp_path / "other.toml"
    other.write_text(f'extends = "{SMOKE}"\n[lora]\nr = 2\n')
    argv = ["compare", str(SMOKE), str(other), "--out", str(tmp_path / "cmp"), "--seeds", "0", "1"]
    assert main(argv) == 130
    assert ran == ["smoke/seed-0", "other/seed-0"]  # seed 0 complete for both configs, seed 1 not begun
    assert "stopped on request after other seed 0 completed" in capsys.readouterr().err
    ran.clear()
    assert main(argv + ["--reuse"]) == 0
    assert ran == ["smoke/seed-1", "other/seed-1"]
    said = capsys.readouterr().out
    assert f"reusing {tmp_path / 'cmp/smoke/seed-0'}" in said and f"reusing {tmp_path / 'cmp/other/seed-0'}" in said
    table = (tmp_path / "cmp" / "comparison.md").read_text()  # the real report over the four (result-less) runs
    assert "| other | global | 2 | — | 0, 1 |" in table and "| other | 0 | — |" in table
    assert "| `lora.r` | `4` | `2` |" in table  # what the configs differ in, from the runs' config.json
    assert all(f"| {name}/seed-{seed} |" in table for name in ("smoke", "other") for seed in (0, 1))


def fake_table(tmp_path):
    (tmp_path / "table.md").write_text("table")
    return tmp_path / "table.md"


def test_a_comparison_with_and_one_without_seeds_never_share_a_config_directory(smoke_config, private_env, tmp_path,
                                                                               monkeypatch, capsys):
    import server.launch
    from devft.cli import main

    monkeypatch.setattr(server.launch, "simulate", lambda *a, **k: pytest.fail("nothing may run"))
    fake_run(tmp_path / "plain" / SMOKE.stem)
    assert main(["compare", str(SMOKE), "--out", str(tmp_path / "plain"), "--seeds", "0"]) == 2
    assert "holds a run of a comparison without --seeds" in capsys.readouterr().err
    fake_run(tmp_path / "seeded" / SMOKE.stem / "seed-0")
    assert main(["compare", str(SMOKE), "--out", str(tmp_path / "seeded")]) == 2
    assert "holds the runs of a comparison with --seeds; give --seeds again" in capsys.readouterr().err


def fake_central(path, loss: float) -> None:
    """The files `devft train` writes (central.json with its evaluations and budget, config.json)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "central.json").write_text(json.dumps({
        "before": {"loss": 3.0, "accuracy": 0.0}, "after": {"loss": loss, "accuracy": 0.5}, "train_examples": 96,
        "train": {"steps": 32}, "wall_s": 5.0,
        "budget": {"budget": "federated", "steps": 32, "num_rounds": 4, "clients_per_round": 2,
                   "steps_per_client_call": 4}}))


def test_compare_with_central_trains_the_reference_per_seed_and_reports_it(smoke_config, private_env, tmp_path,
                                                                          monkeypatch, capsys):
    import devft.central
    import server.launch
    from devft.cli import main

    trained = []

    def run_central(config, out_dir, progress=True, budget="federated"):
        trained.append((out_dir.relative_to(tmp_path).as_posix(), config.federation.seed, config.lora.r, budget))
        fake_central(out_dir, loss=1.0 + config.federation.seed / 10)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(config)))

    def simulate(config, run_dir, resume, stop):
        _write_run(run_dir, config)

    monkeypatch.setattr(server.launch, "simulate", simulate)
    monkeypatch.setattr(devft.central, "run_central", run_central)
    other = tmp_path / "other.toml"
    other.write_text(f'extends = "{SMOKE}"\n[lora]\nr = 2\n')
    argv = ["compare", str(SMOKE), str(other), "--out", str(tmp_path / "cmp"), "--central"]
    assert main(argv) == 0
    assert trained == [("cmp/central", 0, 4, "federated")]  # the first config's setting, the federated budget
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Centralised reference" in table and "the federated runs' budget: 32 optimiser steps" in table
    assert "| central | 3 | 1 | 0.5 | 32 | 96 | 5.0 |" in table
    assert main([*argv, "--reuse"]) == 0 and len(trained) == 1  # a finished reference of this config is kept

    trained.clear()
    assert main(["compare", str(SMOKE), str(other), "--out", str(tmp_path / "cmp-seeds"), "--central",
                 "--seeds", "1", "2"]) == 0
    assert [t[:2] for t in trained] == [("cmp-seeds/central/seed-1", 1), ("cmp-seeds/central/seed-2", 2)]
    seeded = (tmp_path / "cmp-seeds" / "comparison.md").read_text()
    assert "| seed-1 | 3 | 1.1 |" in seeded and "| seed-2 | 3 | 1.2 |" in seeded and "at the mean of 2" in seeded


def _write_run(run_dir, config) -> None:
    """A finished run's files as the reports read them: two rounds and a summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"round": r, "eval_loss": 2.0 / r, "bytes_up": 10, "bytes_down": 10, "train_flops": 1e9,
             "round_wall_s": 1.0} for r in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({"final": {"eval_loss": 1.0}, "totals": {}}))
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(config)))


def test_central_is_refused_beside_a_config_named_central(smoke_config, private_env, tmp_path, capsys):
    from devft.cli import main

    central = tmp_path / "central.toml"
    central.write_text(f'extends = "{SMOKE}"\n')
    assert main(["compare", str(central), "--out", str(tmp_path / "cmp"), "--central"]) == 2
    assert "--central trains into OUT/central" in capsys.readouterr().err


def test_progress_lines_tell_a_diverged_loss_from_a_missing_one():
    from server.app import loss_text

    assert loss_text({"eval_loss": 1.23456, "evaluated": True}, "eval_loss") == "1.2346"
    assert loss_text({"eval_loss": None, "evaluated": True}, "eval_loss") == "NaN"  # as metrics.jsonl keeps it
    assert loss_text({"eval_loss": float("nan"), "evaluated": True}, "eval_loss", 3) == "NaN"  # as the round has it
    assert loss_text({"eval_loss": None, "evaluated": False}, "eval_loss") == "-"
    assert loss_text({"train_loss": None}, "train_loss") == "-"  # no accepted replies
    assert loss_text({"train_loss": float("inf")}, "train_loss") == "inf"
