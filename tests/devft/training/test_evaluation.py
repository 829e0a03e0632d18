"""Evaluation against independent computations: the held-out loss is the model's own shifted loss on the
response tokens, and a memorised answer is generated exactly, stopping at the end of the turn (a token, or
text the model spells out when the tokenizer got devft's fallback ChatML template)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from devft.data import generate_task_suite
from devft.data.formatting import collate, encode_for_training
from devft.models import load_model
from devft.training import EvalSettings, eval_loss, evaluate
from devft.training.evaluation import generate_answers


def test_eval_loss_is_the_models_own_shifted_loss_per_response_token():
    loaded = load_model("tiny-llama")
    examples = generate_task_suite(6, seed=4)
    batch = collate([encode_for_training(loaded.tokenizer, ex, 96) for ex in examples], loaded.tokenizer.pad_token_id)
    with torch.no_grad():  # transformers shifts the labels itself and averages over the tokens that count
        expected = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"]).loss
    assert eval_loss(loaded.model, loaded.tokenizer, examples, batch_size=6, max_length=96) == pytest.approx(
        float(expected), rel=1e-5)
    # in batches of 2 it is still the mean per token over all examples, not a mean of batch means
    assert eval_loss(loaded.model, loaded.tokenizer, examples, batch_size=2, max_length=96) == pytest.approx(
        float(expected), rel=1e-5)


def _tokenizer_without_chatml(path) -> None:
    """A GPT-2-like byte-level tokenizer: one special token, no chat template, no <|im_start|>/<|im_end|>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(path)


def _memorise(loaded, example, steps: int = 150) -> None:
    """Train every weight of the tiny model on one example until it is memorised (LoRA on a random tiny
    model learns too slowly to test generation with): its greedy answer is then the trained response."""
    model = loaded.model
    model.requires_grad_(True)
    model.train()
    batch = collate([encode_for_training(loaded.tokenizer, example, 96)], loaded.tokenizer.pad_token_id)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        optimiser.zero_grad()
        model(**batch).loss.backward()
        optimiser.step()
    model.eval()


@pytest.mark.parametrize("chatml_tokens", [True, False])
def test_a_memorised_answer_is_generated_exactly_and_stops_at_the_end_of_turn(tmp_path, chatml_tokens):
    loaded = load_model("tiny-gpt2")
    if not chatml_tokens:
        loaded.model.save_pretrained(tmp_path)
        _tokenizer_without_chatml(tmp_path)
        loaded = load_model(str(tmp_path))
        assert "<|im_end|>" not in loaded.tokenizer.get_vocab()  # the fallback template spells it out
    example = {"instruction": "Add the two numbers.", "input": "58 + 63", "output": "121", "family": "add"}
    _memorise(loaded, example)
    assert eval_loss(loaded.model, loaded.tokenizer, [example], 1, 96) < 0.05
    [answer] = generate_answers(loaded.model, loaded.tokenizer, [example], 1, 96, max_new_tokens=24)
    assert answer == "121"  # not "121<|im_end|>…": generation stopped at the end of the turn
    result = evaluate(loaded.model, loaded.tokenizer, [example], EvalSettings(max_new_tokens=24), max_length=96)
    assert result.accuracy == 1.0
