"""What a comparison holds fixed and what it varies.

The *setting* is what every compared run must share for its losses and costs to be measured on the same
footing: the model, the data and its partition, local training (budget, optimiser, seed), evaluation, and the
federation's rounds, sampling and seed. ``devft compare`` refuses configs that differ in it before anything
runs, unless a key is named with ``--vary``. Everything else (method, aggregation rule, LoRA ranks, growth,
wire format, norm bounds …) is what a comparison compares. comparison.md states, from the runs' own
``config.json``, every key the runs differ in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from devft.config import RunConfig, config_to_flat, flatten_config_dict

SETTING_SECTIONS = ("model", "data", "train", "eval")
SETTING_KEYS = frozenset({"federation.num_rounds", "federation.clients_per_round", "federation.seed",
                          "federation.eval_every"})
SETTING_TEXT = "model, data and partition, local training, evaluation, rounds, clients per round, seeds"


def is_setting_key(key: str) -> bool:
    return key.partition(".")[0] in SETTING_SECTIONS or key in SETTING_KEYS


def differing_keys(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{key: {name: value}}`` for every flat key whose value is not the same in all ``configs`` (a key a
    config lacks counts as its default, as for a run written before the key existed)."""
    defaults = config_to_flat(RunConfig())
    keys = sorted({k for flat in configs.values() for k in flat} | set(defaults))
    out = {}
    for key in keys:
        values = {name: flat.get(key, defaults.get(key)) for name, flat in configs.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            out[key] = values
    return out


def check_same_setting(configs: Mapping[str, RunConfig], vary: Iterable[str] = ()) -> None:
    """Refuse configs that differ in a setting key not named in ``vary``, naming the key and every value;
    refuse a ``vary`` key that is unknown or not part of the setting."""
    known = config_to_flat(RunConfig())
    for key in vary:
        if key not in known:
            raise ValueError(f"--vary {key}: no such config key (`devft config` lists them)")
        if not is_setting_key(key):
            raise ValueError(f"--vary {key}: not part of the setting ({SETTING_TEXT}); compared configs may "
                             "differ in it without --vary")
    differ = differing_keys({name: config_to_flat(c) for name, c in configs.items()})
    for key, values in differ.items():
        if is_setting_key(key) and key not in vary:
            listed = ", ".join(f"{name}: {value!r}" for name, value in values.items())
            raise ValueError(f"compare runs every config on the same setting ({SETTING_TEXT}), but {key} differs "
                             f"({listed}); make it the same, or give --vary {key} to compare on purpose")


def run_config(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's flat config from its ``config.json`` (None when it has none or it cannot be read)."""
    try:
        nested = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(nested, dict) or not all(isinstance(v, dict) for v in nested.values()):
        return None
    return flatten_config_dict(nested)


def differences_section(run_dirs: Mapping[str, Path], ignore: Iterable[str] = ()) -> list[str]:
    """comparison.md's account of what the runs differ in: a table of every differing key (``ignore``: keys
    that differ by design, e.g. the seeds of a comparison over seeds), and a warning when a setting key is
    among them or a run's config cannot be read."""
    configs = {name: run_config(path) for name, path in run_dirs.items()}
    unknown = [name for name, flat in configs.items() if flat is None]
    known = {name: flat for name, flat in configs.items() if flat is not None}
    differ = {k: v for k, v in differing_keys(known).items() if k not in set(ignore)}
    lines = ["## What the runs differ in", ""]
    if not differ:
        lines.append("Every config key is the same in every run" + (" that has a config." if unknown else "."))
    else:
        names = list(known)
        lines += ["| key | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| `{key}` | " + " | ".join(f"`{values[n]}`" for n in names) + " |" for key, values in differ.items()]
        setting = [k for k in differ if is_setting_key(k)]
        if setting:
            lines += ["", f"**Not like for like:** the runs differ in {', '.join(f'`{k}`' for k in setting)}, part "
                      f"of the setting ({SETTING_TEXT}): their losses and costs are not measured on the same footing."]
    if unknown:
        lines += ["", f"No readable config.json in {', '.join(unknown)}: what those runs ran with is unknown."]
    return lines + [""]

