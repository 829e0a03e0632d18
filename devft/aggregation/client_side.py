"""What a client does for each aggregation rule, on a peft model; Flower-free.

Two calls per round cover every rule:

- :func:`prepare_round` before local training: load what the server sent (adapters, base deltas), restore
  the client's own part (FedSA-LoRA's B), freeze A (FFA-LoRA), start from fresh LoRA (FLoRA);
- :func:`finish_round` after training: the payload to send, and what the client must keep until its next
  round (FedSA-LoRA's B; store it where the client keeps state, e.g. Flower's ``context.state``, or on disk).
  When the model grows in stages (DevFT, ProgFed) the kept part must follow the stage plans:
  :mod:`devft.growth.personal` fuses it for each submodel and writes it back into the full model's.

The building blocks are public too: :func:`load_adapters`, :func:`freeze_lora_A`, :func:`reinit_lora`,
:func:`set_base_delta`, :func:`personal_state`, and, for a client that rebuilds what a rule freezes instead of
receiving it (FFA-LoRA's A), :func:`frozen_parts` and :func:`lora_digest`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

import torch
from torch import nn

from devft.aggregation.base import AggregationRule, lora_part, split_downlink

log = logging.getLogger(__name__)

_PRISTINE = "_devft_pristine_weight"  # attribute on a base layer: its weight before any base delta


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: peft LoRA layer}``, names as in peft's state-dict keys (``…q_proj``)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _adapter(layer: nn.Module) -> str:
    active = layer.active_adapters
    if len(active) != 1:
        raise ValueError(f"expected exactly one active LoRA adapter, got {active}")
    return active[0]


def _factor(layers: Mapping[str, nn.Module], key: str) -> torch.Tensor:
    parts = lora_part(key)
    if parts is None or parts[0] not in layers:
        raise KeyError(f"{key!r} is not a LoRA factor of this model")
    layer = layers[parts[0]]
    return getattr(layer, parts[1])[_adapter(layer)].weight


def load_adapters(model: nn.Module, adapters: Mapping[str, torch.Tensor]) -> None:
    """Copy the given LoRA factors (any subset of the model's, peft keys) into the model in place."""
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in adapters.items():
            param = _factor(layers, key)
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"LoRA tensor {key!r} has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(param.shape)} (a different rank?)")
            param.copy_(value.to(param.dtype))


def freeze_lora_A(model: nn.Module) -> int:
    """Stop gradients to every LoRA A (FFA-LoRA); returns how many tensors were frozen."""
    return _freeze(model, ("lora_A",))


def _freeze(model: nn.Module, parts: tuple[str, ...]) -> int:
    count = 0
    for layer in lora_layers(model).values():
        for part in parts:
            getattr(layer, part)[_adapter(layer)].weight.requires_grad_(False)
            count += 1
    return count


def reinit_lora(model: nn.Module, seed: int) -> None:
    """Fresh LoRA as peft initialises it (A Kaiming-uniform from ``seed``, B = 0), e.g. each FLoRA round."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in lora_layers(model).values():
            layer.reset_lora_parameters(_adapter(layer), init_lora_weights=True)


def set_base_delta(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """Make every adapted module's frozen weight ``W₀ + deltas[module]`` (set, not add).

    ``deltas``: ``{module: dense (d_out, d_in) delta}`` (what :func:`~devft.aggregation.base.split_downlink`
    returns). ``W₀`` is the weight the module had before the first call (kept on the module), so calling this
    each round with the cumulative delta is idempotent; modules missing from ``deltas`` go back to ``W₀``.
    GPT-2's transposed Conv1D weights are handled (peft's ``fan_in_fan_out``).

    ``W₀`` is never written: the weight gets a new tensor instead, so a submodel whose layers share their
    tensors with the base model (:func:`devft.growth.build_submodel` shares every layer it does not fuse)
    leaves the base model as it was.
    """
    layers = lora_layers(model)
    unknown = sorted(set(deltas) - set(layers))
    if unknown:
        raise KeyError(f"base delta for modules the model does not adapt: {unknown[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.get_base_layer()
            pristine = getattr(base, _PRISTINE, None)
            if name not in deltas:
                if pristine is not None:  # back to W₀ itself: nothing extra kept (or copied with the module)
                    base.weight.data = pristine
                    delattr(base, _PRISTINE)
                continue
            if pristine is None:
                pristine = base.weight.data  # the tensor itself, maybe the base model's too: never written
                setattr(base, _PRISTINE, pristine)
            delta = deltas[name].to(torch.float32)
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            if tuple(delta.shape) != tuple(base.weight.shape):
                raise ValueError(f"base delta for {name!r} has shape {tuple(deltas[name].shape)}, the weight is "
                                 f"{tuple(base.weight.shape)}")
            base.weight.data = (pristine.to(torch.float32) + delta.to(pristine.device)).to(pristine.dtype)


def personal_state(model: nn.Module, rule: AggregationRule) -> dict[str, torch.Tensor]:
    """The LoRA parts a personalised rule keeps on the client (FedSA-LoRA: every B), as CPU copies."""
    if not rule.personalised:
        return {}
    from devft.models import lora_state

    state = lora_state(model)
    return {k: v.detach().cpu().clone() for k, v in state.items()
            if (parts := lora_part(k)) is not None and parts[1] not in rule.uploads}


def frozen_parts(state: Mapping[str, torch.Tensor], rule: AggregationRule) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that ``rule``'s clients never train (FFA-LoRA: every A); empty for most rules."""
    return {k: v for k, v in state.items() if (parts := lora_part(k)) is not None and parts[1] in rule.frozen}


def lora_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over ``state``'s keys (sorted) and values as contiguous float32 bytes: how a client that rebuilds
    a frozen part itself (FFA-LoRA's A) checks it holds, bit for bit, what the server would have sent."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def prepare_round(
    model: nn.Module,
    rule: AggregationRule,
    downlink: Mapping[str, torch.Tensor],
    *,
    personal: Mapping[str, torch.Tensor] | None = None,
    seed: int | None = None,
) -> None:
    """Put the model where ``rule`` wants it before local training.

    ``downlink``: what the server sent (``rule.downlink(state)``, e.g. read from the ArrayRecord);
    ``personal``: what :func:`finish_round` returned last time (FedSA-LoRA; None in a client's first round,
    when it keeps its initial B = 0); ``seed``: the round's seed for FLoRA's fresh LoRA (required there).
    """
    adapters, deltas = split_downlink(downlink)
    if rule.changes_base or deltas:
        set_base_delta(model, deltas)
    if rule.fresh_lora_each_round:
        if seed is None:
            raise ValueError(f"rule {rule.name!r} starts each round from fresh LoRA: pass the round's seed")
        reinit_lora(model, seed)
    load_adapters(model, adapters)
    if rule.personalised and personal:
        load_adapters(model, personal)
    if rule.frozen:
        _freeze(model, rule.frozen)


def finish_round(model: nn.Module, rule: AggregationRule) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(payload to send, state to keep until the next round)`` after local training."""
    from devft.models import lora_state

    payload = {k: v.detach().cpu().clone() for k, v in rule.client_payload(lora_state(model)).items()}
    return payload, personal_state(model, rule)
