"""Developmental growth: stage schedule, layer similarity and grouping, fusion, submodels, plans, transfer
(of the shared LoRA and of a client's own part)."""

from devft.growth.fusion import (
    FUSION_MODES,
    LORA_FUSION_MODES,
    check_same_lora_modules,
    fuse_base_layers,
    fuse_lora,
    fuse_tensors,
    fusion_weights,
)
from devft.growth.grouping import GROUPING_MODES, SELECTION_MODES, SIMILARITY_MODES, Groups, group_layers
from devft.growth.personal import PERSONAL_FORMAT, PersonalLoRA, after_training, personal_for_plan
from devft.growth.plan import (
    PLAN_VERSION,
    GrowthPlan,
    PlanError,
    PlanMismatchError,
    make_plan,
    model_fingerprint,
    plan_stage,
)
from devft.growth.schedule import StageSchedule, doubling_capacities, make_schedule, split_rounds
from devft.growth.selection import is_selection, put_layers, select_layers
from devft.growth.settings import GrowthSettings
from devft.growth.similarity import (
    FUNCTIONAL_VIEWS,
    SIMILARITY_VIEWS,
    WEIGHT_VIEWS,
    calibration_batch,
    layer_similarity,
)
from devft.growth.submodel import (
    assemble_submodel,
    build_submodel,
    fused_layers,
    submodel_cache_dir,
    submodel_lora,
)
from devft.growth.transfer import TRANSFER_RULES, transfer_lora, untrained_lora_for_plan

__all__ = [
    "FUNCTIONAL_VIEWS",
    "FUSION_MODES",
    "GROUPING_MODES",
    "Groups",
    "GrowthPlan",
    "GrowthSettings",
    "LORA_FUSION_MODES",
    "PERSONAL_FORMAT",
    "PersonalLoRA",
    "PLAN_VERSION",
    "PlanError",
    "PlanMismatchError",
    "SELECTION_MODES",
    "SIMILARITY_MODES",
    "SIMILARITY_VIEWS",
    "StageSchedule",
    "TRANSFER_RULES",
    "WEIGHT_VIEWS",
    "after_training",
    "assemble_submodel",
    "build_submodel",
    "calibration_batch",
    "doubling_capacities",
    "check_same_lora_modules",
    "fuse_base_layers",
    "fuse_lora",
    "fuse_tensors",
    "fused_layers",
    "fusion_weights",
    "group_layers",
    "is_selection",
    "layer_similarity",
    "make_plan",
    "make_schedule",
    "model_fingerprint",
    "personal_for_plan",
    "plan_stage",
    "put_layers",
    "select_layers",
    "split_rounds",
    "submodel_cache_dir",
    "submodel_lora",
    "transfer_lora",
    "untrained_lora_for_plan",
]
