"""Training-time pruning: gradual pruning schedules, masks that hold under any optimizer, a
``transformers.TrainerCallback`` and sparse fine-tuning (optionally distilled from the dense model).

Its names are imported on first use, and ``llmprune`` re-exports every one of them (``__all__``).
"""

from llmprune._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "llmprune.training.config": ("FinetuneConfig", "FinetuneOptions"),
        "llmprune.training.finetuning": ("FinetuneReport", "finetune", "finetune_model"),
        "llmprune.training.masks": ("SparsityMasks",),
        "llmprune.training.pruner": ("GradualPruner", "PruningCallback"),
        "llmprune.training.schedule": ("Schedule", "sparsity_at"),
    },
)
