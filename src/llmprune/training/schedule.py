"""Gradual pruning schedules: pure functions of the training step (Zhu & Gupta, arXiv 1710.01878).

Sparsity rises from ``initial`` at step ``start`` to ``final`` at step ``end`` and is only updated every
``frequency`` steps (and at ``end``); before ``start`` nothing is pruned, after ``end`` it stays ``final``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmprune.errors import UsageError

Curve = Literal["cubic", "linear"]


@dataclass(frozen=True)
class Schedule:
    """When and how far to prune: ``initial``→``final`` over steps ``start``..``end``, every ``frequency``."""

    initial: float = 0.0
    final: float = 0.5
    start: int = 0
    end: int = 100
    frequency: int = 10
    curve: Curve = "cubic"

    def __post_init__(self) -> None:
        check_schedule(self.initial, self.final, self.start, self.end, self.frequency, self.curve)

    def update_step(self, step: int) -> bool:
        """Whether masks are recomputed after optimizer step ``step``."""
        if not self.start <= step <= self.end:
            return False
        return (step - self.start) % self.frequency == 0 or step == self.end

    def sparsity(self, step: int) -> float:
        """Target sparsity in force after optimizer step ``step``."""
        return sparsity_at(step, self.initial, self.final, self.start, self.end, self.frequency, self.curve)


def schedule_problem(
    initial: float, final: float, start: int, end: int, frequency: int, curve: str = "cubic"
) -> str | None:
    """What is wrong with a schedule, in a few words, or None (shared by the configs and ``Schedule``)."""
    if not 0.0 <= initial < 1.0 or not 0.0 <= final < 1.0:
        return f"sparsities must be in [0, 1), got initial {initial:g}, final {final:g}"
    if final < initial:
        return f"final sparsity {final:g} is below the initial sparsity {initial:g}"
    if start < 0:
        return f"start step must be >= 0, got {start}"
    if end <= start:
        return f"end step {end} must come after the start step {start}"
    if frequency < 1:
        return f"pruning frequency must be at least 1 step, got {frequency}"
    if curve not in ("cubic", "linear"):
        return f"schedule curve must be cubic or linear, got {curve!r}"
    return None


def check_schedule(
    initial: float, final: float, start: int, end: int, frequency: int, curve: str = "cubic"
) -> None:
    problem = schedule_problem(initial, final, start, end, frequency, curve)
    if problem:
        raise UsageError(problem)


def sparsity_at(
    step: int,
    initial: float,
    final: float,
    start: int,
    end: int,
    frequency: int = 1,
    curve: Curve = "cubic",
) -> float:
    """Sparsity after ``step``: 0 before ``start``; then, at the last update step t ≤ ``step``,

    cubic (Zhu & Gupta eq. 1): s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(t_end − t₀))³
    linear:                    s_t = s_i + (s_f − s_i)(t − t₀)/(t_end − t₀)
    """
    if step < start:
        return 0.0
    t = end if step >= end else start + (step - start) // frequency * frequency
    progress = (t - start) / (end - start)
    if curve == "cubic":
        return final + (initial - final) * (1.0 - progress) ** 3
    return initial + (final - initial) * progress
