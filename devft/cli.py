"""The ``devft`` command: simulate, compare, train centrally, evaluate adapters, inspect partitions."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "simulations" / "configs" / "quickstart.toml"


def _load(path: str | None, overrides: dict):
    """The config at ``path`` with ``overrides``, its local paths absolute (names what the run reads)."""
    from devft.config import load_config, with_local_paths_absolute

    return with_local_paths_absolute(load_config(path, overrides))


def _config(path: str | None, sets: list[str], default_quickstart: bool = True):
    from devft.config import parse_overrides

    if path is None and default_quickstart:
        if QUICKSTART.exists():
            path = str(QUICKSTART)
        else:  # devft installed without its repository (not editable): the configs are not beside it
            logging.getLogger("devft").warning(
                "no CONFIG given and the quickstart config %s is not there (devft was installed without its "
                "repository): starting from devft's own defaults, which are not the quickstart's", QUICKSTART)
    return _load(path, parse_overrides(sets or []))


def _cmd_simulate(args: argparse.Namespace) -> int:
    config = _config(args.config, args.set)
    from server.launch import simulate

    run_dir = simulate(config, Path(args.out), resume=args.resume)
    print(f"run directory: {run_dir}\nreport: {run_dir / 'report.md'}")
    return 0


def _ran_with(run_dir: Path, config, ignore: frozenset[str] = frozenset()) -> bool:
    """Whether the run in ``run_dir`` was run with ``config``, apart from the keys in ``ignore`` (keys its
    ``config.json`` lacks count as their defaults: the behaviour from before the key existed)."""
    from devft.config import changed_keys, flatten_config_dict

    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text()) if path.exists() else None
    except ValueError:  # not UTF-8, not JSON: not a config this run can be matched against
        return False
    readable = isinstance(saved, dict) and all(isinstance(v, dict) for v in saved.values())
    return readable and not set(changed_keys(flatten_config_dict(saved), config)) - ignore


SEED_KEYS = ("federation.seed", "train.seed")  # what `compare --seeds` varies unless --seed-key says otherwise


def _refuse_the_other_layout(out: Path, names: list[str], seeded: bool) -> None:
    """A config's directory under ``--out`` holds one run (a comparison without ``--seeds``) or one run per
    seed below it (with): refuse to mix the two."""
    from devft.metrics.rows import METRICS_FILE

    for name in names:
        if seeded and (out / name / METRICS_FILE).exists():
            raise ValueError(f"{out / name} holds a run of a comparison without --seeds; give the comparison "
                             "with --seeds another --out")
        if not seeded and any((out / name).glob(f"seed-*/{METRICS_FILE}")):
            raise ValueError(f"{out / name} holds the runs of a comparison with --seeds; give --seeds again, "
                             "or another --out")


def _seeded_configs(args: argparse.Namespace) -> list[tuple[str, int | None, object]]:
    """``(name, seed, config)`` for every run of the comparison, all validated before any runs: one per
    config without ``--seeds``, else one per seed and config, seed by seed (so an interrupted comparison
    holds complete seeds)."""
    from devft.config import parse_overrides
    from devft.reports.setting import check_same_setting

    overrides = parse_overrides(args.set or [])
    names = [Path(p).stem for p in args.configs]
    if len(set(names)) != len(names):
        raise ValueError(f"compare needs config files with distinct names, got {names}")
    if getattr(args, "central", False) and "central" in names:
        raise ValueError("--central trains into OUT/central, where the runs of central.toml would go; rename the config")
    if args.seeds is None:
        if args.seed_key:
            raise ValueError("--seed-key names what --seeds varies; give --seeds too")
        runs = [(name, None, _load(p, overrides)) for name, p in zip(names, args.configs)]
        check_same_setting({name: config for name, _, config in runs}, args.vary or ())
        _refuse_the_other_layout(Path(args.out), names, seeded=False)
        return runs
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"--seeds must be distinct integers >= 0, got {args.seeds}")
    keys = tuple(args.seed_key or SEED_KEYS)
    clash = sorted(set(keys) & set(overrides))
    if clash:
        raise ValueError(f"--set {clash[0]}={overrides[clash[0]]} conflicts with --seeds, which sets {clash[0]} "
                         "per run; drop one of them")
    _refuse_the_other_layout(Path(args.out), names, seeded=True)
    runs = [(name, seed, _load(p, {**overrides, **dict.fromkeys(keys, seed)}))
            for seed in args.seeds for name, p in zip(names, args.configs)]
    for key in keys:  # a key that is not an integer seed would be set to the seed all the same: refuse it
        section, _, field = key.partition(".")
        value = getattr(getattr(runs[0][2], section), field)
        if not field.endswith("seed") or isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"--seed-key {key!r} is not a seed (an integer key named *seed)")
    check_same_setting({name: config for name, seed, config in runs if seed == args.seeds[0]}, args.vary or ())
    return runs


def _central_references(runs: list[tuple[str, int | None, object]], out: Path, reuse: bool) -> list[Path]:
    """``devft train`` with the federated budget on the first config of the comparison, once per seed, into
    ``out/central`` (``out/central/seed-S``); with ``reuse``, a finished one of the same config is kept."""
    from devft.central import run_central
    from server.strategy import SAME_BITS_KEYS

    done = []
    first = runs[0][0]
    for name, seed, config in runs:
        if name != first:
            continue
        central_dir = out / "central" if seed is None else out / "central" / f"seed-{seed}"
        if reuse and (central_dir / "central.json").exists() and _ran_with(central_dir, config, SAME_BITS_KEYS):
            print(f"reusing {central_dir}")
        else:
            print(f"training the centralised reference in {central_dir}")
            run_central(config, central_dir, progress=False, budget="federated")
        done.append(central_dir)
    return done


def _cmd_compare(args: argparse.Namespace) -> int:
    from devft.reports import write_comparison, write_seed_comparison
    from server.launch import simulate, stop_on_interrupt
    from server.run_dir import RunDirectory
    from server.strategy import RESUME_MAY_CHANGE, SAME_BITS_KEYS, RunStopped

    if not (math.isfinite(args.target_eval_loss) and args.target_eval_loss >= 0):
        raise ValueError(f"--target-eval-loss must be a loss > 0 (or 0: the configs' own target), got "
                         f"{args.target_eval_loss!r}")
    out = Path(args.out)
    runs = _seeded_configs(args)
    run_dirs: dict[str, dict[int | None, Path]] = {}
    stop = threading.Event()  # one Ctrl-C ends the comparison after the round in progress, whichever run it is in
    with stop_on_interrupt(stop):
        for i, (name, seed, config) in enumerate(runs):
            run_dir = out / name if seed is None else out / name / f"seed-{seed}"
            label = name if seed is None else f"{name} seed {seed}"
            directory = RunDirectory(run_dir)
            finished = directory.summary.exists()
            if args.reuse and finished:
                if not _ran_with(run_dir, config, SAME_BITS_KEYS):
                    raise ValueError(f"--reuse: {run_dir} was run with another config than {label} with these "
                                     "--set overrides; drop --reuse to run it again, or use another --out")
                print(f"reusing {run_dir}")
            else:
                # an interrupted run of this very config continues; a finished one (without --reuse) or one of
                # another config runs afresh (the earlier one is set aside until the new one completes)
                resume = not finished and directory.has_checkpoint() and _ran_with(run_dir, config, RESUME_MAY_CHANGE)
                print(f"{'resuming the interrupted run in' if resume else 'running'} {run_dir}")
                simulate(config, run_dir, resume=resume, stop=stop)
            run_dirs.setdefault(name, {})[seed] = run_dir
            if stop.is_set() and i + 1 < len(runs):  # the Ctrl-C came in a run's last round
                raise RunStopped(f"stopped on request after {label} completed; the same command with --reuse "
                                 "continues with the other runs")
    central = _central_references(runs, out, args.reuse) if args.central else []
    targets = {config.federation.target_eval_loss for _, _, config in runs}
    target = args.target_eval_loss or (targets.pop() if len(targets) == 1 else 0.0)
    if args.seeds is None:
        table = write_comparison([d for group in run_dirs.values() for d in group.values()], out,
                                 target_eval_loss=target, central=central)
    else:
        table = write_seed_comparison(run_dirs, out, seed_keys=args.seed_key or SEED_KEYS, target_eval_loss=target,
                                      central=central)
    print(table.read_text())
    print(f"comparison: {table}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from devft.central import run_central

    config = _config(args.config, args.set)
    summary = run_central(config, args.out, budget=args.budget)
    b, a, spent = summary["before"], summary["after"], summary["budget"]
    how = (f"the federated budget: {spent['num_rounds']} rounds x {spent['clients_per_round']} clients x "
           f"{spent['steps_per_client_call']} steps" if args.budget == "federated" else "train.* as set")
    print(f"before: eval loss {b['loss']:.4f}, accuracy {b['accuracy']}")
    print(f"after:  eval loss {a['loss']:.4f}, accuracy {a['accuracy']}  ({summary['train']['steps']} steps, "
          f"{how}; {summary['train']['wall_s']:.0f} s)")
    print(f"adapter: {Path(args.out) / 'adapter'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftModel

    from devft.data.federated import build_federated_data
    from devft.models import load_model
    from devft.training import evaluate

    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").exists():
        inside = adapter / "adapter"
        hint = f"; a run directory's adapter is --adapter {str(inside)!r}" if (inside / "adapter_config.json").exists() else ""
        raise FileNotFoundError(f"--adapter {str(adapter)!r} holds no adapter_config.json (not a peft adapter){hint}")
    run_config = adapter.resolve().parent / "config.json"  # `--adapter .` inside a run's adapter/ too
    if args.config is None and run_config.exists():  # a run's adapter: that run's model, data and eval
        from devft.config import config_from_flat, flatten_config_dict, parse_overrides

        config = config_from_flat({**flatten_config_dict(json.loads(run_config.read_text())),
                                   **parse_overrides(args.set or [])})
        print(f"config: {run_config} (the run's own; pass a CONFIG to use another)", file=sys.stderr)
    else:
        config = _config(args.config, args.set)
    loaded = load_model(config.model.name, dtype=getattr(torch, config.model.dtype))
    try:
        model = PeftModel.from_pretrained(loaded.model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or modules of another model, a broken config
        raise ValueError(f"--adapter {str(adapter)!r} does not load onto model.name={config.model.name!r}: "
                         f"{' '.join(line.strip() for line in str(err).splitlines()[:2])}") from err
    data = build_federated_data(config.data)
    result = evaluate(model, loaded.tokenizer, data.test, config.eval, config.data.max_length)
    print(json.dumps({"eval_loss": result.loss, "eval_accuracy": result.accuracy,
                      "family_accuracy": result.family_accuracy, "num_examples": result.num_examples}, indent=2))
    return 0


def _cmd_partitions(args: argparse.Namespace) -> int:
    from devft.data.federated import build_federated_data
    from devft.data.partition import family_histogram, format_histogram

    config = _config(args.config, args.set)
    data = build_federated_data(config.data)
    examples = [ex for part in data.partitions for ex in part]
    offsets = [0]
    for part in data.partitions:
        offsets.append(offsets[-1] + len(part))
    indices = [list(range(a, b)) for a, b in zip(offsets, offsets[1:])]
    print(format_histogram(family_histogram(examples, indices)))
    print(f"held-out test set: {len(data.test)} examples")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from devft.config import config_to_dict, describe, load_config, to_flwr_run_config

    if args.flwr:  # what `devft simulate [CONFIG] [--set …]` would run, as one file Flower can take
        config = _config(args.config, args.set)
        print(f"# flwr run . --run-config FILE: {args.config or QUICKSTART.name}"
              + "".join(f" --set {s}" for s in args.set or []) + ", every key resolved; add run-dir = \"DIR\" "
              "to choose the run directory")
        print(to_flwr_run_config(config), end="")
    elif args.config or args.set:  # resolved as `devft simulate [CONFIG] [--set …]` resolves it
        print(json.dumps(config_to_dict(_config(args.config, args.set)), indent=2))
    else:
        quickstart = load_config(QUICKSTART) if QUICKSTART.exists() else None
        print("# every key with its default, the value a TOML file starts from; `devft simulate` (and --set) "
              f"without CONFIG start from {QUICKSTART.name}" + (", whose values differ where marked" if quickstart else ""))
        print(describe(quickstart))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from devft.reports import write_report

    print(write_report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, default_help: str) -> None:
        p.add_argument("config", nargs="?", help=default_help)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")

    p = sub.add_parser(
        "simulate", help="federated simulation on Flower's simulation engine (its own Ray, or the cluster in $RAY_ADDRESS)"
    )
    with_config(p, "TOML config (default: simulations/configs/quickstart.toml)")
    p.add_argument("--out", default="runs/latest", help="run directory (default: runs/latest)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("compare", help="run several configs on identical settings and compare them")
    p.add_argument("configs", nargs="+", help="TOML configs, one per method")
    p.add_argument("--out", required=True, help="directory for the runs and comparison.md")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every config")
    p.add_argument("--target-eval-loss", type=float, default=0.0,
                   help="cost-to-target threshold (default: the configs' federation.target_eval_loss where they "
                        "share one > 0, else the worst final eval loss)")
    p.add_argument("--vary", action="append", metavar="KEY",
                   help="a key of the setting (model, data, train, eval, federation.num_rounds / clients_per_round "
                        "/ seed / eval_every) the configs may differ in, repeatable; without it such a difference "
                        "is refused before anything runs")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished runs already in --out (refused if their config differs); without it, "
                        "finished runs are run again and interrupted runs of the same config resumed")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="run every config once per seed (into OUT/CONFIG/seed-S) and report the spread over "
                        "seeds and each config's paired difference from the first config")
    p.add_argument("--seed-key", action="append", metavar="KEY",
                   help=f"a seed key --seeds sets, repeatable (default: {' and '.join(SEED_KEYS)}: sampling, "
                        "LoRA initialisation, data order; the data and its partition stay the same)")
    p.add_argument("--central", action="store_true",
                   help="also train the centralised reference (devft train on the union of the clients' data, "
                        "the federated runs' budget, the first config's setting; once per seed) into OUT/central "
                        "and put it in comparison.md and the plots")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("train", help="centralised LoRA training on all clients' data (upper bound)")
    with_config(p, "TOML config (default: the quickstart)")
    p.add_argument("--out", default="runs/central", help="output directory (default: runs/central)")
    p.add_argument("--budget", choices=("federated", "train"), default="federated",  # devft.central.BUDGETS
                   help="federated (default): as many optimiser steps as a federated run of this config takes "
                        "over all its clients (num_rounds x clients_per_round x one client call's steps); "
                        "train: one call with train.* as set")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved adapter on the full model")
    with_config(p, "TOML config naming model and data (default: the run's config.json when the adapter is a "
                   "run's adapter/, else the quickstart)")
    p.add_argument("--adapter", required=True, help="adapter directory (peft format)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("partitions", help="show the per-client task-family histogram")
    with_config(p, "TOML config (default: the quickstart)")
    p.set_defaults(func=_cmd_partitions)

    p = sub.add_parser("config", help="list every config key with its default and help, or resolve a config")
    with_config(p, "TOML config to resolve (optional)")
    p.add_argument("--flwr", action="store_true",
                   help="print the resolved config (default: the quickstart) as one flat TOML file for "
                        "`flwr run . --run-config FILE` (Flower resolves no `extends` and no --set beside a file)")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("report", help="(re)write report.md and plots of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # the SuperLink's database set-up, seven lines a run
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `devft config | head`: the reader left; say nothing more, as a killed writer would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141
    except (ValueError, OSError, KeyError) as err:  # OSError: FileNotFoundError, IsADirectoryError, …
        print(f"devft: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # the ones a user can act on read as one line; any other is a bug: traceback
        from devft.models.smollm2 import ModelUnavailableError
        from server.run_dir import RunDirectoryBusy

        if not isinstance(err, RunDirectoryBusy | ModelUnavailableError):
            raise
        print(f"devft: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from server.launch import INTERRUPTED
        from server.strategy import RunStopped

        if not isinstance(err, RunStopped):
            raise
        print(f"devft: {err}", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
