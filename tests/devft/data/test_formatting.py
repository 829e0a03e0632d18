"""Tests for devft/data/formatting.py with the byte tokenizer (one token per ASCII character) and SmolLM2's."""

from __future__ import annotations

import pytest
import torch

from devft.data.formatting import (
    IGNORE_INDEX,
    answers_match,
    collate,
    collate_prompts,
    encode_for_training,
    encode_prompt,
    normalise_answer,
    prompt_messages,
)
from devft.data.tasks import generate_task_suite
from devft.models import load_model
from devft.models.byte_tokenizer import byte_tokenizer

# ChatML as the byte tokenizer renders it: every ASCII character is one token, every marker is one token.
PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
PROMPT_LEN = 1 + len("user\nHi") + 1 + len("\n") + 1 + len("assistant\n")  # 21
HI_OK = {"instruction": "Hi", "input": "", "output": "ok", "family": "user"}


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from devft.models.smollm2 import smollm2_dir

    return AutoTokenizer.from_pretrained(str(smollm2_dir()))


def _response_labels(encoded: dict[str, list[int]]) -> list[int]:
    return [t for t in encoded["labels"] if t != IGNORE_INDEX]


def test_prompt_messages_joins_instruction_and_input() -> None:
    assert prompt_messages({"instruction": "Add.", "input": "1 + 2", "output": "3", "family": "add"}) == [
        {"role": "user", "content": "Add.\n\n1 + 2"}
    ]
    assert prompt_messages(HI_OK) == [{"role": "user", "content": "Hi"}]


def test_byte_tokenizer_encoding_by_hand(byte_tok) -> None:
    encoded = encode_for_training(byte_tok, HI_OK, max_length=64)
    assert byte_tok.decode(encoded["input_ids"]) == PROMPT + "ok<|im_end|>"
    assert len(encoded["input_ids"]) == PROMPT_LEN + 3
    assert encoded["labels"][:PROMPT_LEN] == [IGNORE_INDEX] * PROMPT_LEN
    assert encoded["labels"][PROMPT_LEN:] == encoded["input_ids"][PROMPT_LEN:]
    assert byte_tok.decode(_response_labels(encoded)) == "ok<|im_end|>"
    assert encode_prompt(byte_tok, HI_OK, 64) == encoded["input_ids"][:PROMPT_LEN]


