"""Masks that hold during training: pruned weights stay exactly zero under any optimizer.

A mask (True = pruned) is kept per linear layer of the decoder. It is applied three ways, because each
alone leaks: to the gradient (a hook, so the optimizer never sees a signal for pruned weights), to the
optimizer state (Adam's running moments of a weight pruned mid-training would otherwise keep moving it),
and to the weight after every optimizer step (whatever the optimizer does, e.g. momentum from before).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.methods.patterns import Pattern, lowest_in_matrix, lowest_per_row, n_m_mask
from llmprune.models.architecture import check_pattern_fits, linear_layers, read_weight, stored_layout

Score = Literal["magnitude", "wanda"]


def linear_targets(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The decoder layers' linear modules (what one-shot pruning prunes), by full dotted name."""
    return {name: module for layer in linear_layers(model, exclude=exclude) for name, module in layer.items()}


def select(
    scores: torch.Tensor, sparsity: float, pattern: Pattern, pruned: torch.Tensor | None, per_row: bool
) -> torch.Tensor:
    """The ``[out, in]`` mask for ``sparsity``, never un-pruning ``pruned`` (their scores count as −∞).

    Unstructured: the lowest scores of the matrix (or of each row). N:M below 1 − N/M: the lowest scores
    of each row among the weights the N:M selection would prune, so every group of M keeps at least N and
    the full pattern is reached exactly at 1 − N/M.
    """
    scores = scores.float()
    if pruned is not None:
        scores = scores.masked_fill(pruned, float("-inf"))
    if not pattern.is_nm:
        return lowest_per_row(scores, sparsity) if per_row else lowest_in_matrix(scores, sparsity)
    candidates = n_m_mask(scores, pattern.n, pattern.m)
    if sparsity >= pattern.implied_sparsity - 1e-12:
        return candidates
    return lowest_per_row(scores.masked_fill(~candidates, float("inf")), sparsity)


class SparsityMasks:
    """Per-layer pruning masks over a model's decoder linear layers, held through training.

    ``attach()`` registers the gradient hooks (and, for ``score="wanda"``, forward hooks accumulating each
    layer's input norms ‖x_j‖² over the training tokens seen, in train mode only, as Wanda's |W_ij|·‖X_j‖
    needs); ``detach()`` removes them. Call ``enforce(optimizer)`` after every optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        pattern: Pattern | str = "unstructured",
        score: Score = "magnitude",
        exclude: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.pattern = Pattern.parse(pattern)
        if self.pattern.structured:
            raise UsageError("training-time pruning supports unstructured and N:M patterns")
        self.score = score
        self.targets = linear_targets(model, exclude)
        check_pattern_fits(self.targets, self.pattern)
        self.masks: dict[str, torch.Tensor] = {}  # [out, in], True = pruned
        self._norms: dict[str, torch.Tensor] = {}
        self._handles: list = []

    @classmethod
    def from_zeros(cls, model: nn.Module, pattern: Pattern | str = "unstructured", **kwargs) -> SparsityMasks:
        """The masks of a pruned model, taken exactly from its zero weights."""
        masks = cls(model, pattern, **kwargs)
        for name, module in masks.targets.items():
            masks.masks[name] = read_weight(module) == 0
        return masks

    # hooks -----------------------------------------------------------------------------------------

    def attach(self) -> SparsityMasks:
        self.detach()
        for name, module in self.targets.items():
            self._handles.append(module.weight.register_hook(self._gradient_hook(name, module)))
            if self.score == "wanda":
                self._handles.append(module.register_forward_hook(self._norm_hook(name)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _gradient_hook(self, name: str, module: nn.Module):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            mask = self.masks.get(name)
            return grad if mask is None else grad.mul(stored_layout(module, ~mask))

        return hook

    def _norm_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not module.training:  # evaluation passes in between must not steer the masks
                return
            x = args[0].detach()
            squares = x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)
            previous = self._norms.get(name)
            self._norms[name] = squares if previous is None else previous + squares

        return hook

    # masks -----------------------------------------------------------------------------------------

    def scores(self, name: str) -> torch.Tensor:
        """Importance of each weight ``[out, in]``: |W|, or |W|·‖X‖ from the running input norms."""
        weight = read_weight(self.targets[name]).detach().abs().float()
        norms = self._norms.get(name)
        if self.score == "wanda" and norms is not None:
            return weight * norms.sqrt().to(weight.device)
        return weight  # no input seen yet: magnitude

    def update(self, sparsity: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Recompute every mask for ``sparsity`` (monotone: pruned weights stay pruned), then enforce it."""
        for name in self.targets:
            scores = self.scores(name)
            self.masks[name] = select(
                scores, sparsity, self.pattern, self.masks.get(name), per_row=self.score == "wanda"
            )
        self.enforce(optimizer)

    @torch.no_grad()
    def enforce(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned weights and their optimizer state (Adam's moments, momentum buffers)."""
        for name, module in self.targets.items():
            mask = self.masks.get(name)
            if mask is None:
                continue
            # Multiplying by the kept weights zeroes what masked_fill_ would (the values are finite) and
            # is ~6x faster on the CPU, where masked_fill_ with a scattered mask runs a scalar loop.
            keep = stored_layout(module, ~mask)
            module.weight.mul_(keep)
            state = optimizer.state.get(module.weight, {}) if optimizer is not None else {}
            for value in state.values():
                if torch.is_tensor(value) and value.shape == keep.shape:
                    value.mul_(keep)

    def sparsity(self) -> dict[str, float]:
        """Achieved sparsity of each target layer (fraction of exactly-zero weights)."""
        return {name: float((module.weight == 0).float().mean()) for name, module in self.targets.items()}

    def overall(self) -> float:
        zeros = sum(int((m.weight == 0).sum()) for m in self.targets.values())
        return zeros / sum(m.weight.numel() for m in self.targets.values())
