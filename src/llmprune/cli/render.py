"""Terminal output: progress over decoder layers and the per-layer table."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmprune.pipeline.report import PruneReport


def counting_bars(console: Console, label: str = "{task.description}") -> Progress:
    """Bars that show a label, the bar, done/total and the time elapsed (not started yet)."""
    columns = TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    return Progress(*columns, console=console)


@contextmanager
def counted_progress(
    console: Console, description: str, quiet: bool = False
) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar (on ``console``) for a loop of known or unknown length; yields
    ``advance(done, total)``. The bar appears at the first call and goes once ``done`` reaches a known
    ``total``, so that it shows the loop only, not the work around it. Shows nothing when ``quiet``, nor on
    a console that is not a terminal (where a transient bar would only leave an empty line, e.g. before an
    error message)."""
    if quiet or not console.is_terminal:
        yield lambda done, total: None
        return
    bar = Progress(console=console, transient=True)
    task = bar.add_task(description, total=None)
    started = False

    def advance(done: int, total: int) -> None:
        nonlocal started
        if not started:
            bar.start()
            started = True
        bar.update(task, completed=done, total=total)
        if total is not None and done >= total:
            bar.stop()

    try:
        yield advance
    finally:
        if started:
            bar.stop()


@contextmanager
def layer_progress(console: Console, header: str = ""):
    """A progress bar over decoder layers; yields the callback the driver calls after each layer.

    Until the driver starts (``done == 0``), a transient spinner shows ``header`` while the model and data
    load; then ``header`` is printed and the bar appears, timing the layers rather than the loading. An
    error raised before that leaves nothing behind but its own message.
    """
    status = console.status(f"{header} (loading)" if header else "loading")
    status.start()
    progress: Progress | None = None
    task = None

    def advance(done: int, total: int) -> None:
        nonlocal progress, task
        if progress is None:
            status.stop()
            if header:
                console.print(header, soft_wrap=True)
            progress = counting_bars(console, "pruning decoder layers")
            progress.start()
            task = progress.add_task("prune", total=total)
        progress.update(task, completed=done, total=total)

    try:
        yield advance
    finally:
        status.stop()
        if progress is not None:
            progress.stop()


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


def layer_table(report: PruneReport) -> Table:
    """One row per decoder layer: achieved sparsity and each linear layer's relative error."""
    columns = list(dict.fromkeys(_short(r.name) for r in report.layers))
    table = Table(title="per-layer result (relative error ||WX - W'X|| / ||WX|| on calibration inputs)")
    table.add_column("layer", justify="right")
    table.add_column("sparsity", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    refined = any(r.refined_from is not None for r in report.layers)
    if refined:
        table.add_column("refine (all tokens)", justify="right")
    fitted = {block.layer: block for block in report.blocks}
    if fitted:
        table.add_column("block output", justify="right")
    table.add_column("notes")
    blocks: dict[int, list] = {}
    for row in report.layers:
        blocks.setdefault(row.layer, []).append(row)
    for block, rows in blocks.items():
        weights = sum(r.shape[0] * r.shape[1] for r in rows)
        sparsity = sum(r.achieved_sparsity * r.shape[0] * r.shape[1] for r in rows) / weights
        errors = {_short(r.name): f"{r.relative_error:.3f}" for r in rows}
        notes = [f"{_short(r.name)}: damp raised to {r.damp:g}" for r in rows if r.damp_raised]
        extra = []
        if refined:  # the mean over the layer's linear layers, before -> after
            pairs = [(r.refined_from, r.refined_to) for r in rows if r.refined_from is not None]
            extra.append(" → ".join(f"{sum(p[k] for p in pairs) / len(pairs):.3f}" for k in (0, 1)))
        if fitted:
            fit = fitted.get(block)
            extra.append("-" if fit is None else f"{fit.error_before:.3f} → {fit.error_after:.3f}")
            if fit is not None and fit.restored:
                notes.append("reconstruction did not help: kept the weights before it")
        cells = [errors.get(column, "-") for column in columns]
        table.add_row(str(block), f"{sparsity:.2%}", *cells, *extra, ", ".join(notes))
    return table


def task_table(scores: dict[str, dict[str, float]]) -> Table:
    """One row per lm-eval task and metric, with its standard error where lm-eval gives one."""
    table = Table(title="lm-eval tasks")
    for column in ("task", "metric", "value", "± stderr"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metrics in scores.items():
        for name, value in metrics.items():
            if "_stderr" in name:
                continue
            stderr = metrics.get(name.replace(",", "_stderr,", 1) if "," in name else f"{name}_stderr")
            table.add_row(task, name, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}")
    return table


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