def test_smollm2_encoding_keeps_response_and_end_of_turn(smol_tok) -> None:
    example = {"instruction": "Add the two numbers.", "input": "58 + 63", "output": "121", "family": "add"}
    encoded = encode_for_training(smol_tok, example, max_length=128)
    response = _response_labels(encoded)
    assert smol_tok.decode(response) == "121<|im_end|>"
    assert response[-1] == smol_tok.convert_tokens_to_ids("<|im_end|>")
    prompt = encode_prompt(smol_tok, example, 128)
    assert encoded["input_ids"] == prompt + response
    text = smol_tok.decode(prompt)
    assert text.endswith(
        "<|im_start|>user\nAdd the two numbers.\n\n58 + 63<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<|im_start|>system\n" in text  # SmolLM2's template adds its default system prompt


def test_truncation_cuts_prompt_on_the_left_and_keeps_the_response(byte_tok) -> None:
    full = encode_for_training(byte_tok, HI_OK, max_length=64)
    cut = encode_for_training(byte_tok, HI_OK, max_length=PROMPT_LEN + 1)  # 22: two prompt tokens go
    assert cut["input_ids"] == full["input_ids"][2:]
    assert cut["labels"] == full["labels"][2:]


def test_long_response_keeps_half_the_budget(byte_tok) -> None:
    example = {**HI_OK, "output": "x" * 50}
    encoded = encode_for_training(byte_tok, example, max_length=30)
    # response budget max(30 - 21, 30 // 2) = 15 tokens; the prompt keeps its last 15 tokens
    assert len(encoded["input_ids"]) == 30
    assert byte_tok.decode(_response_labels(encoded)) == "x" * 15
    assert byte_tok.decode(encoded["input_ids"][:15]) == "Hi<|im_end|>\n<|im_start|>assistant\n"
    assert encoded["response_cut"] == 50 + 1 - 15  # 50 x's and <|im_end|> (one token each), 15 kept
    assert encode_for_training(byte_tok, HI_OK, max_length=30)["response_cut"] == 0


@pytest.mark.parametrize("max_length", [2, 3, 5, 21, 22, 40])
def test_every_length_keeps_a_response_token(byte_tok, max_length: int) -> None:
    long_both = {
        "instruction": "word " * 30,
        "input": "more " * 10,
        "output": "answer " * 10,
        "family": "user",
    }
    for example in (HI_OK, long_both):
        encoded = encode_for_training(byte_tok, example, max_length=max_length)
        assert len(encoded["input_ids"]) == len(encoded["labels"]) <= max_length
        assert len(_response_labels(encoded)) >= 1


def test_prompt_truncation_keeps_the_generation_prompt(byte_tok) -> None:
    assert byte_tok.decode(encode_prompt(byte_tok, HI_OK, 10)) == "assistant\n"


def test_max_length_below_two_raises(byte_tok) -> None:
    with pytest.raises(ValueError, match="max_length=1"):
        encode_for_training(byte_tok, HI_OK, max_length=1)
    with pytest.raises(ValueError, match="max_length=0"):
        encode_prompt(byte_tok, HI_OK, max_length=0)


def test_suite_fits_short_sequences_on_smollm2(smol_tok) -> None:
    # Calibration trains with max_length 96: no suite example may need truncation there.
    for example in generate_task_suite(200, seed=0):
        encoded = encode_for_training(smol_tok, example, max_length=512)
        assert len(encoded["input_ids"]) <= 96, example


def test_collate_right_pads_by_hand() -> None:
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_prompts_left_pads_by_hand() -> None:
    batch = collate_prompts([[1, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_rejects_empty_batches() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="empty"):
        collate_prompts([], pad_id=0)


def test_batch_trains_a_tiny_model_on_response_tokens_only() -> None:
    loaded = load_model("tiny-llama")
    tok = loaded.tokenizer
    examples = generate_task_suite(4, seed=0)
    batch = collate([encode_for_training(tok, e, 96) for e in examples], tok.pad_token_id)
    loss = loaded.model(**batch).loss
    assert torch.isfinite(loss)
    # The tiny models use the byte tokenizer: each output character plus <|im_end|> is one labelled token.
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(len(e["output"]) + 1 for e in examples)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("  85. ", "85", True),
        ("85\n", "85", True),
        ("1, 2,  3", "1, 2, 3", True),
        ("Smith, Alice.", "Smith, Alice", True),
        ("Positive", "positive", False),
        ("hello world", "HELLO WORLD", False),
        ("8 5", "85", False),
        ("The answer is 85", "85", False),
    ],
)
def test_answers_match(prediction: str, reference: str, expected: bool) -> None:
    assert answers_match(prediction, reference) is expected


def test_normalise_answer_keeps_case_and_inner_punctuation() -> None:
    assert normalise_answer(" Smith,  Alice. \n") == "Smith, Alice"
    assert normalise_answer("1965-06-10") == "1965-06-10"


# A template that, like Qwen3's, renders an assistant turn after an empty reasoning block, and puts that block
# into the generation prompt only when the caller passes enable_thinking=False (written for this test; the
# layout is what matters): without the flag the block would become part of every trained response.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_a_thinking_template_trains_and_prompts_without_a_reasoning_block(byte_tok) -> None:
    byte_tok.chat_template = THINKING_TEMPLATE
    example = {"instruction": "Add.", "input": "58 + 63", "output": "121", "family": "add"}
    encoded = encode_for_training(byte_tok, example, 96)
    response = [t for t in encoded["labels"] if t != IGNORE_INDEX]
    assert byte_tok.decode(response) == "121<|im_end|>"  # the answer is what is trained, not <think>…
    assert byte_tok.decode(encode_prompt(byte_tok, example, 96)).endswith("assistant\n<think>\n\n</think>\n\n")
