"""Centralised LoRA training on the union of all clients' data: the upper-bound reference run.

By default it gets the federated run's budget: as many optimiser steps (of ``train.batch_size`` examples)
as the clients of a federated run with the same config take together, so the reference is compared at equal
training, not at the one client call's ``train.max_steps``.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from devft.config import RunConfig, config_to_dict
from devft.data.federated import build_federated_data
from devft.files import replace_directory, write_json_atomic
from devft.models import attach_lora, load_model
from devft.training import EvalResult, evaluate, train_lora
from devft.training.trainer import total_steps

BUDGETS = ("federated", "train")

log = logging.getLogger(__name__)


def _eval_dict(result: EvalResult) -> dict:
    out = asdict(result)
    out.pop("samples", None)
    return out


def federated_budget(config: RunConfig, partition_sizes: list[int]) -> dict:
    """The optimiser steps a federated run of ``config`` takes over all its clients: ``num_rounds`` ×
    ``clients_per_round`` × one client call's steps (``train.max_steps``, or with ``train.epochs`` the mean
    over the partitions, as sampling draws them evenly)."""
    if config.train.max_steps > 0:
        per_call = config.train.max_steps
    else:
        per_call = max(1, round(statistics.fmean(total_steps(n, config.train) for n in partition_sizes)))
    rounds, clients = config.federation.num_rounds, config.federation.clients_per_round
    return {"steps": rounds * clients * per_call, "num_rounds": rounds, "clients_per_round": clients,
            "steps_per_client_call": per_call}


def run_central(config: RunConfig, out_dir: str | Path, progress: bool = True, budget: str = "federated") -> dict:
    """Train one LoRA on all training partitions; evaluate before and after.

    ``budget="federated"`` trains for :func:`federated_budget`'s steps (``config.train`` otherwise, warm-up
    and schedule spread over them); ``budget="train"`` makes one call with ``config.train`` as it is.
    One model, so ``lora.client_ranks`` does not apply: it trains at ``lora.r`` (and says so).
    Writes ``adapter/`` (peft format), ``central.json`` and ``config.json`` into ``out_dir`` and returns the summary.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget={budget!r}: expected one of {list(BUDGETS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.lora.client_ranks:
        log.warning("lora.client_ranks=%s is for federated runs; centralised training uses lora.r=%d",
                    list(config.lora.client_ranks), config.lora.r)
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[config.model.dtype]
    import torch

    loaded = load_model(config.model.name, dtype=getattr(torch, dtype))
    data = build_federated_data(config.data)
    train_examples = [ex for part in data.partitions for ex in part]
    settings, spent = config.train, {"budget": budget}
    if budget == "federated":
        spent |= federated_budget(config, [len(part) for part in data.partitions])
        settings = replace(config.train, max_steps=spent["steps"])
    model = attach_lora(loaded.model, config.lora, seed=config.federation.seed)
    before = evaluate(model, loaded.tokenizer, data.test, config.eval, config.data.max_length)
    log.info("before: eval loss %.4f accuracy %s", before.loss, before.accuracy)

    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("central training"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"), TimeElapsedColumn())
    steps = total_steps(len(train_examples), settings)
    start = time.perf_counter()
    if bar is not None:
        with bar:
            task = bar.add_task("train", total=steps, loss="—")
            result = train_lora(
                model, loaded.tokenizer, train_examples, settings, config.data.max_length,
                on_step=lambda i, loss: bar.update(task, completed=i + 1, loss=f"{loss:.3f}"),
            )
    else:
        result = train_lora(model, loaded.tokenizer, train_examples, settings, config.data.max_length)
    after = evaluate(model, loaded.tokenizer, data.test, config.eval, config.data.max_length)
    log.info("after: eval loss %.4f accuracy %s", after.loss, after.accuracy)
    summary = {
        "config": config_to_dict(config),
        "train_examples": len(train_examples),
        "test_examples": len(data.test),
        "before": _eval_dict(before),
        "after": _eval_dict(after),
        "budget": spent,
        "train": asdict(result),
        "wall_s": time.perf_counter() - start,
        "samples_after": after.samples,
    }
    # An earlier run's adapter stays whole until the new one is complete; central.json, written last, marks a
    # complete run (what compare --reuse looks for), so it goes first: an error in between leaves no pair that
    # does not belong together. A NaN loss is written as null.
    (out_dir / "central.json").unlink(missing_ok=True)
    replace_directory(out_dir / "adapter", model.save_pretrained)
    # as a run directory has it: `devft eval --adapter OUT/adapter` then evaluates with this config
    write_json_atomic(out_dir / "config.json", config_to_dict(config))
    write_json_atomic(out_dir / "central.json", summary)
    return summary
