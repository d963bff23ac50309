"""Training-time pruning: gradual pruning schedules, masks that hold under any optimizer, a
``transformers.TrainerCallback`` and sparse fine-tuning (optionally distilled from the dense model)."""

from llmprune.training.config import FinetuneConfig, FinetuneOptions
from llmprune.training.finetuning import FinetuneResult, finetune, finetune_model
from llmprune.training.masks import SparsityMasks
from llmprune.training.pruner import GradualPruner, PruningCallback
from llmprune.training.schedule import Schedule, sparsity_at

__all__ = [
    "FinetuneConfig",
    "FinetuneOptions",
    "FinetuneResult",
    "GradualPruner",
    "PruningCallback",
    "Schedule",
    "SparsityMasks",
    "finetune",
    "finetune_model",
    "sparsity_at",
]
