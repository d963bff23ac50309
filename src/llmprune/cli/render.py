"""Terminal output: progress over decoder layers and the per-layer table."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmprune.pipeline.report import PruneReport


@contextmanager
def layer_progress(console: Console):
    """A progress bar over decoder layers; yields the callback the driver calls after each layer."""
    with Progress(
        TextColumn("pruning decoder layers"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("prune", total=None, start=False)

        def advance(done: int, total: int) -> None:
            if done == 0:  # the driver starts: time the layers, not the loading before them
                progress.reset(task, total=total, start=True)
            progress.update(task, completed=done, total=total)

        yield advance


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
    table.add_column("notes")
    blocks: dict[int, list] = {}
    for row in report.layers:
        blocks.setdefault(row.block, []).append(row)
    for block, rows in blocks.items():
        weights = sum(r.shape[0] * r.shape[1] for r in rows)
        sparsity = sum(r.achieved_sparsity * r.shape[0] * r.shape[1] for r in rows) / weights
        errors = {_short(r.name): f"{r.relative_error:.3f}" for r in rows}
        notes = ", ".join(f"{_short(r.name)}: damp raised to {r.damp:g}" for r in rows if r.damp_raised)
        table.add_row(str(block), f"{sparsity:.2%}", *(errors.get(c, "-") for c in columns), notes)
    return table


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
