"""Run one computation per calibration batch as coroutines that meet at named points.

True-sequential pruning needs every batch's input to a linear layer before that layer may run on any
batch, yet the forward pass should still go batch by batch: on the CPU a whole calibration set in one
batch is ~25 % slower per token (its intermediates fall out of the caches), and its peak memory grows with
the number of samples. Each batch's forward runs in its own greenlet, all in the calling thread, one at a
time: no thread switches, one set of intra-op worker threads, and deterministic results. At
``meet(point, action)`` a batch pauses until every unfinished batch waits at the same point; ``action``
then runs once and all go on.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import greenlet

from llmprune.errors import LlmpruneError


class Lockstep:
    def __init__(self) -> None:
        self._hub: greenlet.greenlet | None = None

    def run(self, tasks: list[Callable[[], Any]]) -> list[Any]:
        """Run the tasks (each up to its next meeting point, in order) and return their results in order."""
        if len(tasks) == 1:  # nothing to wait for: meet() runs its action at once
            self._hub = None
            return [tasks[0]()]
        self._hub = greenlet.getcurrent()
        workers = [greenlet.greenlet(task) for task in tasks]
        results: list[Any] = [None] * len(tasks)
        live = list(range(len(tasks)))
        try:
            while live:
                points: dict[int, tuple[Hashable, Callable[[], None]]] = {}
                for index in live:
                    value = workers[index].switch()
                    if workers[index].dead:
                        results[index] = value
                    else:
                        points[index] = value
                live = list(points)
                if not live:
                    break
                names = sorted({str(point) for point, _ in points.values()})
                if len(names) > 1:
                    raise LlmpruneError(
                        f"calibration batches took different paths through a layer (at {', '.join(names)}); "
                        "true_sequential needs every batch to call the same linear layers"
                    )
                points[live[0]][1]()
        finally:
            self._hub = None
            for worker in workers:
                if worker and not worker.dead:  # started and paused: unwind it (runs its finally blocks)
                    worker.throw(greenlet.GreenletExit)
        return results

    def meet(self, point: Hashable, action: Callable[[], None]) -> None:
        """Wait here until every unfinished task waits at ``point``; ``action`` then runs once."""
        if self._hub is None:
            action()
        else:
            self._hub.switch((point, action))
