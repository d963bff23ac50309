"""llmprune: one-shot pruning of Hugging Face causal language models (magnitude, Wanda, SparseGPT).

The public names below are imported on first use (PEP 562), so that ``import llmprune`` is cheap: the
command line catches a Ctrl-C during its heavy imports (torch, transformers) only once this package has
been imported, and a library user pays for torch when they touch it.
"""

from __future__ import annotations

import importlib
from typing import Any

from llmprune.storage import VERSION as __version__  # noqa: F401  (written in storage only)

_EXPORTS = {
    "llmprune.api": ("RunResult", "prune", "run"),
    "llmprune.config": ("EvalConfig", "PruneOptions", "RunConfig"),
    "llmprune.data.text": (
        "calibration_data",
        "calibration_windows",
        "embedded_text",
        "evaluation_data",
        "evaluation_windows",
    ),
    "llmprune.errors": ("LlmpruneError", "UsageError"),
    "llmprune.evaluation.perplexity": ("perplexity",),
    "llmprune.evaluation.tasks": ("evaluate_tasks",),
    "llmprune.export.compressed": ("compress", "decompress"),
    "llmprune.export.inspection": ("inspect_checkpoint",),
    "llmprune.export.load": ("load", "load_embedded_model", "load_model"),
    "llmprune.inference.bench": ("BenchConfig", "BenchResult", "bench"),
    "llmprune.inference.kernels": ("AccelerateReport", "accelerate"),
    "llmprune.models.loading": ("load_tokenizer",),
    "llmprune.pipeline.report": ("LinearReport", "PruneReport"),
    "llmprune.sweeps": ("SweepConfig", "SweepResult", "sweep"),
    "llmprune.training": (
        "FinetuneConfig",
        "FinetuneResult",
        "GradualPruner",
        "PruningCallback",
        "Schedule",
        "SparsityMasks",
        "finetune",
        "finetune_model",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_MODULE_OF, "__version__"])


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use; or a subpackage (``llmprune.api``...)."""
    module = _MODULE_OF.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

