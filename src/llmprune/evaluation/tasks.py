"""Zero-shot (and few-shot) tasks through the EleutherAI harness, lm-eval, on a model in memory.

lm-eval is an optional extra (``pip install 'llmprune[eval]'``). Task names are checked against lm-eval's
task index, and every task's dataset is loaded, before the model is: an unknown name or a dataset that
cannot be fetched (offline) fails at once, in one line that says what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from llmprune.errors import DataUnavailableError, LlmpruneError, UsageError

TaskScores = dict[str, dict[str, float]]
"""Per task (and group), each metric: ``{"arc_easy": {"acc": 0.61, "acc_stderr": 0.01, ...}}``."""


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UsageError("zero-shot tasks need lm-eval: pip install 'llmprune[eval]'") from None
    return lm_eval


@contextlib.contextmanager
def _quiet_logging(level: int = logging.WARNING) -> Iterator[None]:
    """lm-eval logs every step at INFO; keep its warnings and errors only."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def task_manager(include: Sequence[str | Path] = (), defaults: bool = True):
    """lm-eval's ``TaskManager``: its own tasks (``defaults``) plus task YAMLs under ``include``."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    for path in include:
        if not Path(path).is_dir():
            raise UsageError(f"task directory not found: {path}")
    with _quiet_logging():
        return TaskManager(include_path=[str(p) for p in include] or None, include_defaults=defaults)


def check_task_names(names: Sequence[str], manager) -> None:
    """Refuse names lm-eval does not know (tasks, groups and tags), suggesting the closest ones."""
    if not names:
        raise UsageError("give at least one task name")
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if not unknown:
        return
    close = list(dict.fromkeys(c for name in unknown for c in difflib.get_close_matches(name, known, n=5)))
    if len(known) <= 20:
        hint = f"valid tasks: {', '.join(sorted(known))}"
    else:
        hint = (f"closest valid names: {', '.join(close)}; " if close else "") + (
            f"{len(known)} tasks in all (llmprune eval --list-tasks prints them)"
        )
    plural = "s" * (len(unknown) > 1)
    raise UsageError(f"unknown task{plural} {', '.join(map(repr, unknown))}; {hint}")


def task_datasets(manager, name: str, seen: set[str] | None = None) -> list[str]:
    """The Hugging Face datasets a task, group or tag reads, as ``path`` or ``path (config)``."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return []
    config = entry.cfg or {}
    if config.get("dataset_path"):
        path, subset = config["dataset_path"], config.get("dataset_name")
        return [f"{path} ({subset})" if subset else str(path)]
    children = config.get("task") or []
    if isinstance(children, str | dict):
        children = [children]
    if not children and entry.kind.name == "TAG":
        children = [other for other, e in manager.task_index.items() if name in (e.tags or ())]
    found: list[str] = []
    for child in children:
        child_name = child.get("task") if isinstance(child, dict) else child
        if isinstance(child, dict) and child.get("dataset_path"):
            subset = child.get("dataset_name")
            found.append(f"{child['dataset_path']} ({subset})" if subset else str(child["dataset_path"]))
        elif isinstance(child_name, str):
            found += task_datasets(manager, child_name, seen)
    return list(dict.fromkeys(found))


def _looks_unavailable(error: BaseException) -> bool:
    """Whether a task failed to build because its data could not be fetched (rather than a bug)."""
    text = f"{type(error).__name__} {error}".lower()
    markers = ("offline", "connection", "couldn't reach", "not found", "no such file", "doesn't exist")
    return isinstance(error, OSError) or any(marker in text for marker in markers)


def load_tasks(names: Sequence[str], manager) -> None:
    """Build every task (which loads its dataset) so that a dataset that is missing offline fails here,
    before the model is loaded, naming what to fetch."""
    from llmprune.models.loading import hub_access

    missing: dict[str, list[str]] = {}
    reason = ""
    for name in names:
        try:
            with _quiet_logging(logging.ERROR), hub_access():
                manager.load([name])
        except Exception as exc:
            if not _looks_unavailable(exc):
                message = str(exc).splitlines()[0] if str(exc) else ""
                raise LlmpruneError(
                    f"task {name!r} could not be built: {type(exc).__name__}: {message}"
                ) from exc
            missing[name] = task_datasets(manager, name) or ["(see the task's YAML)"]
            reason = reason or type(exc).__name__
    if missing:
        listed = "; ".join(f"{name}: {', '.join(datasets)}" for name, datasets in missing.items())
        raise DataUnavailableError(
            f"cannot load the datasets of {', '.join(missing)} ({reason}); fetch them into the Hugging Face "
            f"cache while online (run the same command once with network access, or "
            f"datasets.load_dataset(PATH, CONFIG)), then run with HF_DATASETS_OFFLINE=1. Datasets: {listed}"
        )


def _scores(results: dict[str, dict[str, Any]]) -> TaskScores:
    """lm-eval's ``"acc,none"`` keys as ``"acc"`` (a filter other than none stays: ``"acc,strict"``);
    numbers only."""
    scores: TaskScores = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or key == "sample_len":
                continue
            name = key.removesuffix(",none")
            if isinstance(value, float) and math.isnan(value):
                continue
            row[name] = float(value)
        scores[task] = row
    return scores


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    include: Sequence[str | Path] = (),
    manager=None,
    quiet: bool = False,
) -> TaskScores:
    """Score a loaded causal LM on lm-eval tasks (``["arc_easy", "hellaswag"]``); returns each task's
    metrics. ``include`` adds directories of task YAMLs; ``limit`` caps the examples per task (a quick
    look, not a comparable figure); ``num_fewshot`` overrides the tasks' own (zero-shot by default)."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(include)
    tasks = list(dict.fromkeys(tasks))
    check_task_names(tasks, manager)
    load_tasks(tasks, manager)

    class _LM(HFLM):
        """HFLM on the model in memory; ``quiet`` turns off its progress bars."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

    was_training = model.training
    model.eval()
    try:
        with _quiet_logging(logging.ERROR if quiet else logging.WARNING):
            lm = _LM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,
            )
    finally:
        model.train(was_training)
    return _scores(output["results"])
