"""Load a causal LM by devft name (``smollm2-135m``, ``tiny-llama`` …), Hugging Face id or local path."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from devft.models.byte_tokenizer import CHATML_TEMPLATE
from devft.models.families import Family, family_of
from devft.models.smollm2 import smollm2_dir
from devft.models.tiny import tiny_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2")
EMBEDDED_MODELS = (DEFAULT_MODEL, *TINY_MODELS)


@dataclass
class LoadedModel:
    """A causal LM ready for LoRA: the model (eval mode, frozen), its tokenizer and its family."""

    name: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    family: Family

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``name``: an embedded name, a local directory, or a Hugging Face id (needs a reachable hub).

    Raises ``ValueError`` for a name that is none of these, and
    :class:`~devft.models.families.UnsupportedArchitectureError` for an architecture devft cannot grow.
    """
    if name in TINY_MODELS:
        model, tokenizer = tiny_model(name.removeprefix("tiny-"))
    else:
        expanded = Path(name).expanduser()  # ~/models/x is a path, as the shell would read it
        source = smollm2_dir() if name == DEFAULT_MODEL else (expanded if expanded.exists() else name)
        model, tokenizer = _from_pretrained(source, name, dtype)
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    family = family_of(model)  # refuses unsupported architectures before anyone trains on them
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, family=family)


def _from_pretrained(source: Path | str, name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    looks_like_path = Path(str(source)).exists()
    looks_like_hub_id = str(source).count("/") == 1 and not str(source).startswith((".", "/"))
    if not looks_like_path and not looks_like_hub_id:
        raise ValueError(
            f"unknown model name={name!r}: not one of {list(EMBEDDED_MODELS)}, not an existing directory, "
            "and not a Hugging Face id of the form 'org/name'"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except (OSError, ValueError) as err:  # a folder that is no model raises either, e.g. about a tokenizer backend
        taken_as = "" if looks_like_path else (f"; there is no folder {Path(str(source)).resolve()}, so it was "
                                               "read as a Hugging Face id")
        raise ValueError(f"could not load model name={name!r} (is {str(source)!r} a causal LM's folder or hub "
                         f"id?{taken_as}): {err}") from err
    return model, tokenizer
