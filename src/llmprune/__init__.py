"""llmprune: one-shot pruning of Hugging Face causal language models (magnitude, Wanda, SparseGPT)."""

__version__ = "0.1.0"

from llmprune.api import RunResult, prune, run
from llmprune.config import EvalConfig, PruneOptions, RunConfig
from llmprune.data.text import (
    calibration_data,
    calibration_windows,
    embedded_text,
    evaluation_data,
    evaluation_windows,
)
from llmprune.errors import LlmpruneError, UsageError
from llmprune.evaluation.perplexity import perplexity
from llmprune.export.load import load
from llmprune.models.loading import load_embedded_model, load_model, load_tokenizer
from llmprune.pipeline.report import LinearReport, PruneReport
from llmprune.training import (
    FinetuneConfig,
    FinetuneResult,
    GradualPruner,
    PruningCallback,
    Schedule,
    SparsityMasks,
    finetune,
    finetune_model,
)

__all__ = [
    "EvalConfig",
    "FinetuneConfig",
    "FinetuneResult",
    "GradualPruner",
    "LinearReport",
    "LlmpruneError",
    "PruneOptions",
    "PruneReport",
    "PruningCallback",
    "RunConfig",
    "RunResult",
    "Schedule",
    "SparsityMasks",
    "UsageError",
    "__version__",
    "calibration_data",
    "calibration_windows",
    "embedded_text",
    "evaluation_data",
    "evaluation_windows",
    "finetune",
    "finetune_model",
    "load",
    "load_embedded_model",
    "load_model",
    "load_tokenizer",
    "perplexity",
    "prune",
    "run",
]
