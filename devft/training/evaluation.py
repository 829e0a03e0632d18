"""Evaluation on held-out examples: response-token loss and exact-match accuracy by greedy generation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from devft.data.formatting import (
    END_OF_TURN,
    answers_match,
    collate,
    collate_prompts,
    encode_for_training,
    encode_prompt,
)
from devft.training.settings import EvalSettings

Example = dict[str, str]


@dataclass
class EvalResult:
    """Held-out metrics of one model state."""

    loss: float  # mean cross-entropy per response token
    accuracy: float | None  # exact-match rate of greedy answers; None when generation was off
    num_examples: int
    family_accuracy: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt input, reference, answer)


def eval_loss(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int, max_length: int
) -> float:
    """Mean cross-entropy per response token over ``examples`` (teacher forcing)."""
    return eval_loss_and_tokens(model, tokenizer, examples, batch_size, max_length)[0]


@torch.no_grad()
def eval_loss_and_tokens(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int, max_length: int
) -> tuple[float, int]:
    """:func:`eval_loss` and the number of response tokens it averages over (the weight that pools losses of
    several sets into the loss of their union)."""
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    count = 0
    encoded = [encode_for_training(tokenizer, ex, max_length) for ex in examples]
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]  # (batch, seq-1)
        total += float(
            nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        count += int((labels != -100).sum())
    return total / max(1, count), count


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to ``examples`` (left-padded batches), decoded up to the end-of-turn marker.

    ``<|im_end|>`` ends a turn: as one token where the vocabulary has it, otherwise (a tokenizer that got
    devft's fallback ChatML template, e.g. GPT-2's) as text the model learnt to spell out, on which generation
    stops too (``stop_strings``) and where the decoded answer is cut.
    """
    model.eval()
    device = next(model.parameters()).device
    marker_is_token = END_OF_TURN in tokenizer.get_vocab()
    stop_ids = sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN) if marker_is_token
                                   else None) if i is not None and i >= 0})
    by_text = {} if marker_is_token else {"stop_strings": [END_OF_TURN], "tokenizer": tokenizer}
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [encode_prompt(tokenizer, ex, max_length) for ex in examples[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
            **by_text,
        )
        for row in out[:, batch["input_ids"].shape[1] :]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).split(END_OF_TURN)[0])
    return answers


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: EvalSettings | None = None,
    max_length: int = 128,
) -> EvalResult:
    """Loss and (when ``settings.generate``) exact-match accuracy, overall and per task family."""
    settings = settings or EvalSettings()
    if settings.max_examples:
        examples = examples[: settings.max_examples]
    if len(examples) == 0:
        raise ValueError("evaluate got 0 examples")
    loss = eval_loss(model, tokenizer, examples, settings.batch_size, max_length)
    if not settings.generate:
        return EvalResult(loss=loss, accuracy=None, num_examples=len(examples))
    answers = generate_answers(model, tokenizer, examples, settings.batch_size, max_length, settings.max_new_tokens)
    hits: dict[str, list[bool]] = defaultdict(list)
    correct = []
    for ex, answer in zip(examples, answers):
        ok = answers_match(answer, ex["output"])
        correct.append(ok)
        hits[ex.get("family", "user")].append(ok)
    return EvalResult(
        loss=loss,
        accuracy=sum(correct) / len(correct),
        num_examples=len(examples),
        family_accuracy={fam: sum(v) / len(v) for fam, v in sorted(hits.items())},
        samples=[(ex["input"] or ex["instruction"], ex["output"], a) for ex, a in zip(examples[:5], answers[:5])],
    )
