"""``llmprune sweep``: a grid of methods × patterns × sparsities, with results, plots and an HTML report."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from llmprune.config import build, read_recipe
from llmprune.sweeps.config import SweepConfig

from .console import Interrupted, console, out
from .options import config_options, given
from .render import counting_bars


@contextmanager
def sweep_progress(console: Console, quiet: bool):
    """Two bars, cells and the current cell's decoder layers; yields ``(on_cell, progress)`` callbacks."""
    if quiet:
        yield None, None
        return
    bars = counting_bars(console)
    cells = bars.add_task("cells", total=None)
    layers = bars.add_task("decoder layers", total=None, visible=False)
    finished, cell_total = 0, None

    def on_cell(index: int, total: int, cell, skipped: bool) -> None:
        nonlocal finished, cell_total
        if cell_total is None:
            bars.start()  # not before: an error in the cheap checks leaves only its own line
        cell_total = total
        if skipped:
            console.print(f"{cell.key}: finished earlier, skipped", soft_wrap=True)
        finished = index if not skipped else finished + 1
        bars.update(cells, total=total, completed=finished, description=f"cells ({cell.key})")
        bars.update(layers, completed=0, visible=not skipped)

    def progress(done: int, total: int) -> None:
        bars.update(layers, completed=done, total=total)

    try:
        yield on_cell, progress
        if cell_total is not None:
            bars.update(cells, completed=cell_total, description="cells")
            bars.update(layers, visible=False)
    finally:
        if cell_total is not None:  # stopping a bar that never started would print an empty line
            bars.stop()


def results_table(result) -> Table:
    table = Table(title=f"sweep of {result.config.model}: dense perplexity {result.dense_perplexity:.2f}")
    for column in ("method", "pattern", "target", "achieved", "perplexity", "prune s"):
        table.add_column(column, justify="left" if column in ("method", "pattern") else "right")
    for r in result.cells:
        table.add_row(
            r["method"],
            r["pattern"],
            f"{r['target_sparsity']:.0%}",
            f"{r['achieved_sparsity']:.2%}",
            f"{r['perplexity']:.2f}",
            f"{r['prune_seconds']:.1f}",
        )
    return table


@click.command()
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML file of options (flags override it)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars; print only where the report went")
@click.option("--json", "as_json", is_flag=True, help="print results.json's content on stdout")
@config_options(SweepConfig)
def sweep(recipe: str | None, quiet: bool, as_json: bool, **flags: Any) -> None:
    """Prune with every method × pattern × sparsity of a grid: results.csv/json, plots, report.html.

    The model is loaded once and restored from a CPU copy of its dense weights before each cell; an N:M
    pattern fixes the sparsity (1 - N/M), so it is one cell per method. Each finished cell is recorded in
    OUTPUT/cells/; rerunning the same command continues an interrupted sweep, skipping finished cells.
    """
    from llmprune.sweeps.runner import run_sweep

    values = read_recipe(recipe, SweepConfig) if recipe else {}
    values.update(given(flags))
    config = build(SweepConfig, values)
    try:
        with sweep_progress(console, quiet or as_json) as (on_cell, progress):
            result = run_sweep(config, on_cell=on_cell, progress=progress)
    except KeyboardInterrupt:
        raise Interrupted(
            f"finished cells are kept in {config.output}: rerun the same command to continue (it skips them)"
        ) from None
    if as_json:
        click.echo(result.files["results.json"].read_text(), nl=False)
        return
    if not quiet:
        out.print(results_table(result))
        skipped = len(result.cells) - len(result.computed)
        if skipped:
            out.print(f"{skipped} cell(s) were finished by an earlier run and skipped", soft_wrap=True)
    out.print(f"report: {result.files['report.html']}", soft_wrap=True)
