"""Similarity between decoder layers, on weights (base, base + LoRA, LoRA only) or on what layers compute.

Weight views (no forward pass):

- ``flat``: the paper's ``cos(θ_i, θ_j)`` with θ_i every parameter of layer i flattened into one vector,
  adapted matrices taken as their effective weight ``W0 + s·B·A`` (s = alpha / r). ``flat-base`` ignores LoRA.
- ``module``: the cosine of each parameter tensor (``q_proj.weight``, ``input_layernorm.weight`` …) computed
  separately, then averaged over the layer's tensors; ``module-base`` ignores LoRA.
- ``lora``: the cosine of the updates ``ΔW = B·A`` of each adapted module, averaged over modules (needs a
  LoRA state whose B is not all zero).

Functional views (one forward pass of the full model, with its LoRA, on a small calibration batch):

- ``hidden``: the cosine between layers' outputs (the residual stream after layer i), per token, averaged.
- ``cka``: linear CKA between layers' outputs over the calibration tokens.
- ``update-cka``: linear CKA between layers' updates ``h_out − h_in`` (what each layer adds).

The first token of each sequence (an attention sink with outsized activations) is left out of the
functional views. Every view returns a symmetric ``(L, L)`` float64 matrix with a unit diagonal.

Weight views never build an effective weight: ``<W0_i + sΔ_i, W0_j + sΔ_j>`` is expanded into base-base dot
products of tensors that already exist, ``<W0_i, B_j A_j> = Σ (B_jᵀ W0_i) ⊙ A_j`` and
``<B_i A_i, B_j A_j> = Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ)``, so the extra memory is a few (r·L, d) matrices.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from devft.growth._params import base_layer_tensors, lora_modules
from devft.models import decoder_layers, family_of, unwrap

log = logging.getLogger(__name__)

WEIGHT_VIEWS = ("flat", "flat-base", "module", "module-base", "lora")
FUNCTIONAL_VIEWS = ("hidden", "cka", "update-cka")
SIMILARITY_VIEWS = WEIGHT_VIEWS + FUNCTIONAL_VIEWS

MAX_CALIBRATION_TOKENS = 512  # CKA keeps (tokens, tokens) Gram matrices per layer

CALIBRATION_TEXTS: tuple[str, ...] = (
    "The capital of France is Paris, a city known for its museums, cafes and the Eiffel Tower.",
    "Write a short poem about the sea at night.",
    "What is 17 plus 25? Answer with a number only.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "Summarise in one sentence: the meeting was moved from Monday to Thursday because the room was booked.",
    "Translate into French: Good morning, how are you today?",
    "List three fruits that are yellow.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside plant leaves.",
    "Is the following review positive or negative? The soup was cold and the waiter was rude.",
    "Sort these numbers from smallest to largest: 42, 7, 19, 3, 88.",
    "Once upon a time, a young fox lived at the edge of a quiet forest and dreamed of the mountains.",
    "Convert 3 kilometres into metres.",
    "Explain why the sky looks blue during the day.",
    "Rewrite in capital letters: the quick brown fox jumps over the lazy dog.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them.",
    "Give the date 2024-03-15 in the format March 15, 2024.",
)


def calibration_batch(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] | None = None,
    num_sequences: int = 16,
    max_length: int = 64,
) -> dict[str, torch.Tensor]:
    """Tokenise calibration texts (plain text, right-padded): ``input_ids`` and ``attention_mask``.

    ``texts`` defaults to the first ``num_sequences`` of the built-in :data:`CALIBRATION_TEXTS` (cycled),
    so the server computes functional similarity without any client data; given ``texts`` are all used.
    """
    chosen = list(texts) if texts is not None else [
        CALIBRATION_TEXTS[i % len(CALIBRATION_TEXTS)] for i in range(num_sequences)
    ]
    if not chosen:
        raise ValueError("calibration_batch got no texts")
    ids = [list(tokenizer(text)["input_ids"])[:max_length] for text in chosen]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (sequences, tokens)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def layer_similarity(
    model: nn.Module,
    view: str,
    lora: Mapping[str, torch.Tensor] | None = None,
    lora_scale: float = 1.0,
    calibration: Mapping[str, torch.Tensor] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> np.ndarray:
    """The ``(L, L)`` similarity matrix of ``model``'s decoder layers on ``view`` (see the module docstring).

    ``lora`` is a full-model LoRA state (peft keys) with update scale ``lora_scale`` (alpha / r); a peft
    wrapper's own adapters are ignored, only ``lora`` counts. Functional views need ``calibration`` (from
    :func:`calibration_batch`) or a ``tokenizer`` to build the default one.
    """
    if view not in SIMILARITY_VIEWS:
        raise ValueError(f"unknown similarity view={view!r}; choose one of {SIMILARITY_VIEWS}")
    if view in FUNCTIONAL_VIEWS:
        if calibration is None:
            if tokenizer is None:
                raise ValueError(f"similarity view={view!r} needs a calibration batch or a tokenizer")
            calibration = calibration_batch(tokenizer)
        return _functional_similarity(model, view, lora, lora_scale, calibration)
    use_lora = lora if view in ("flat", "module", "lora") else None
    if view == "lora" and (lora is None or not any(bool(t.any()) for k, t in lora.items() if "lora_B" in k)):
        raise ValueError("similarity view='lora' needs a LoRA state with non-zero B (train at least one stage)")
    grams = _weight_grams(model, use_lora, lora_scale)
    if view in ("flat", "flat-base"):
        return _cosine(sum(grams.values()))
    if view == "lora":
        lora_grams = _lora_grams(model, lora or {})
        return np.mean([_cosine(g) for g in lora_grams.values()], axis=0)
    return np.mean([_cosine(g) for g in grams.values()], axis=0)


def _cosine(gram: np.ndarray) -> np.ndarray:
    """Cosine matrix from a Gram matrix; pairs involving a zero vector get 0 (the diagonal stays 1)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
    cos = np.clip((cos + cos.T) / 2, -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    return cos


def _as_out_in(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as a (d_out, d_in) view (GPT-2's Conv1D stores (d_in, d_out))."""
    return weight.T if fan_in_fan_out else weight


def _weight_grams(
    model: nn.Module, lora: Mapping[str, torch.Tensor] | None, scale: float
) -> dict[str, np.ndarray]:
    """Per parameter name, the (L, L) Gram matrix of the layers' (effective) tensors, in float64."""
    family = family_of(model)
    params = base_layer_tensors(model)
    num_layers = len(params)
    adapters = lora_modules(lora, family) if lora else {}
    grams: dict[str, np.ndarray] = {}
    for name in params[0]:
        gram = np.zeros((num_layers, num_layers))
        flat = [params[i][name].reshape(-1) for i in range(num_layers)]  # views, no copies
        # a 16-bit dot returns a 16-bit number: float16 overflows past 65 504 (the diagonal of a large layer,
        # which turned the whole matrix into the identity); widened one pair at a time, so at most two copies
        wide = (lambda t: t.float()) if flat[0].element_size() < 4 else (lambda t: t)
        for i in range(num_layers):
            row = wide(flat[i])
            for j in range(i, num_layers):
                gram[i, j] = gram[j, i] = float(torch.dot(row, wide(flat[j])))
        module = name.removesuffix(".weight")
        if adapters and all(module in adapters.get(i, {}) for i in range(num_layers)):
            gram += _lora_terms(
                [_as_out_in(params[i][name], family.fan_in_fan_out) for i in range(num_layers)],
                [adapters[i][module] for i in range(num_layers)],
                scale,
            )
        grams[name] = gram
    return grams


def _lora_terms(
    weights: Sequence[torch.Tensor], factors: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float
) -> np.ndarray:
    """``s(<W_i, Δ_j> + <Δ_i, W_j>) + s²<Δ_i, Δ_j>`` for Δ = B·A, without forming any Δ or W + Δ."""
    num_layers = len(weights)
    if not any(bool(b.any()) for _, b in factors):
        return np.zeros((num_layers, num_layers))  # B = 0 everywhere: effective weights are the base weights
    rank = factors[0][0].shape[0]
    device = weights[0].device  # the LoRA state may be on the CPU while the model is not
    factors = [(a.to(device), b.to(device)) for a, b in factors]
    b_t = torch.cat([b.T.to(torch.float32) for _, b in factors])  # (L·r, d_out)
    cross = np.zeros((num_layers, num_layers))  # cross[i, j] = <W_i, B_j A_j>
    for i, w in enumerate(weights):
        proj = b_t @ w.to(torch.float32)  # (L·r, d_in): row block j is B_jᵀ W_i
        for j, (a, _) in enumerate(factors):
            cross[i, j] = float((proj[j * rank : (j + 1) * rank] * a).sum())
    return scale * (cross + cross.T) + scale**2 * _delta_gram(factors)


def _delta_gram(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """``<B_i A_i, B_j A_j> = Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ)``: (r, r) products only."""
    n = len(factors)
    gram = np.zeros((n, n))
    for i, (a_i, b_i) in enumerate(factors):
        for j in range(i, n):
            a_j, b_j = factors[j]
            gram[i, j] = gram[j, i] = float(((b_i.T @ b_j) * (a_i @ a_j.T)).sum())
    return gram


def _lora_grams(model: nn.Module, lora: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per adapted module present in every layer, the (L, L) Gram matrix of the updates B·A."""
    num_layers = len(decoder_layers(model))
    adapters = lora_modules(lora, family_of(model))
    modules = sorted(set.intersection(*(set(adapters.get(i, {})) for i in range(num_layers))))
    if not modules:
        raise ValueError("the LoRA state adapts no module in every layer; the 'lora' view is undefined")
    return {m: _delta_gram([adapters[i][m] for i in range(num_layers)]) for m in modules}


# ---------------------------------------------------------------------------------------------- functional


def _functional_similarity(
    model: nn.Module,
    view: str,
    lora: Mapping[str, torch.Tensor] | None,
    scale: float,
    calibration: Mapping[str, torch.Tensor],
) -> np.ndarray:
    inputs, outputs = _layer_activations(model, lora, scale, calibration)
    if view == "hidden":
        unit = torch.nn.functional.normalize(torch.stack(outputs).double(), dim=-1)  # (L, tokens, hidden)
        sims = torch.einsum("itd,jtd->ij", unit, unit) / unit.shape[1]
        return _cosine(sims.numpy())
    feats = outputs if view == "cka" else [o - i for i, o in zip(inputs, outputs)]
    grams = [_centred_gram(f) for f in feats]
    gram = np.array([[float((gi * gj).sum()) for gj in grams] for gi in grams])  # HSIC up to a constant
    return _cosine(gram)


def _centred_gram(features: torch.Tensor) -> torch.Tensor:
    """Centred linear kernel ``H X Xᵀ H`` of (tokens, hidden) features, in float64."""
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T  # (tokens, tokens)


@torch.no_grad()
def _layer_activations(
    model: nn.Module,
    lora: Mapping[str, torch.Tensor] | None,
    scale: float,
    calibration: Mapping[str, torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each decoder layer's input and output hidden states on the kept calibration tokens: (tokens, hidden)."""
    layers = decoder_layers(model)
    device = next(layers[0].parameters()).device  # the calibration batch goes where the model is
    mask = calibration["attention_mask"].bool().clone()
    first = mask.float().argmax(dim=1)
    mask[torch.arange(mask.shape[0]), first] = False  # drop each sequence's first (attention-sink) token
    keep = mask.reshape(-1).nonzero().squeeze(1)
    if keep.numel() > MAX_CALIBRATION_TOKENS:  # evenly strided subset
        keep = keep[torch.linspace(0, keep.numel() - 1, MAX_CALIBRATION_TOKENS).round().long()]
    captured_in: list[torch.Tensor | None] = [None] * len(layers)
    captured_out: list[torch.Tensor | None] = [None] * len(layers)

    def capture(index: int) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            rows = keep.to(hidden_in.device)
            captured_in[index] = hidden_in.reshape(-1, hidden_in.shape[-1])[rows].float().cpu()
            captured_out[index] = hidden_out.reshape(-1, hidden_out.shape[-1])[rows].float().cpu()

        return hook

    handles = [layer.register_forward_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += _lora_hooks(model, lora, scale)
    was_training = model.training
    model.eval()
    # Run the decoder stack only (no LM head): its parent module, e.g. LlamaModel or GPT2Model.
    base = unwrap(model)
    parent_path = family_of(base).layers_path.rpartition(".")[0]
    trunk = base.get_submodule(parent_path) if parent_path else base
    disable = getattr(model, "disable_adapter", None)
    try:
        with disable() if callable(disable) else contextlib.nullcontext():  # only `lora` counts
            trunk(input_ids=calibration["input_ids"].to(device), attention_mask=calibration["attention_mask"].to(device),
                  use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if any(t is None for t in captured_out):
        raise RuntimeError("a decoder layer did not run during the calibration forward pass")
    return captured_in, captured_out  # type: ignore[return-value]


def _lora_hooks(model: nn.Module, lora: Mapping[str, torch.Tensor] | None, scale: float) -> list:
    """Forward hooks adding ``s·B·A·x`` to each adapted base module's output (peft's LoRA forward, no dropout)."""
    if not lora:
        return []
    layers = decoder_layers(model)
    handles = []
    for index, modules in lora_modules(lora, family_of(model)).items():
        for name, (a, b) in modules.items():
            target = layers[index].get_submodule(name)
            get_base = getattr(target, "get_base_layer", None)
            target = get_base() if callable(get_base) else target
            a, b = a.to(target.weight.device), b.to(target.weight.device)

            def hook(_module: nn.Module, args: tuple, output: torch.Tensor, a=a, b=b) -> torch.Tensor:
                x = args[0].to(a.dtype)  # peft keeps LoRA in float32 on a 16-bit model; the output keeps its dtype
                term = scale * torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
                return output + term.to(output.dtype)

            handles.append(target.register_forward_hook(hook))
    return handles
