"""``llmprune bench``: inference throughput, time to first token and memory, against a baseline."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from llmprune.config import build
from llmprune.inference.bench import BenchConfig, BenchReport, ModelFigures

from .console import console, out
from .options import config_options, given

ROWS = (  # label, attribute of ModelFigures, format, key of the speedup
    ("prefill tokens/s (batch {batch})", "prefill_tokens_per_s", "{:,.0f}", "prefill"),
    ("time to first token (batch 1)", "time_to_first_token_s", "{:.3f} s", "ttft"),
    ("decode tokens/s (batch 1)", "decode_tokens_per_s_batch1", "{:,.1f}", "decode_1"),
    ("decode tokens/s (batch {batch})", "decode_tokens_per_s_batch", "{:,.1f}", "decode_batch"),
    ("peak memory (weights + working)", "peak_memory_bytes", "mib", "peak_memory"),
)


def _cell(figures: ModelFigures, attribute: str, fmt: str) -> str:
    value = getattr(figures, attribute)
    if fmt == "mib":
        weights, working = figures.weight_bytes / 2**20, figures.working_memory_bytes / 2**20
        return f"{value / 2**20:,.1f} MiB ({weights:,.1f} + {working:,.1f})"
    return fmt.format(value)


def result_table(result: BenchReport) -> Table:
    """Metric rows; a column per model and, with a baseline, the ratio (> 1: MODEL is better)."""
    settings = result.settings
    table = Table(
        title=f"{result.device}, {result.dtype}: prompt {settings['prompt_len']} tokens, "
        f"{settings['new_tokens']} new tokens, medians of {settings['repeats']} alternated rounds"
    )
    table.add_column("metric")
    table.add_column(f"MODEL {result.model.name}", justify="right")
    if result.baseline is not None:
        table.add_column(f"BASELINE {result.baseline.name}", justify="right")
        table.add_column("speedup", justify="right")
    for label, attribute, fmt, key in ROWS:
        row = [label.format(batch=settings["batch"]), _cell(result.model, attribute, fmt)]
        if result.baseline is not None and result.speedup is not None:
            row += [_cell(result.baseline, attribute, fmt), f"{result.speedup[key]:.2f}×"]
        table.add_row(*row)
    if result.kernels is not None:
        swapped, skipped = len(result.kernels["swapped"]), len(result.kernels["skipped"])
        row = ["linear layers on sparse kernels", f"{swapped} of {swapped + skipped}"]
        table.add_row(*row, *(["0 (dense)", ""] if result.baseline is not None else []))
    return table


@click.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (for machines)")
@config_options(BenchConfig, skip=("model",))
def bench(model: str | None, as_json: bool, **flags: Any) -> None:
    """Prefill and decode throughput, time to first token and peak memory of MODEL (default: the embedded
    model), with --baseline measured alternately in the same run and the speedup per metric."""
    from llmprune.inference.bench import bench as run_bench

    values = {**given(flags), **({"model": model} if model else {})}
    config = build(BenchConfig, values)  # bad options fail here, before anything is loaded
    with console.status("loading") as status:

        def progress(done: int, total: int) -> None:
            status.update(f"measuring: round {done + 1} of {total} (warm-up rounds included)")

        result = run_bench(config, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    out.print(result_table(result))
    if result.kernels is not None:  # which layers: the swapped ones counted, those left dense named
        from llmprune.inference.kernels import SparseKernelsReport

        report = SparseKernelsReport.from_dict(result.kernels)
        out.print(f"MODEL: {report.summary()}", soft_wrap=True, markup=False)
        for note in report.notes:
            out.print(f"note: {note}", soft_wrap=True, markup=False)
    out.print(f"memory: {result.memory_method}", soft_wrap=True)
    out.print(
        "versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items()), soft_wrap=True, markup=False
    )
