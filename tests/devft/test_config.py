"""The run configuration: TOML, Flower run-config keys and --set strings all land in validated dataclasses."""

import pytest

from devft.config import (
    RunConfig,
    config_from_flat,
    config_to_dict,
    config_to_flat,
    describe,
    load_config,
    parse_overrides,
)


def test_defaults_are_valid_and_flat_round_trip_is_lossless():
    config = RunConfig()
    flat = config_to_flat(config)
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert config_to_dict(config_from_flat(flat)) == config_to_dict(config)


def test_toml_and_overrides_with_kebab_keys_and_strings(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "tiny-llama"\n[lora]\nr = 4\n[data]\nnum-clients = 6\nalpha = 0.3\n')
    config = load_config(path, parse_overrides(["lora.alpha=32", "federation.clients-per-round=3", "data.families=add,sort_numbers"]))
    assert config.model.name == "tiny-llama"
    assert config.lora.r == 4 and config.lora.alpha == 32.0
    assert config.data.num_clients == 6 and config.data.alpha == 0.3
    assert config.federation.clients_per_round == 3
    assert config.data.families == ("add", "sort_numbers")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora.r", "0", "r=0"),
        ("data.alpha", "-1", "alpha=-1"),
        ("federation.method", "fedprox", "method='fedprox'"),
        ("federation.aggregation", "foo", "federation.aggregation must be one of .*, got aggregation='foo'"),
        ("lora.r", "eight", "lora.r expects int, got 'eight'"),
        ("nosuch.key", "1", "unknown config key 'nosuch.key'"),
        ("lora.rank", "1", "unknown config key 'lora.rank'"),
        ("federation.clients_per_round", "50", "clients_per_round=50 exceeds data.num_clients=10"),
        # values that compare as "valid" but break later: non-finite numbers, negative seeds
        ("train.lr", "inf", "train.lr must be a finite number, got lr=inf"),
        ("train.weight_decay", "nan", "train.weight_decay must be a finite number, got weight_decay=nan"),
        ("train.max_grad_norm", "nan", "train.max_grad_norm must be a finite number, got max_grad_norm=nan"),
        ("train.epochs", "inf", "train.epochs must be a finite number, got epochs=inf"),
        ("lora.alpha", "inf", "lora.alpha must be a finite number > 0, got alpha=inf"),
        ("growth.beta", "inf", "growth.beta must be a finite number >= 0, got beta=inf"),
        ("growth.seed", "-1", "growth.seed must be >= 0, got seed=-1"),
        ("data.seed", "-1", "data.seed must be >= 0, got seed=-1"),
        ("train.seed", "-1", "train.seed must be >= 0, got seed=-1"),
        ("federation.seed", "-1", "federation.seed must be >= 0, got seed=-1"),
        ("federation.fault_injection", "0:raise,0:nan", "names partition 0 twice"),
        ("federation.client_cpus", "nan", "client_cpus must be a finite number > 0, got client_cpus=nan"),
        ("federation.client_gpus", "inf", "client_gpus must be a finite number >= 0, got client_gpus=inf"),
        # TOML values of the wrong kind are refused, not coerced
        ("lora.r", True, "lora.r expects int, got True"),
        ("growth.beta", False, "growth.beta expects float, got False"),
        ("model.name", ["a"], "model.name expects str, got \\['a'\\]"),
        ("eval.generate", 0.5, "eval.generate expects bool, got 0.5"),
    ],
)
def test_bad_values_name_the_field_and_the_value(key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_flat({key: value})


def test_missing_file_and_malformed_override_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lora.r"])


def test_describe_lists_every_section_with_help():
    text = describe()
    for section in ("[model]", "[lora]", "[data]", "[train]", "[eval]", "[growth]", "[federation]"):
        assert section in text
    assert "LoRA rank r" in text


def test_malformed_toml_names_the_file(tmp_path):
    bad = tmp_path / "cfgs" / "malformed.toml"
    bad.parent.mkdir()
    bad.write_text("[lora\nr = 4\n")
    with pytest.raises(ValueError, match=r"config file '.*malformed.toml' is not valid TOML: Expected"):
        load_config(bad)


def test_extends_must_name_a_file_and_a_config_must_be_one(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("extends = 5\n")
    with pytest.raises(ValueError, match="extends must be a file name"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_config(tmp_path)
    child = tmp_path / "variants" / "child.toml"
    child.parent.mkdir()
    child.write_text('extends = "nothere.toml"\n[lora]\nr = 2\n')
    with pytest.raises(FileNotFoundError, match=r"child.toml' extends 'nothere.toml', which is no file \(looked for "
                                                r"/.*variants/nothere.toml"):
        load_config(child)


def test_a_quoted_set_value_is_a_toml_string_as_flower_writes_it():
    overrides = parse_overrides(['federation.method="fedit"', "model.name='tiny-llama'", 'data.source=""',
                                 'data.families="add,sort_numbers"', 'train.lr=0.01', 'eval.batch_size="4"'])
    assert overrides["federation.method"] == "fedit" and overrides["model.name"] == "tiny-llama"
    assert overrides["data.source"] == ""
    config = config_from_flat({k: v for k, v in overrides.items() if k != "data.source"})
    assert config.federation.method == "fedit" and config.model.name == "tiny-llama"
    assert config.data.families == ("add", "sort_numbers") and config.eval.batch_size == 4
    # not one TOML string: as typed, as before (a list of quoted items is split and unquoted by the list coercion)
    assert parse_overrides(['model.name="unbalanced']) == {"model.name": '"unbalanced'}
    targets = parse_overrides(['lora.targets="q_proj","v_proj"'])
    assert targets == {"lora.targets": '"q_proj","v_proj"'}
    assert config_from_flat(targets).lora.targets == ("q_proj", "v_proj")
    assert parse_overrides(['data.source="C:\\x"']) == {"data.source": '"C:\\x"'}  # \x: no TOML escape
    assert parse_overrides(["data.source='C:\\x'"]) == {"data.source": "C:\\x"}  # a TOML literal string


def test_the_flwr_run_config_file_keeps_any_string_and_number():
    import tomllib

    from devft.config import config_from_flat, flatten, load_config, to_flwr_run_config

    config = load_config(None, {"model.name": 'odd "name" \\ é\x7f\ttab', "train.lr": "1e-05",
                                "lora.targets": "q_proj,v_proj", "growth.capacities": ""})
    back = config_from_flat(flatten(tomllib.loads(to_flwr_run_config(config))))
    assert back == config
    assert back.model.name == 'odd "name" \\ é\x7f\ttab' and back.train.lr == 1e-05


def test_local_paths_become_absolute_so_the_run_directory_names_what_was_read(tmp_path, monkeypatch):
    from devft.config import with_local_paths_absolute

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "good.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "home" / "data").mkdir(parents=True)
    (tmp_path / "home" / "data" / "x.jsonl").write_text("")
    (tmp_path / "tasks").write_text("")  # a file named like the built-in suite: the suite is meant
    (tmp_path / "tiny-llama").mkdir()  # a folder named like an embedded model: the model is meant

    def resolved(source, name):
        config = with_local_paths_absolute(load_config(None, {"data.source": source, "model.name": name}))
        return config.data.source, config.model.name

    assert resolved("good.jsonl", "models/mine") == (str(tmp_path / "good.jsonl"), str(tmp_path / "models" / "mine"))
    assert resolved("~/data/x.jsonl", "tiny-llama") == (str(tmp_path / "home" / "data" / "x.jsonl"), "tiny-llama")
    assert resolved("tasks", "HuggingFaceTB/SmolLM2-135M") == ("tasks", "HuggingFaceTB/SmolLM2-135M")  # not here
    assert resolved("missing.jsonl", "smollm2-135m") == ("missing.jsonl", "smollm2-135m")  # its error names it
    absolute = str(tmp_path / "good.jsonl")
    assert resolved(absolute, "tiny-llama") == (absolute, "tiny-llama")


def test_the_cli_reads_configs_with_their_local_paths_absolute(tmp_path, monkeypatch):
    from devft.cli import _config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert _config(None, ["data.source=good.jsonl"]).data.source == str(tmp_path / "good.jsonl")


def test_a_local_path_is_the_same_key_whether_saved_as_typed_or_absolute(tmp_path, monkeypatch):
    """Runs from before the CLI made paths absolute (and runs of flwr run) saved data.source as typed: resuming
    or reusing them from the same directory is the same config."""
    from devft.config import changed_keys, config_to_flat, with_local_paths_absolute

    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    typed = load_config(None, {"data.source": "good.jsonl"})
    absolute = with_local_paths_absolute(typed)
    assert absolute.data.source == str(tmp_path / "good.jsonl")
    assert changed_keys(config_to_flat(typed), absolute) == []
    assert changed_keys(config_to_flat(absolute), typed) == []
    assert changed_keys(config_to_flat(typed), typed) == []
    other = with_local_paths_absolute(load_config(None, {"data.source": "tasks"}))
    assert changed_keys(config_to_flat(typed), other) == ["data.source"]
