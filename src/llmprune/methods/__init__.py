"""Pruning methods as pure functions: a weight and its input statistics in, a pruned weight and mask out.

Each method declares which statistic of a layer's inputs it needs; the pipeline collects exactly that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from llmprune.methods.magnitude import magnitude_mask
from llmprune.methods.patterns import Pattern
from llmprune.methods.sparsegpt import CholeskyError, sparsegpt_prune
from llmprune.methods.wanda import wanda_mask

Statistic = Literal["none", "input_norms", "hessian"]


@dataclass(frozen=True)
class LayerTask:
    """What to do with one weight: its target sparsity and pattern, plus method options."""

    sparsity: float
    pattern: Pattern
    blocksize: int = 128
    damp: float = 0.01
    magnitude_scope: str = "matrix"


@dataclass
class PruneOutcome:
    weight: torch.Tensor
    mask: torch.Tensor
    damp: float | None = None


@dataclass(frozen=True)
class Method:
    name: str
    statistic: Statistic
    run: Callable[[torch.Tensor, torch.Tensor | None, LayerTask], PruneOutcome]


def _apply(weight: torch.Tensor, mask: torch.Tensor) -> PruneOutcome:
    return PruneOutcome(weight.float().masked_fill(mask, 0.0), mask)


def _magnitude(weight: torch.Tensor, _stat: torch.Tensor | None, task: LayerTask) -> PruneOutcome:
    return _apply(weight, magnitude_mask(weight, task.sparsity, task.pattern, task.magnitude_scope))


def _wanda(weight: torch.Tensor, sq_norms: torch.Tensor | None, task: LayerTask) -> PruneOutcome:
    return _apply(weight, wanda_mask(weight, sq_norms, task.sparsity, task.pattern))


def _sparsegpt(weight: torch.Tensor, hessian: torch.Tensor | None, task: LayerTask) -> PruneOutcome:
    result = sparsegpt_prune(weight, hessian, task.sparsity, task.pattern, task.blocksize, task.damp)
    return PruneOutcome(result.weight, result.mask, result.damp)


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", "none", _magnitude),
    "wanda": Method("wanda", "input_norms", _wanda),
    "sparsegpt": Method("sparsegpt", "hessian", _sparsegpt),
}

__all__ = [
    "METHODS",
    "CholeskyError",
    "LayerTask",
    "Method",
    "Pattern",
    "PruneOutcome",
    "magnitude_mask",
    "sparsegpt_prune",
    "wanda_mask",
]
