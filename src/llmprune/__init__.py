"""llmprune: compress Hugging Face causal language models by pruning.

One-shot pruning (magnitude, Wanda, SparseGPT; unstructured, N:M and per-layer sparsity) and structured
pruning (attention heads, MLP channels, whole decoder layers); sparse fine-tuning and gradual pruning;
sweeps over methods and sparsities; perplexity and lm-eval evaluation; compressed checkpoints; and 2:4
sparse kernels for inference, with a benchmark to measure them.

The public names below are imported on first use (PEP 562), so that ``import llmprune`` is cheap: the
command line catches a Ctrl-C during its heavy imports (torch, transformers) only once this package has
been imported, and a library user pays for torch when they touch it.
"""

from __future__ import annotations

import importlib

from llmprune._lazy import attach

__version__ = "0.1.0"

__getattr__, __dir__, _names = attach(
    __name__,
    {
        "llmprune.api": ("EvalReport", "RunReport", "evaluate", "prune", "run"),
        "llmprune.config": ("EvalConfig", "PruneOptions", "RunConfig"),
        "llmprune.data.text": (
            "calibration_data",
            "calibration_windows",
            "embedded_text",
            "evaluation_data",
            "evaluation_windows",
            "heldout_data",
            "heldout_windows",
        ),
        "llmprune.errors": ("LlmpruneError", "UsageError"),
        "llmprune.evaluation.perplexity": ("perplexity",),
        "llmprune.evaluation.tasks": ("evaluate_tasks",),
        "llmprune.export.compressed": ("compress", "decompress"),
        "llmprune.export.inspection": ("inspect_checkpoint",),
        "llmprune.export.load": ("load",),
        "llmprune.inference.bench": ("BenchConfig", "BenchReport", "bench"),
        "llmprune.inference.kernels": ("SparseKernelsReport", "use_sparse_kernels"),
        "llmprune.models.loading": ("load_tokenizer",),
        "llmprune.pipeline.report": ("LinearReport", "PruneReport"),
        "llmprune.sweeps.config": ("SweepConfig",),
        "llmprune.sweeps.runner": ("SweepReport", "sweep"),
        # every public name of training/ (its own __init__ imports nothing until one is touched)
        "llmprune.training": tuple(importlib.import_module("llmprune.training").__all__),
    },
    deprecated={
        "RunResult": ("llmprune.api", "RunReport", "llmprune.RunReport"),
        "SweepResult": ("llmprune.sweeps.runner", "SweepReport", "llmprune.SweepReport"),
        "FinetuneResult": ("llmprune.training.finetuning", "FinetuneReport", "llmprune.FinetuneReport"),
        "BenchResult": ("llmprune.inference.bench", "BenchReport", "llmprune.BenchReport"),
        "AccelerateReport": (
            "llmprune.inference.kernels",
            "SparseKernelsReport",
            "llmprune.SparseKernelsReport",
        ),
        "accelerate": ("llmprune.inference.kernels", "use_sparse_kernels", "llmprune.use_sparse_kernels"),
        "load_model": ("llmprune.export.load", "load", "llmprune.load"),
        "load_embedded_model": (
            "llmprune.export.load",
            "load_embedded_model",
            "llmprune.load('smollm2') and llmprune.load_tokenizer('smollm2')",
        ),
    },
)
__all__ = sorted([*_names, "__version__"])
