"""Pruning methods as pure functions: a weight and its input statistics in, a pruned weight and mask out.

Each method declares which statistic of a layer's inputs it needs; the pipeline collects exactly that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llmprune.methods.magnitude import magnitude_mask
from llmprune.methods.patterns import Pattern
from llmprune.methods.sparsegpt import (
    CholeskyError,
    HessianFactor,
    factor_hessian,
    sparsegpt_prune_factored,
)
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
    """A method: which statistic it needs, how to prepare it (once per distinct input), how to prune.

    ``prune`` takes every weight that reads the same input at once, so a method may solve them jointly.
    """

    name: str
    statistic: Statistic
    prepare: Callable[[torch.Tensor | None, LayerTask], Any]
    prune: Callable[[list[torch.Tensor], Any, list[LayerTask]], list[PruneOutcome]]


def _as_is(statistic: torch.Tensor | None, _task: LayerTask) -> torch.Tensor | None:
    return statistic


def _apply(weight: torch.Tensor, mask: torch.Tensor) -> PruneOutcome:
    """The fp32 weight with the masked entries set to +0.0 (a new tensor), and the mask."""
    weight = weight.float()
    # The same bits as masked_fill(mask, 0.0), several times faster on the CPU: the weight's bits ANDed
    # with 0 where masked and with all ones elsewhere (a bool as int32 is 1 or 0; less 1).
    keep = mask.to(torch.int32).sub_(1)
    return PruneOutcome(keep.bitwise_and_(weight.view(torch.int32)).view(torch.float32), mask)


def _magnitude(weights: list[torch.Tensor], _stat: None, tasks: list[LayerTask]) -> list[PruneOutcome]:
    return [
        _apply(w, magnitude_mask(w, t.sparsity, t.pattern, t.magnitude_scope))
        for w, t in zip(weights, tasks, strict=True)
    ]


def _wanda(weights: list[torch.Tensor], sq_norms: torch.Tensor, tasks: list[LayerTask]) -> list[PruneOutcome]:
    return [
        _apply(w, wanda_mask(w, sq_norms, t.sparsity, t.pattern)) for w, t in zip(weights, tasks, strict=True)
    ]


def _factor(hessian: torch.Tensor | None, task: LayerTask) -> HessianFactor:
    return factor_hessian(hessian, task.damp)


def _sparsegpt(
    weights: list[torch.Tensor], factor: HessianFactor, tasks: list[LayerTask]
) -> list[PruneOutcome]:
    if len({(t.pattern, t.blocksize) for t in tasks}) > 1:  # solve jointly only what shares the settings
        return [_sparsegpt([w], factor, [t])[0] for w, t in zip(weights, tasks, strict=True)]
    rows = [w.shape[0] for w in weights]
    result = sparsegpt_prune_factored(
        torch.cat(weights), factor, [t.sparsity for t in tasks], tasks[0].pattern, tasks[0].blocksize, rows
    )
    return [
        PruneOutcome(w, m, result.damp)
        for w, m in zip(result.weight.split(rows), result.mask.split(rows), strict=True)
    ]


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", "none", _as_is, _magnitude),
    "wanda": Method("wanda", "input_norms", _as_is, _wanda),
    "sparsegpt": Method("sparsegpt", "hessian", _factor, _sparsegpt),
}

__all__ = [
    "METHODS",
    "CholeskyError",
    "LayerTask",
    "Method",
    "Pattern",
    "PruneOutcome",
    "magnitude_mask",
    "wanda_mask",
]
