"""``llmprune eval``: perplexity of a model, and lm-eval tasks on it."""

from __future__ import annotations

import json
from typing import Any

import click

from llmprune.config import EvalConfig, build

from .console import console, out
from .options import config_options, given
from .render import counted_progress, task_table


@click.command(name="eval")
@click.argument("model", required=False)
@config_options(EvalConfig, skip=("model",))
@click.option("--list-tasks", is_flag=True, help="print every lm-eval task name and exit")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON on stdout")
def evaluate(model: str | None, list_tasks: bool, quiet: bool, as_json: bool, **flags: Any) -> None:
    """Perplexity of MODEL (default: the embedded model) on the embedded text, a file, wikitext2 or c4;
    with --tasks, also lm-eval tasks (zero-shot by default) on the same loaded model."""
    from llmprune.api import evaluate as run_evaluation

    config = build(EvalConfig, {**given(flags), **({"model": model} if model else {})})
    if list_tasks:
        from llmprune.evaluation.tasks import task_manager

        click.echo("\n".join(task_manager(config.task_dir).all_tasks))
        return
    with counted_progress(console, "perplexity windows", quiet or as_json) as advance:
        report = run_evaluation(config, progress=advance, quiet=quiet or as_json)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    if report.perplexity is not None:
        ppl = report.perplexity
        out.print(
            f"perplexity {ppl['value']:.3f} on {ppl['data']} ({ppl['windows']}×{ppl['seqlen']} tokens, "
            f"{ppl['seconds']:.1f} s)",
            soft_wrap=True,
        )
    if report.tasks is not None:
        out.print(task_table(report.tasks))
