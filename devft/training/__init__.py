"""Flower-free local LoRA training and held-out evaluation (reused by the client app and central runs)."""

from devft.training.evaluation import EvalResult, eval_loss, eval_loss_and_tokens, evaluate, generate_answers
from devft.training.flops import lora_training_flops, matmul_parameter_counts
from devft.training.settings import SCHEDULES, EvalSettings, TrainSettings
from devft.training.trainer import TrainResult, lr_lambda, total_steps, train_lora

__all__ = [
    "EvalResult",
    "EvalSettings",
    "SCHEDULES",
    "TrainResult",
    "TrainSettings",
    "eval_loss",
    "eval_loss_and_tokens",
    "evaluate",
    "generate_answers",
    "lora_training_flops",
    "lr_lambda",
    "matmul_parameter_counts",
    "total_steps",
    "train_lora",
]
