"""The local LoRA training loop: plain, Flower-free, seeded (a client calls it every round)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from devft.data.formatting import collate, encode_for_training
from devft.metrics.memory import PeakMemory
from devft.training.flops import attention_width, lora_training_flops, matmul_parameter_counts
from devft.training.settings import TrainSettings

log = logging.getLogger(__name__)

Example = dict[str, str]


@dataclass
class TrainResult:
    """What one local training call did and cost."""

    loss: float  # mean training loss over the optimiser steps (response tokens only)
    num_examples: int  # examples seen, counting repeats across epochs
    num_tokens: int  # non-padding tokens processed
    steps: int  # optimiser steps taken
    wall_s: float
    flops: float  # estimate, see devft.training.flops
    peak_rss_mb: float
    peak_cuda_mb: float = 0.0
    truncated_examples: int = 0  # examples whose answer lost its end to max_length (they never learn to stop)


def total_steps(num_examples: int, settings: TrainSettings) -> int:
    """Optimiser steps a call will take on ``num_examples`` examples."""
    if settings.max_steps > 0:
        return settings.max_steps
    per_epoch = math.ceil(math.ceil(num_examples / settings.batch_size) / settings.grad_accum)
    return max(1, math.ceil(per_epoch * settings.epochs))


def lr_lambda(settings: TrainSettings, steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimiser step ``i`` (warm-up, then constant, linear or cosine decay)."""

    def factor(i: int) -> float:
        if i < settings.warmup_steps:
            return (i + 1) / settings.warmup_steps
        if settings.schedule == "constant":
            return 1.0
        progress = (i - settings.warmup_steps) / max(1, steps - settings.warmup_steps)
        if settings.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _step_batches(encoded: list[dict], settings: TrainSettings, rng: random.Random):
    """Endless stream of optimiser steps, each ``grad_accum`` micro-batches of a fresh seeded shuffle every
    epoch; an epoch's last step takes what is left of it, so an epoch is every example once."""
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        micro = [[encoded[i] for i in order[start : start + settings.batch_size]]
                 for start in range(0, len(order), settings.batch_size)]
        for start in range(0, len(micro), settings.grad_accum):
            yield micro[start : start + settings.grad_accum]


def train_lora(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: TrainSettings,
    max_length: int = 128,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the trainable (LoRA) parameters of ``model`` on ``examples``; returns loss, cost and counts.

    ``on_step(step, loss)`` is called after every optimiser step (progress bars).
    """
    if len(examples) == 0:
        raise ValueError("train_lora got 0 examples")
    encoded = [encode_for_training(tokenizer, ex, max_length) for ex in examples]
    truncated = sum(1 for e in encoded if e["response_cut"])
    if truncated:
        log.warning("%d of %d examples lose the end of their answer at max_length=%d (data.max_length): they "
                    "train on answers that never end", truncated, len(encoded), max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_lora: the model has no trainable parameters (attach LoRA first)")
    device = params[0].device
    steps = total_steps(len(encoded), settings)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings, steps))
    frozen, trainable = matmul_parameter_counts(model)
    config = getattr(model, "config", None)
    num_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    width = attention_width(config)
    rng = random.Random(settings.seed)
    batches = _step_batches(encoded, settings, rng)
    step_losses: list[float] = []
    seen = tokens = 0
    flops = 0.0
    model.train()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), PeakMemory() as memory:
        torch.manual_seed(settings.seed)
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            # Token-weighted loss across the accumulated micro-batches.
            micro = next(batches)
            batch_tensors = [collate(mb, tokenizer.pad_token_id) for mb in micro]
            target_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batch_tensors)
            step_loss = 0.0
            for mb, batch in zip(micro, batch_tensors):
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                # (batch, seq, vocab) predicts token t+1 from position t
                loss_sum = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    batch["labels"][:, 1:].reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                (loss_sum / max(1, target_tokens)).backward()
                step_loss += float(loss_sum.detach()) / max(1, target_tokens)
                n_tok = int(batch["attention_mask"].sum())
                seq_len = float(batch["attention_mask"].shape[1])
                flops += lora_training_flops(frozen, trainable, n_tok, num_layers, width, seq_len)
                tokens += n_tok
                seen += len(mb)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"training loss became {step_loss} at step {step}")
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step_losses.append(step_loss)
            if on_step is not None:
                on_step(step, step_loss)
    model.eval()
    return TrainResult(
        loss=sum(step_losses) / len(step_losses),
        num_examples=seen,
        num_tokens=tokens,
        steps=steps,
        wall_s=time.perf_counter() - start,
        flops=flops,
        peak_rss_mb=memory.peak_rss_mb,
        peak_cuda_mb=memory.peak_cuda_mb,
        truncated_examples=truncated,
    )
