"""Chat-template encoding with the loss on response tokens only, batching, and exact-match answer checks.

An example becomes one user turn (``instruction``, plus ``"\\n\\n" + input`` when there is an input) and
one assistant turn (``output``). No system prompt is added here; a template that inserts its own default
(SmolLM2-Instruct's does) keeps doing so, identically in training and in generation.

Prompt and response are tokenised separately, exactly as generation sees them: the prompt is the template
rendered with the generation prompt, the response is the rest of the rendered conversation up to and
including the end-of-turn token (``<|im_end|>`` for ChatML), without the whitespace that follows it.

Truncation, when ``prompt + response`` exceeds ``max_length`` tokens: the response keeps
``max(max_length - len(prompt), max_length // 2)`` tokens at most (cut on the right), and the prompt is cut
on the left to fill the rest. The end of the prompt (the question and the generation prompt) is kept, and
every example keeps at least one response token, so no example ever has only ``-100`` labels.
"""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedTokenizerBase

from devft.data.tasks import Example

IGNORE_INDEX = -100
"""Label value that the cross-entropy loss ignores (prompt and padding positions)."""


END_OF_TURN = "<|im_end|>"  # ChatML's end of a turn: what ends every trained response and every answer


def prompt_messages(example: Example) -> list[dict[str, str]]:
    """The chat messages of an example's prompt: one user turn, instruction then input if any."""
    content = example["instruction"]
    if example.get("input"):
        content = f"{content}\n\n{example['input']}"
    return [{"role": "user", "content": content}]


def _prompt_text(tokenizer: PreTrainedTokenizerBase, example: Example) -> str:
    """The prompt rendered by the chat template, ending with the generation prompt."""
    return tokenizer.apply_chat_template(prompt_messages(example), tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)  # Qwen3: no <think> block; other templates ignore it


def _render(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[str, str]:
    """Return (prompt text with the generation prompt, response text ending with the end-of-turn token)."""
    prompt = _prompt_text(tokenizer, example)
    full = tokenizer.apply_chat_template(
        [*prompt_messages(example), {"role": "assistant", "content": example["output"]}], tokenize=False,
        enable_thinking=False,
    )
    if not full.startswith(prompt):
        raise ValueError(
            "the tokenizer's chat template does not render the conversation as prompt + response "
            f"(prompt {prompt[-40:]!r} is not a prefix of {full[-80:]!r}); devft needs a ChatML-like template"
        )
    return prompt, full[len(prompt) :].rstrip()


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template already holds the special tokens: add none.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_max_length(max_length: int) -> None:
    if int(max_length) != max_length or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got max_length={max_length!r}")


def encode_for_training(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int
) -> dict[str, list[int] | int]:
    """Encode an example for causal-LM training: ``input_ids`` and ``labels`` (-100 on prompt tokens), and
    ``response_cut``, how many response tokens the truncation dropped (its end-of-turn token among them).

    At most ``max_length`` tokens; see the module docstring for how prompt and response are truncated.
    """
    _check_max_length(max_length)
    prompt_text, response_text = _render(tokenizer, example)
    prompt, response = _tokens(tokenizer, prompt_text), _tokens(tokenizer, response_text)
    if not response:
        raise ValueError(f"example has no response tokens to train on (output={example['output']!r})")
    whole = len(response)
    if len(prompt) + len(response) > max_length:
        keep_response = min(len(response), max(max_length - len(prompt), max_length // 2))
        response = response[:keep_response]
        prompt = prompt[len(prompt) - (max_length - keep_response) :]
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response,
            "response_cut": whole - len(response)}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> list[int]:
    """Token ids of the example's prompt with the generation prompt, cut on the left to ``max_length``."""
    _check_max_length(max_length)
    return _tokens(tokenizer, _prompt_text(tokenizer, example))[-max_length:]


def collate(encoded: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` (batch, seq) tensors."""
    if not encoded:
        raise ValueError("collate needs at least one encoded example, got an empty list")
    width = max(len(e["input_ids"]) for e in encoded)
    input_ids, attention_mask, labels = [], [], []
    for e in encoded:
        pad = width - len(e["input_ids"])
        input_ids.append(e["input_ids"] + [pad_id] * pad)
        attention_mask.append([1] * len(e["input_ids"]) + [0] * pad)
        labels.append(e["labels"] + [IGNORE_INDEX] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (batch, seq)
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),  # (batch, seq)
        "labels": torch.tensor(labels, dtype=torch.long),  # (batch, seq)
    }


def collate_prompts(prompt_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation into ``input_ids`` and ``attention_mask`` (batch, seq)."""
    if not prompt_ids:
        raise ValueError("collate_prompts needs at least one prompt, got an empty list")
    width = max(len(p) for p in prompt_ids)
    input_ids = [[pad_id] * (width - len(p)) + list(p) for p in prompt_ids]
    attention_mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (batch, seq)
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),  # (batch, seq)
    }


_SPACES = re.compile(r"\s+")


def normalise_answer(text: str) -> str:
    """Strip surrounding whitespace and trailing periods, and collapse inner whitespace to one space.

    Case is kept: the change-case family is about case, and every reference answer is written in the one
    form the suite teaches (``positive``, not ``Positive``).
    """
    return _SPACES.sub(" ", text.strip().rstrip(".").strip())


def answers_match(prediction: str, reference: str) -> bool:
    """Exact, case-sensitive match of two answers after :func:`normalise_answer`."""
    return normalise_answer(prediction) == normalise_answer(reference)
