"""Gradual pruning during training: a scheduler for plain loops and a ``transformers.TrainerCallback``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import TrainerCallback

from llmprune.errors import UsageError
from llmprune.methods.patterns import Pattern
from llmprune.training.masks import Score, SparsityMasks
from llmprune.training.schedule import Schedule


class GradualPruner:
    """Prunes ``model`` on a ``Schedule`` as training goes; call ``step()`` after each ``optimizer.step()``.

    ``step()`` counts optimizer steps; after step t it recomputes the masks when t is an update step of
    the schedule, and in every case zeroes the pruned weights and their optimizer state again. With an
    N:M pattern the schedule's final sparsity must be 1 − N/M (reached exactly at ``end``). Without a
    schedule the masks given (e.g. ``SparsityMasks.from_zeros``) are only held.

        pruner = GradualPruner(model, Schedule(0.0, 0.5, start=0, end=1000, frequency=50), optimizer)
        for batch in data:
            loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad(); pruner.step()
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule | None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        pattern: Pattern | str = "unstructured",
        score: Score = "magnitude",
        exclude: Iterable[str] = (),
        masks: SparsityMasks | None = None,
    ) -> None:
        pattern = Pattern.parse(pattern)
        if schedule is not None and pattern.is_nm and abs(schedule.final - pattern.implied_sparsity) > 1e-9:
            raise UsageError(
                f"pattern {pattern} ends at sparsity {pattern.implied_sparsity:g}; "
                f"the schedule's final sparsity is {schedule.final:g}"
            )
        self.schedule = schedule
        self.optimizer = optimizer
        self.masks = (masks or SparsityMasks(model, pattern, score, exclude)).attach()
        self.steps = 0
        self.current = self.masks.overall() if masks is not None else 0.0

    def step(self, step: int | None = None, optimizer: torch.optim.Optimizer | None = None) -> float:
        """After an optimizer step (counted, or given): update the masks if due; returns the sparsity."""
        self.steps = self.steps + 1 if step is None else step
        optimizer = optimizer or self.optimizer
        if self.schedule is not None and self.schedule.update_step(self.steps):
            self.current = self.schedule.sparsity(self.steps)
            self.masks.update(self.current, optimizer)
        else:
            self.masks.enforce(optimizer)
        return self.current

    def remove(self) -> None:
        """Remove the hooks (the zeros stay)."""
        self.masks.detach()


class PruningCallback(TrainerCallback):
    """``transformers.Trainer`` integration: ``Trainer(..., callbacks=[PruningCallback(schedule)])``.

    Hooks go on at the start of training; after every optimizer step the pruner runs with the Trainer's
    ``global_step`` and optimizer. ``PruningCallback(None, masks=SparsityMasks.from_zeros(model))``
    fine-tunes a pruned model keeping its mask.
    """

    def __init__(
        self,
        schedule: Schedule | None,
        *,
        pattern: Pattern | str = "unstructured",
        score: Score = "magnitude",
        exclude: Iterable[str] = (),
        masks: SparsityMasks | None = None,
    ) -> None:
        self.schedule = schedule
        self.options = {"pattern": pattern, "score": score, "exclude": exclude, "masks": masks}
        self.pruner: GradualPruner | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.pruner = GradualPruner(model, self.schedule, optimizer, **self.options)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.pruner.step(state.global_step, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.pruner.remove()
