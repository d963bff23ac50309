"""What every job (``run``, ``sweep``, ``finetune``, ``evaluate``) does the same way: take a config or
keywords, check its inputs up front before any weight is read, and record what it did in ``llmprune.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from llmprune.config import StrictModel, build
from llmprune.data.text import check_source
from llmprune.models.architecture import check_windows
from llmprune.models.loading import check_model_name, load_skeleton, resolve_device, resolve_dtype
from llmprune.pipeline.offload import check_activation_memory
from llmprune.storage import library_versions

if TYPE_CHECKING:
    from llmprune.pipeline.report import PruneReport

Config = TypeVar("Config", bound=StrictModel)


def configured(kind: type[Config], config: StrictModel | None, overrides: Mapping[str, Any]) -> Config:
    """``config`` (a ``kind``, or None for the defaults) with the ``overrides`` keywords applied on top,
    validated by ``build`` (one-line UsageErrors): how every entry point takes a config, keywords or both."""
    if config is None:
        return build(kind, dict(overrides))
    if not isinstance(config, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(config).__name__}")
    if not overrides and type(config) is kind:
        return config
    chosen = config.model_dump(exclude_unset=True)  # what was chosen; the rest keeps its default
    return build(kind, {**{k: v for k, v in chosen.items() if k in kind.model_fields}, **overrides})


@dataclass(frozen=True)
class Preflight:
    """What the up-front checks established: the model as a weightless skeleton (every shape, no weight
    read), and the device and dtype it is to be loaded in."""

    model: str
    skeleton: nn.Module
    device: torch.device
    dtype: torch.dtype

    @property
    def model_bytes(self) -> int:
        """Bytes of the model's parameters in ``dtype``."""
        return sum(p.numel() for p in self.skeleton.parameters()) * self.dtype.itemsize

    def check_activations(self, samples: int, seqlen: int, max_bytes: int | None = None) -> None:
        """Refuse calibration activations of ``samples`` × ``seqlen`` tokens that would not fit on the
        device (unless ``max_bytes``, ``--max-memory``, sends them to disk)."""
        check_activation_memory(self.skeleton, samples, seqlen, self.dtype, self.device, max_bytes)


def preflight(
    model: str,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    *,
    sources: Iterable[str] = (),
    windows: Mapping[str, int] | None = None,
    checks: Callable[[], None] | None = None,
    skeleton_checks: Callable[[nn.Module], None] | None = None,
    tokenizer: bool = True,
) -> Preflight:
    """The cheap checks a job makes before it loads anything, each failing in one line, in this order: the
    device; the model's name (a local checkpoint validated, a GGUF file's conversion possible; with its
    tokenizer unless ``tokenizer`` is False); the data ``sources``; the job's own ``checks`` (a teacher's
    name, lm-eval task names); then, on a skeleton built from the model's config, its own
    ``skeleton_checks`` (N:M widths of the layers) and the token ``windows`` (by flag) against the model's
    context. Run it inside ``models_checked_once`` to check the name only once."""
    device = resolve_device(device) if isinstance(device, str) else device
    check_model_name(model, tokenizer)
    for source in sources:
        check_source(source)
    if checks is not None:
        checks()
    skeleton = load_skeleton(model)
    if skeleton_checks is not None:
        skeleton_checks(skeleton)
    check_windows(model, skeleton.config, dict(windows or {}))
    return Preflight(model, skeleton, device, resolve_dtype(dtype, device))


def calibration_record(config: Any) -> dict[str, Any]:
    """The calibration data of a pruning job (a ``RunConfig``'s fields), as ``llmprune.json`` records it."""
    return {
        "source": config.calibration,
        "nsamples": config.nsamples,
        "seqlen": config.seqlen,
        "seed": config.seed,
    }


def perplexity_record(data: str, windows: torch.Tensor | None, seqlen: int, **values: float | None) -> dict:
    """Where perplexity was measured (``windows`` None: it was not) and its ``values`` (dense, pruned...)."""
    return {"data": data, "windows": 0 if windows is None else len(windows), "seqlen": seqlen, **values}


def run_metadata(
    recipe: dict[str, Any] | None,
    *,
    calibration: dict[str, Any] | None = None,
    perplexity: dict[str, Any] | None = None,
    report: PruneReport | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The ``llmprune.json`` record of a saved model: the recipe it was pruned with, the job's own
    ``sections`` (a fine-tuning's options and sparsity), the calibration data, the perplexity, the pruning
    report and the library versions; calibration, perplexity and report are left out when None."""
    metadata: dict[str, Any] = {"recipe": recipe, **sections}
    if calibration is not None:
        metadata["calibration"] = calibration
    if perplexity is not None:
        metadata["perplexity"] = perplexity
    if report is not None:
        metadata["report"] = report.to_dict()
    metadata["versions"] = library_versions()
    return metadata
