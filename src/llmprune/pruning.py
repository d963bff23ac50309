"""Pruning a model: the step the options choose, run by the one walk over the decoder layers.

Each kind of per-layer pruning is one step (``pipeline.walk.LayerStep``, plus what a run needs before
and after the walk: ``PruningStep``), registered in ``STEPS``. The step whose ``wanted(options)`` is true
runs; the latest registered is asked first, so a new step can take over options that a built-in one
would also take. ``prune_model`` builds it, shares the calibration batches among processes and walks.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from llmprune.config import BLOCK_RECONSTRUCTION, PruneOptions
from llmprune.errors import UsageError
from llmprune.pipeline.distributed import Communicator
from llmprune.pipeline.offload import ActivationStore, LayerSource
from llmprune.pipeline.reconstruct import ReconstructionSteps, check_reconstruction
from llmprune.pipeline.report import PruneReport
from llmprune.pipeline.resume import LayerCheckpoint
from llmprune.pipeline.steps import LinearStep, plan_targets
from llmprune.pipeline.walk import (
    LayerStep,
    ProgressCallback,
    WalkContext,
    calibration_batches,
    calibration_rows,
    walk_layers,
)
from llmprune.structured.step import StructuredStep

__all__ = [
    "STEPS",
    "ProgressCallback",
    "PruningStep",
    "check_plan",
    "plan_targets",
    "prune_model",
    "step_name",
]


class PruningStep(LayerStep, Protocol):
    """A step that prunes: built from the model and options (``STEPS``), prepared before the walk and
    finished after it."""

    what: str
    """What it does, for messages (``structured pruning``)."""
    streams: bool
    """Whether it works on streamed layers (``layers_from``) and with checkpoints."""

    def prepare(
        self,
        model: nn.Module,
        batches: list[torch.Tensor],
        comm: Communicator,
        report: PruneReport,
        layers_from: LayerSource,
    ) -> None:
        """Work before the walk (e.g. dense scoring passes), given this process's calibration batches and
        where the decoder layers come from (streamed or in memory)."""
        ...

    def finish(self, model: nn.Module, report: PruneReport) -> None:
        """Work after the walk (e.g. the model's config)."""
        ...


class StepFactory(Protocol):
    """A registered step: a class built from the model and options, saying which options it serves."""

    def __call__(self, model: nn.Module, options: PruneOptions) -> PruningStep: ...

    def wanted(self, options: PruneOptions) -> bool:
        """Whether this step does the pruning ``options`` ask for."""
        ...


STEPS: dict[str, StepFactory] = {
    "linear": LinearStep,
    "structured": StructuredStep,
}
"""The registered pruning steps, by name."""


def step_name(options: PruneOptions) -> str:
    """The registered step that ``options`` ask for: the latest registered that wants them."""
    for name, factory in reversed(STEPS.items()):
        if factory.wanted(options):
            return name
    raise UsageError(f"no registered pruning step does pattern {options.pattern!r} with {options.method}")


def check_plan(skeleton: nn.Module, options: PruneOptions) -> None:
    """What can be checked on a weightless model before loading one: the layers to prune (N:M widths,
    --include/--exclude, --layer-sparsity) and whether its family does the block reconstruction asked for."""
    plan_targets(skeleton, options)
    if options.reconstruct in BLOCK_RECONSTRUCTION:
        check_reconstruction(skeleton, options.reconstruct)


def _with_reconstruction(model: nn.Module, step: PruningStep, options: PruneOptions) -> list[LayerStep]:
    """The steps of the walk: the pruning step, between those of block reconstruction if asked for."""
    if options.reconstruct not in BLOCK_RECONSTRUCTION:
        return [step]
    if not isinstance(step, LinearStep):
        raise UsageError(f"--reconstruct {options.reconstruct} does not apply to {step.what}")

    def pruned(index: int, prefix: str, layer: nn.Module) -> list[nn.Module]:
        # Read when each layer is reached: --schedule owl re-plans in prepare.
        return [target.module for target in step.plan[index]]

    recon = ReconstructionSteps(
        model, options.reconstruct, options.reconstruct_steps, options.reconstruct_lr, pruned
    )
    return [recon.before, step, recon.after]


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration: torch.Tensor | Iterable[torch.Tensor],
    options: PruneOptions,
    progress: ProgressCallback | None = None,
    checkpoint: LayerCheckpoint | None = None,
    comm: Communicator | None = None,
    layers_from: LayerSource | None = None,
    activations: ActivationStore | None = None,
) -> PruneReport:
    """Prune ``model`` in place, layer by layer, from calibration token ids.

    With a ``checkpoint``, progress is saved after every layer, and a run finding progress saved there
    restores the finished layers and goes on from the next one. With ``comm`` of several processes, each
    runs its contiguous share of the calibration batches (every process passes all the rows) and all end
    with the same weights, bit for bit those of one process with the same threads, and the same report.
    ``layers_from`` loads each decoder layer just before it is pruned and takes it back once done
    (streaming, see ``pipeline/offload.py``); ``activations`` keeps the hidden states between layers, in
    RAM or on disk.
    """
    start = time.perf_counter()
    comm = comm or Communicator()
    step = STEPS[step_name(options)](model, options)
    rows = calibration_rows(calibration)
    total_tokens = sum(row.numel() for row in rows)
    batches = calibration_batches(rows, options.batch_size)  # the same batches for any number of processes
    total_batches = len(batches)
    share = comm.share(total_batches, len(rows))
    offset = sum(batch.numel() for batch in batches[: share.start])  # index of this process's first token
    batches = batches[share]
    stride = max(1, total_tokens // options.error_tokens)
    was_training = model.training
    model.eval()
    layers_from = layers_from or LayerSource()
    report = PruneReport(options.method, options.pattern, options.target_sparsity)
    if not step.streams and (type(layers_from) is not LayerSource or checkpoint is not None):
        raise UsageError(f"{step.what} does not stream layers or checkpoint them yet")
    step.prepare(model, batches, comm, report, layers_from)
    walk = WalkContext(comm, stride, offset, share.start, total_batches, report.layers, report.blocks)
    walked = walk_layers(
        model,
        batches,
        _with_reconstruction(model, step, options),
        walk,
        layers_from=layers_from,
        activations=activations,
        checkpoint=checkpoint,
        progress=progress,
        check_outputs=True,
    )
    step.finish(model, report)
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if walked.device.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(walked.device)
    return report
