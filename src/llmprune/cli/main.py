"""The ``llmprune`` command line: ``prune`` and ``eval`` here; the other commands in their own modules."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

import click
from rich.console import Console

from llmprune.config import EvalConfig, RunConfig, build, read_recipe
from llmprune.errors import LlmpruneError

from .options import config_options, given

console = Console(stderr=True)
out = Console() if sys.stdout.isatty() else Console(width=160)
# click >= 8.2 raises this for a bare `llmprune` (older versions print the help themselves)
NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmprune")
def cli() -> None:
    """Prune Hugging Face causal language models one-shot: magnitude, Wanda, SparseGPT."""


@cli.command()
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML file of options (flags override it)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar and no per-layer table")
@click.option("--json", "as_json", is_flag=True, help="print the run's record (llmprune.json) as JSON")
@config_options(RunConfig)
def prune(recipe: str | None, quiet: bool, as_json: bool, **flags: Any) -> None:
    """Prune a model (default: the embedded SmolLM2-135M-Instruct, Wanda 50 %) and save it.

    Under torchrun every process prunes with its share of the calibration samples; rank 0 reports and saves.
    """
    from llmprune.api import run
    from llmprune.cli.render import gib, layer_progress, layer_table
    from llmprune.models.loading import resolve_device
    from llmprune.pipeline.distributed import communicator_from_environment

    values = read_recipe(recipe) if recipe else {}
    values.update(given(flags))
    config = build(RunConfig, values)
    pattern = config.pattern if config.pattern_spec.is_nm else f"unstructured {config.target_sparsity:.0%}"
    header = (
        f"[bold]llmprune[/] {config.method}, {pattern} on {config.model}; "
        f"calibration {config.calibration} {config.nsamples}×{config.seqlen}"
    )
    comm = communicator_from_environment(resolve_device(config.device))
    try:
        shown = comm.rank == 0 and not (quiet or as_json)
        with layer_progress(console, header) if shown else contextlib.nullcontext() as advance:
            result = run(config, progress=advance, comm=comm)
    except KeyboardInterrupt:
        raise Interrupted(_resume_note(config)) from None
    finally:
        comm.close()
    if comm.rank != 0:
        return
    if as_json:
        from llmprune.storage import read_metadata

        record = {"output": str(result.output), "streamed": result.streamed, **read_metadata(result.output)}
        click.echo(json.dumps(record, indent=2, default=str))
        return
    report = result.report
    if not quiet:
        out.print(layer_table(report))
    if result.dense_perplexity is not None:
        out.print(
            f"perplexity ({config.eval_data}, {config.eval_nsamples}×{config.eval_seqlen}): "
            f"dense {result.dense_perplexity:.2f} → pruned {result.pruned_perplexity:.2f}",
            soft_wrap=True,
        )
    out.print(
        f"achieved sparsity {report.achieved_sparsity:.2%} over {len(report.layers)} linear layers; "
        f"pruning {report.seconds:.1f} s (model and data loaded in {result.load_seconds:.1f} s); "
        f"peak RSS {gib(report.peak_rss_bytes)}"
        + (f", peak GPU {gib(report.peak_device_bytes)}" if report.peak_device_bytes else ""),
        soft_wrap=True,
    )
    if report.damping_raised:
        out.print(
            f"[yellow]Cholesky needed more damping in: {', '.join(report.damping_raised)}[/]", soft_wrap=True
        )
    if report.parameters_before:
        removed = f"; decoder layers removed: {report.removed_layers}" if report.removed_layers else ""
        out.print(
            f"decoder parameters {report.parameters_before:,} → {report.parameters_after:,}{removed}",
            soft_wrap=True,
        )
    if result.streamed:
        why = "--offload" if config.offload else "the model would not fit in memory"
        out.print(f"decoder layers were streamed from disk one at a time ({why})", soft_wrap=True)
    out.print(f"saved to {result.output}", soft_wrap=True)  # unwrapped lines, for scripts and logs


@cli.command(name="eval")
@click.argument("model", required=False)
@config_options(EvalConfig, skip=("model",))
@click.option("--list-tasks", is_flag=True, help="print every lm-eval task name and exit")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON on stdout")
def evaluate(model: str | None, list_tasks: bool, quiet: bool, as_json: bool, **flags: Any) -> None:
    """Perplexity of MODEL (default: the embedded model) on the embedded text, a file, wikitext2 or c4;
    with --tasks, also lm-eval tasks (zero-shot by default) on the same loaded model."""
    from llmprune.data.text import check_source, evaluation_data
    from llmprune.evaluation.perplexity import perplexity
    from llmprune.export.load import load
    from llmprune.models.architecture import check_windows
    from llmprune.models.loading import check_model_name, load_skeleton, load_tokenizer, resolve_device

    config = build(EvalConfig, {**given(flags), **({"model": model} if model else {})})
    if list_tasks:
        from llmprune.evaluation.tasks import task_manager

        click.echo("\n".join(task_manager(config.task_dir).all_tasks))
        return
    resolve_device(config.device)
    check_model_name(config.model)
    if config.perplexity:
        check_source(config.data)
    manager = None
    if config.tasks:  # names and datasets checked before the model is loaded
        from llmprune.evaluation.tasks import check_task_names, load_tasks, task_manager

        manager = task_manager(config.task_dir)
        check_task_names(config.tasks, manager)
    check_windows(config.model, load_skeleton(config.model).config, config.windows())
    if manager is not None:
        load_tasks(config.tasks, manager)
    result: dict[str, Any] = {"model": config.model, "perplexity": None, "tasks": None}
    tokenizer = load_tokenizer(config.model)
    windows = None
    if config.perplexity:
        windows = evaluation_data(tokenizer, config.data, config.seqlen, config.nsamples or None)
    loaded = load(config.model, config.dtype, config.device)  # also what needs llmprune to load
    if windows is not None:
        from llmprune.cli.render import counted_progress

        started = time.perf_counter()
        with counted_progress(console, "perplexity windows", quiet or as_json) as advance:
            value = perplexity(loaded, windows, progress=advance)
        seconds = time.perf_counter() - started
        result["perplexity"] = {
            "value": value,
            "data": config.data,
            "windows": len(windows),
            "seqlen": config.seqlen,
            "seconds": seconds,
        }
        if not as_json:
            out.print(
                f"perplexity {value:.3f} on {config.data} ({len(windows)}×{config.seqlen} tokens, "
                f"{seconds:.1f} s)",
                soft_wrap=True,
            )
    if config.tasks:
        from llmprune.evaluation.tasks import evaluate_tasks

        scores = evaluate_tasks(
            loaded,
            tokenizer,
            config.tasks,
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            batch_size=config.batch_size,
            manager=manager,
            quiet=quiet or as_json,
        )
        result["tasks"] = scores
        if not as_json:
            from llmprune.cli.render import task_table

            out.print(task_table(scores))
    if as_json:
        click.echo(json.dumps(result, indent=2))


def _error(message: str, code: int) -> None:
    """Print ``llmprune: error: MESSAGE`` as one unwrapped line and exit with ``code``."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    console.print(f"llmprune: error: {line}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the command kept and how to go on; ``main`` prints it in one line (exit 130)."""

    def __init__(self, note: str = "no output was written") -> None:
        super().__init__(note)
        self.note = note


def _resume_note(config: RunConfig) -> str:
    """What an interrupted prune kept: its finished layers, if ``--resume`` can continue from them."""
    from llmprune.api import resume_checkpoint

    checkpoint = resume_checkpoint(config)
    layers = checkpoint.finished_layers()
    if not layers:
        return "no output was written"
    return (
        f"no output was written; {layers} finished decoder layer(s) are kept in {checkpoint.directory}: "
        "add --resume to continue"
    )


def _interrupted(exc: BaseException | None) -> None:
    note = exc.note if isinstance(exc, Interrupted) else "no output was written"
    console.print(f"llmprune: interrupted; {note}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit 2 for usage errors, 130 on Ctrl-C."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # ours is the one over decoder layers
        code = cli.main(args=argv, prog_name="llmprune", standalone_mode=False)
    except click.exceptions.Abort as exc:  # click's wrapper of KeyboardInterrupt
        _interrupted(exc.__cause__)
    except NoArgsIsHelp as exc:  # plain `llmprune`: the help, not an error line
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        _error(exc.format_message(), exc.exit_code)
    except LlmpruneError as exc:
        _error(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    if isinstance(code, int) and code:  # click's ctx.exit(code) in non-standalone mode
        sys.exit(code)


# One module per further command; imported last because they use ``cli``'s helpers above.
from llmprune.cli import checkpoints  # noqa: E402
from llmprune.cli.bench import bench  # noqa: E402
from llmprune.cli.finetune import finetune  # noqa: E402
from llmprune.cli.sweep import sweep  # noqa: E402

for command in (checkpoints.compress, checkpoints.decompress, checkpoints.inspect, sweep, bench, finetune):
    cli.add_command(command)
