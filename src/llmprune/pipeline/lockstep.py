"""Run one computation per calibration batch in threads that take turns and meet at named points.

True-sequential pruning needs every batch's input to a linear layer before that layer may run on any
batch, yet the forward pass should still go batch by batch (cache-friendly, bounded intermediates). Each
batch's forward runs in its own thread; only the thread holding the turn runs, so nothing runs in
parallel and results are deterministic. At ``meet(point, action)`` a thread waits until every unfinished
thread waits at the same point; the last to arrive runs ``action`` once, then all go on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch

from llmprune.errors import LlmpruneError


class _Aborted(Exception):
    pass


class Lockstep:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._local = threading.local()
        self._count = 0
        self._turn = 0
        self._waiting: dict[int, Hashable] = {}
        self._done: set[int] = set()
        self._error: BaseException | None = None

    def run(self, tasks: list[Callable[[], Any]]) -> list[Any]:
        """Run the tasks (in turn, 0 first) and return their results in order."""
        self._count, self._turn = len(tasks), 0
        self._waiting.clear()
        self._done.clear()
        self._error = None
        if len(tasks) == 1:  # nothing to take turns with: run in this thread
            self._local.index = 0
            return [tasks[0]()]
        results: list[Any] = [None] * len(tasks)
        grad_enabled = torch.is_grad_enabled()  # grad mode is per thread

        def worker(index: int) -> None:
            self._local.index = index
            with self._cond:
                while self._turn != index and self._error is None:
                    self._cond.wait()
                try:
                    if self._error is None:
                        with torch.set_grad_enabled(grad_enabled):
                            results[index] = tasks[index]()
                except _Aborted:
                    pass
                except BaseException as exc:  # re-raised in the calling thread
                    self._error = self._error or exc
                finally:
                    self._done.add(index)
                    self._waiting.pop(index, None)
                    self._pass_turn(index)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(tasks))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._error is not None:
            raise self._error
        return results

    def meet(self, point: Hashable, action: Callable[[], None]) -> None:
        """Wait here until every unfinished task waits at ``point``; the last to arrive runs ``action``."""
        index = self._local.index
        self._waiting[index] = point
        while True:
            if self._error is not None:
                raise _Aborted
            live = [t for t in range(self._count) if t not in self._done]
            if all(self._waiting.get(t) == point for t in live):
                for t in live:
                    del self._waiting[t]
                action()
                return
            if all(t in self._waiting for t in live):
                raise LlmpruneError(
                    f"calibration batches took different paths through the layer (at {point}); "
                    "true_sequential needs every batch to call the same linear layers"
                )
            self._pass_turn(index)
            while self._turn != index and self._error is None:
                self._cond.wait()
            if index not in self._waiting:  # released by the last arrival
                return

    def _pass_turn(self, index: int) -> None:
        for step in range(1, self._count + 1):
            candidate = (index + step) % self._count
            if candidate not in self._done:
                self._turn = candidate
                break
        self._cond.notify_all()
