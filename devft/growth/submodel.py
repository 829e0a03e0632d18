"""Build a stage's submodel from a plan and the base model: a real transformers model with L_s fused layers.

The submodel shares (does not copy) the base model's embeddings, final norm and LM head, which are frozen;
its decoder layers are new modules holding the fused base weights (or, for a layer that needs no fusion, the
base layer's own tensors: shared, never written), in the order of their anchors, with
``layer_idx``, ``config.num_hidden_layers`` and ``config.layer_types`` made consistent so training,
loss and generation with a KV cache work. Fused layers are cached on disk by plan hash under
``cache_root()/submodels/v<CACHE_FORMAT>-<hash>/`` (safetensors, written atomically; layers that need no fusion are not cached), so a client process restarted every
round rebuilds its submodel by reading one file.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from devft.growth._params import base_layer_tensors, strip_peft_name
from devft.growth.fusion import fuse_base_layers, fuse_lora
from devft.growth.plan import GrowthPlan
from devft.models import FAMILIES, LoraState, cache_root, decoder_layers, replace_decoder_layers, unwrap

log = logging.getLogger(__name__)

_LAYERS_FILE = "layers.safetensors"


CACHE_FORMAT = 2
"""Version of the cached fused layers: raise it whenever fusion's arithmetic (even its rounding) or what an
entry holds changes, so an entry written by other code is never read. Version 1 entries (sessions 1-4) held
every layer, fused by an earlier summation whose results differ in the last bit of some weights: reading them
made a run depend on what the cache held, not on its seed."""


def submodel_cache_dir(plan: GrowthPlan) -> Path:
    """Where the fused layers of ``plan`` are cached: ``cache_root()/submodels/v<CACHE_FORMAT>-<build hash>``."""
    return cache_root() / "submodels" / f"v{CACHE_FORMAT}-{plan.build_hash()}"


def build_submodel(model: nn.Module, plan: GrowthPlan, use_cache: bool = True) -> nn.Module:
    """The submodel of ``plan`` built from ``model`` (the base model, plain or peft-wrapped; LoRA ignored).

    Raises :class:`~devft.growth.plan.PlanMismatchError` if ``plan`` was made for another base model.
    The result is a plain transformers model in eval mode with all parameters frozen: attach LoRA with
    :func:`devft.models.attach_lora` and load :func:`submodel_lora` into it.
    """
    plan.check_model(model)
    start = time.perf_counter()
    fused = fused_layers(model, plan, use_cache=use_cache)
    sub = assemble_submodel(model, fused, list(plan.anchors))
    log.info("built %d-layer submodel (stage %d) in %.2fs", plan.capacity, plan.stage, time.perf_counter() - start)
    return sub


def fused_layers(model: nn.Module, plan: GrowthPlan, use_cache: bool = True) -> list[dict[str, torch.Tensor]]:
    """The base tensors of each submodel layer. A layer that needs no fusion (a group of one, or any group
    under ``r-one``: the anchor as it is) is the base model's own tensors, shared, not copied: the full-depth
    stage and FedIT hold the model's weights once, not twice. Fused layers come from the disk cache, or are
    fused now (and cached)."""
    base = base_layer_tensors(model)
    kept = {k: base[group[0]] for k, group in enumerate(plan.groups) if len(group) == 1 or plan.fusion == "r-one"}
    fuse = [k for k in range(len(plan.groups)) if k not in kept]
    if not fuse:
        return [kept[k] for k in range(len(plan.groups))]
    expected = {name: tuple(t.shape) for name, t in base[0].items()}
    folder = submodel_cache_dir(plan)
    device = next(iter(base[0].values())).device  # cached layers are read onto the model's device
    fused = _read_cache(folder, fuse, expected, device) if use_cache and (folder / _LAYERS_FILE).exists() else None
    if fused is None:
        groups = [plan.groups[k] for k in fuse]
        fused = dict(zip(fuse, fuse_base_layers(model, groups, plan.fusion, plan.beta)))
        if use_cache:
            _write_cache(folder, fused, plan)
    return [kept[k] if k in kept else fused[k] for k in range(len(plan.groups))]


def _read_cache(
    folder: Path, indices: list[int], expected: Mapping[str, tuple[int, ...]], device: torch.device
) -> dict[int, dict[str, torch.Tensor]] | None:
    """The cached fused layers ``indices`` of a plan (submodel layer index → tensors), or None to rebuild."""
    try:
        flat = load_file(str(folder / _LAYERS_FILE), device=str(device))
    except Exception as err:  # torn, corrupt, or replaced by a concurrent writer: the cache is only a shortcut
        log.warning("submodel cache %s is unreadable (%s: %s): rebuilding", folder, type(err).__name__, err)
        return None
    out: dict[int, dict[str, torch.Tensor]] = {k: {} for k in indices}
    for key, tensor in flat.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) not in out:
            log.warning("submodel cache %s has an unexpected tensor %s: rebuilding", folder, key)
            return None
        out[int(index)][name] = tensor
    for layer in out.values():
        if {n: tuple(t.shape) for n, t in layer.items()} != dict(expected):
            log.warning("submodel cache %s does not match the model's layers: rebuilding", folder)
            return None
    log.debug("read fused layers from %s", folder)
    return out


def _write_cache(folder: Path, fused: Mapping[int, dict[str, torch.Tensor]], plan: GrowthPlan) -> None:
    """Write to a temporary sibling directory, then rename it into place (atomic on one file system)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        flat = {f"{k}.{name}": t.contiguous() for k, layer in fused.items() for name, t in layer.items()}
        save_file(flat, str(staging / _LAYERS_FILE), metadata={"plan": plan.to_json()})
        (staging / "plan.json").write_text(plan.to_json() + "\n")
        if folder.exists():  # a stale or concurrent entry: replace it
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except OSError as err:
        log.warning("could not cache the submodel in %s: %s", folder, err)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def assemble_submodel(
    model: nn.Module, fused: list[dict[str, torch.Tensor]], source_indices: list[int]
) -> nn.Module:
    """A copy of ``model`` whose decoder stack is new layers holding ``fused`` tensors.

    Layer ``k`` is a copy of layer ``source_indices[k]`` (its anchor: same class, buffers and attention type)
    with its parameters replaced by ``fused[k]``; peft adapters, if any, are left out.
    """
    base = unwrap(model)
    family = FAMILIES[base.config.model_type]
    layers = decoder_layers(base)
    parent_path, _, attr = family.layers_path.rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    new_layers = [_plain_layer_copy(layers[i], tensors) for i, tensors in zip(source_indices, fused)]
    setattr(parent, attr, nn.ModuleList())  # copy everything but the layers, sharing their tensors
    try:
        shared: dict[int, object] = {id(t): t for t in (*base.parameters(), *base.buffers())}
        sub = copy.deepcopy(base, shared)
    finally:
        setattr(parent, attr, layers)
    # A peft-wrapped base marks its inner model with `peft_config`; the copy is plain, so drop the marker
    # or peft would treat the submodel as already adapted.
    sub.__dict__.pop("peft_config", None)
    replace_decoder_layers(sub, new_layers, source_indices)
    sub.requires_grad_(False)
    sub.eval()
    return sub


def _plain_layer_copy(layer: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``layer`` with its base parameters replaced by ``tensors`` and any peft wrapper removed."""
    memo: dict[int, object] = {}
    names = set()
    for name, param in layer.named_parameters():
        plain = strip_peft_name(name)
        if plain is None:
            continue
        if plain not in tensors:
            raise KeyError(f"fused layer lacks tensor {plain!r}")
        names.add(plain)
        memo[id(param)] = nn.Parameter(tensors[plain], requires_grad=False)
    if names != set(tensors):
        raise KeyError(f"fused layer has unexpected tensors {sorted(set(tensors) - names)}")
    new = copy.deepcopy(layer, memo)
    for name, module in list(new.named_modules()):
        if isinstance(module, BaseTunerLayer):
            owner_name, _, child = name.rpartition(".")
            owner = new.get_submodule(owner_name) if owner_name else new
            setattr(owner, child, module.get_base_layer())
    return new


def submodel_lora(full_lora: Mapping[str, torch.Tensor], plan: GrowthPlan) -> LoraState:
    """The submodel's initial LoRA: each group's adapters fused as the plan says (the server ships this)."""
    return fuse_lora(full_lora, plan.groups, FAMILIES[plan.family], plan.fusion, plan.beta, plan.lora_fusion)
