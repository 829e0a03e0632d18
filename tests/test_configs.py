"""Every config in simulations/configs/ is valid, fits its model, and starts with its own launch command.

Also: the ``[tool.flwr.app.config]`` of pyproject.toml is the quickstart (so ``flwr run .`` and
``devft simulate`` run the same thing), and each config can be passed to ``flwr run . --run-config FILE``.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest

from devft.cli import build_parser
from devft.config import config_from_flat, config_to_flat, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "simulations" / "configs").glob("*.toml"))
_LAYERS: dict[str, int] = {}


def _num_layers(name: str) -> int:
    if name not in _LAYERS:
        from devft.models import load_model

        _LAYERS[name] = load_model(name).num_layers
    return _LAYERS[name]


def test_the_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.toml", "smoke.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_and_fits_its_model(path):
    from server.methods import method_rule, method_schedule

    config = load_config(path)
    schedule = method_schedule(config, _num_layers(config.model.name))
    assert schedule.total_rounds == config.federation.num_rounds
    method_rule(config)
    assert config.federation.fault_injection == "", "fault_injection is a test hook, not for configs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_first_line_is_the_launch_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: the first line must be a comment with the launch command"
    argv = shlex.split(first[2:])
    assert argv[0] == "devft", f"{path.name}: the command must start with `devft`, got {first!r}"
    args = build_parser().parse_args(argv[1:])
    rel = path.relative_to(REPO).as_posix()
    configs = list(args.configs) if args.command == "compare" else [getattr(args, "config", None)]
    assert rel in configs, f"{path.name}: the launch command must name the file itself ({rel}), got {first!r}"
    for key_value in args.set or []:
        load_config(path, dict([key_value.split("=", 1)]))


STANDALONE = [p for p in CONFIGS if "extends" not in tomllib.loads(p.read_text())]


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_config_works_as_flwr_run_config(path):
    """``flwr run . --run-config FILE`` flattens the file, accepts only keys pyproject declares and lays them
    over pyproject's values (the quickstart), where ``devft simulate FILE`` lays them over devft's defaults:
    a shipped config must come out the same both ways.

    Variants that ``extends`` another config are for ``devft`` only (Flower does not resolve them)."""
    from flwr.common.config import flatten_dict, fuse_dicts

    declared = flatten_dict(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    flat = flatten_dict(tomllib.loads(path.read_text()))
    assert set(flat) <= set(declared), sorted(set(flat) - set(declared))
    fused = fuse_dicts(declared, flat)  # what Flower hands the ServerApp as context.run_config
    assert config_from_flat({k: v for k, v in fused.items() if "." in k}) == load_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_goes_to_flwr_run_through_devft_config_flwr(path, tmp_path, capsys):
    """``devft config FILE --set … --flwr`` writes one flat file, ``extends`` and overrides resolved, that
    Flower's own run-config reading turns back into the same config."""
    from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

    from devft.cli import main

    assert main(["config", str(path), "--set", "train.seed=7", "--flwr"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# flwr run . --run-config FILE: {path} --set train.seed=7, every key resolved")
    file = tmp_path / "run.toml"
    file.write_text(text)
    flat = parse_config_args([str(file)])  # how `flwr run --run-config FILE` reads it
    declared = flatten_dict(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert set(flat) <= set(declared), sorted(set(flat) - set(declared))
    fused = fuse_dicts(declared, flat)
    assert config_from_flat({k: v for k, v in fused.items() if "." in k}) == load_config(path, {"train.seed": "7"})


def test_config_listing_marks_what_the_quickstart_changes(capsys):
    from devft.cli import main

    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "quickstart.toml" in lines[0]
    num_train = next(ln for ln in lines if ln.strip().startswith("num_train = "))
    assert num_train.strip().startswith("num_train = 2000 [quickstart: 800]  # ")
    name = next(ln for ln in lines if ln.strip().startswith("name = "))
    assert "[quickstart:" not in name  # the quickstart keeps the default model


def test_config_with_set_shows_what_simulate_with_set_runs(capsys):
    import json

    from devft.cli import main

    assert main(["config", "--set", "lora.r=4"]) == 0
    shown = json.loads(capsys.readouterr().out)
    quickstart = load_config(REPO / "simulations" / "configs" / "quickstart.toml", {"lora.r": "4"})
    assert shown["lora"]["r"] == 4 and shown["federation"]["num_rounds"] == quickstart.federation.num_rounds == 16


def test_pyproject_app_config_is_the_quickstart():
    from flwr.common.config import flatten_dict

    declared = flatten_dict(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    options = {k: declared.pop(k) for k in list(declared) if "." not in k}
    assert options == {"run-dir": "", "resume": False}
    assert declared == config_to_flat(load_config(REPO / "simulations" / "configs" / "quickstart.toml"))


def test_extends_reads_the_parent_then_the_variant(tmp_path):
    (tmp_path / "base.toml").write_text('[lora]\nr = 4\n[federation]\nmethod = "devft"\nseed = 3\n')
    (tmp_path / "variant.toml").write_text('extends = "base.toml"\n[federation]\nmethod = "fedit"\n')
    config = load_config(tmp_path / "variant.toml")
    assert (config.lora.r, config.federation.method, config.federation.seed) == (4, "fedit", 3)
    # max-steps and max_steps are one key, across extends and --set alike; one file may not hold both
    (tmp_path / "base.toml").write_text("[train]\nmax_steps = 10\n")
    (tmp_path / "dashed.toml").write_text('extends = "base.toml"\n[train]\nmax-steps = 4\n')
    assert load_config(tmp_path / "dashed.toml").train.max_steps == 4
    assert load_config(tmp_path / "dashed.toml", {"train.max_steps": "7"}).train.max_steps == 7
    assert load_config(tmp_path / "base.toml", {"train.max-steps": "7"}).train.max_steps == 7
    (tmp_path / "both.toml").write_text("[train]\nmax_steps = 10\nmax-steps = 4\n")
    with pytest.raises(ValueError, match=r"sets train.max_steps twice \(as 'train.max-steps' too\)"):
        load_config(tmp_path / "both.toml")
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ValueError, match="extends itself"):
        load_config(tmp_path / "loop.toml")


def test_an_unbounded_reply_timeout_travels_to_flwr_run():
    import math

    from devft.config import flatten, to_flwr_run_config

    config = load_config(None, {"federation.reply_timeout_s": "inf"})
    text = to_flwr_run_config(config)
    assert "federation.reply_timeout_s = inf\n" in text
    back = config_from_flat(flatten(tomllib.loads(text)))
    assert math.isinf(back.federation.reply_timeout_s) and back == config


def test_without_the_quickstart_beside_it_devft_says_it_starts_from_defaults(monkeypatch, tmp_path, caplog):
    from devft import cli
    from devft.config import RunConfig

    monkeypatch.setattr(cli, "QUICKSTART", tmp_path / "simulations" / "configs" / "quickstart.toml")
    with caplog.at_level("WARNING"):
        config = cli._config(None, [])
    assert config == RunConfig()
    assert "the quickstart config" in caplog.text and "starting from devft's own defaults" in caplog.text
