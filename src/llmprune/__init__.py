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
from llmprune.evaluation.tasks import evaluate_tasks
from llmprune.export.compressed import compress, decompress
from llmprune.export.inspection import inspect_checkpoint
from llmprune.export.load import load
from llmprune.inference.bench import BenchConfig, BenchResult, bench
from llmprune.inference.kernels import AccelerateReport, accelerate
from llmprune.models.loading import load_embedded_model, load_model, load_tokenizer
from llmprune.pipeline.report import LinearReport, PruneReport
from llmprune.sweeps import SweepConfig, SweepResult, sweep
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
    "AccelerateReport",
    "BenchConfig",
    "BenchResult",
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
    "SweepConfig",
    "SweepResult",
    "UsageError",
    "__version__",
    "accelerate",
    "bench",
    "calibration_data",
    "calibration_windows",
    "compress",
    "decompress",
    "embedded_text",
    "evaluate_tasks",
    "evaluation_data",
    "evaluation_windows",
    "finetune",
    "finetune_model",
    "inspect_checkpoint",
    "load",
    "load_embedded_model",
    "load_model",
    "load_tokenizer",
    "perplexity",
    "prune",
    "run",
    "sweep",
]
