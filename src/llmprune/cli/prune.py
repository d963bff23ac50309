"""``llmprune prune``: prune a model, measure it before and after, and save it."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import click

from llmprune.config import RunConfig, build, read_recipe

from .console import Interrupted, console, out
from .options import config_options, given
from .render import gib, layer_progress, layer_table


@click.command()
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML file of options (flags override it)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar and no per-layer table")
@click.option("--json", "as_json", is_flag=True, help="print the run's record (llmprune.json) as JSON")
@config_options(RunConfig)
def prune(recipe: str | None, quiet: bool, as_json: bool, **flags: Any) -> None:
    """Prune a model (default: the embedded SmolLM2-135M-Instruct, Wanda 50 %) and save it.

    Under torchrun every process prunes with its share of the calibration samples; rank 0 reports and saves.
    """
    from llmprune.api import run
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
