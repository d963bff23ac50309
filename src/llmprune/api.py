"""The Python API: ``prune`` a loaded model, and ``run`` a whole configured job as the CLI does."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.config import PruneOptions, RunConfig, build
from llmprune.data.text import calibration_data, check_source, evaluation_data
from llmprune.errors import LlmpruneError, UsageError
from llmprune.evaluation.perplexity import perplexity
from llmprune.export.save import check_output, library_versions, save_pruned
from llmprune.models.loading import (
    check_model_name,
    load_model,
    load_skeleton,
    load_tokenizer,
    resolve_device,
)
from llmprune.pipeline.distributed import Communicator, communicator_from_environment
from llmprune.pipeline.driver import ProgressCallback, plan_targets, prune_model
from llmprune.pipeline.report import PruneReport
from llmprune.pipeline.resume import LayerCheckpoint


def prune(
    model: nn.Module,
    calibration: torch.Tensor | Iterable[torch.Tensor],
    *,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    progress: ProgressCallback | None = None,
    **options: Any,
) -> PruneReport:
    """Prune a loaded ``transformers`` causal LM in place.

    ``calibration`` is a LongTensor ``[n, seqlen]`` of token ids or an iterable of 1-D LongTensors. Any
    ``PruneOptions`` field can be passed as a keyword (``true_sequential=True``, ``blocksize=64``, ...).
    ``sparsity`` defaults to 0.5; with an N:M ``pattern`` it is implied (1 - N/M).
    """
    config = build(PruneOptions, {"method": method, "sparsity": sparsity, "pattern": pattern, **options})
    return prune_model(model, calibration, config, progress)


@dataclass
class RunResult:
    """Outcome of ``run``: the report, perplexities and where the model went."""

    config: RunConfig
    report: PruneReport
    dense_perplexity: float | None
    pruned_perplexity: float | None
    output: Path | None
    load_seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)


def resume_checkpoint(config: RunConfig) -> LayerCheckpoint:
    """Where a run's progress is kept: a hidden sibling of its output, ``.NAME.resume``."""
    output = config.output_path()
    return LayerCheckpoint(output.with_name(f".{output.name}.resume"), config.pruning_recipe())


def run(
    config: RunConfig,
    *,
    save: bool = True,
    progress: ProgressCallback | None = None,
    comm: Communicator | None = None,
) -> RunResult:
    """Load, measure, prune, measure and save, as ``llmprune prune`` does. Cheap checks come first.

    Progress is checkpointed after every decoder layer (when saving), so that a run killed midway can be
    continued with ``resume``; the checkpoint is deleted once the output is saved. Under ``torchrun`` (or
    with ``comm`` of several processes) every process prunes its share of the calibration data; only rank 0
    measures perplexity and saves, the others return without either.
    """
    if comm is None:
        comm = communicator_from_environment(resolve_device(config.device))
        try:
            return run(config, save=save, progress=progress, comm=comm)
        finally:
            comm.close()
    main = comm.rank == 0
    if config.resume and comm.world_size > 1:
        raise UsageError("--resume is not supported with several processes yet; resume in one process")
    save = save and main
    comm.rows(config.nsamples)  # enough samples for every process?
    output = config.output_path()
    checkpoint = resume_checkpoint(config) if save and comm.world_size == 1 else None
    if save:
        check_output(output, config.overwrite)
    if config.resume:
        if checkpoint is None:
            raise UsageError("resume needs a run that saves its output")
        checkpoint.check()
    check_model_name(config.model)
    check_source(config.calibration)
    if config.eval_nsamples and main:
        check_source(config.eval_data)
    # The layers to prune (N:M widths, --include/--exclude), checked on a weightless skeleton.
    plan_targets(load_skeleton(config.model), config.prune_options())

    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    calibration = calibration_data(tokenizer, config.calibration, config.nsamples, config.seqlen, config.seed)
    evaluation = (
        evaluation_data(tokenizer, config.eval_data, config.eval_seqlen, config.eval_nsamples)
        if config.eval_nsamples and main
        else None
    )
    model = load_model(config.model, config.dtype, str(comm.device))
    load_seconds = time.perf_counter() - started

    dense = perplexity(model, evaluation) if evaluation is not None else None
    if checkpoint is not None and not config.resume:
        checkpoint.clear()  # progress of an earlier run is not ours to continue
    try:
        report = prune_model(model, calibration, config.prune_options(), progress, checkpoint, comm)
    except LlmpruneError:
        if checkpoint is not None:
            checkpoint.clear()  # bad input or NaN: resuming would only fail again
        raise
    pruned = perplexity(model, evaluation) if evaluation is not None else None

    metadata = {
        "recipe": config.model_dump(),
        "calibration": {
            "source": config.calibration,
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
            "seed": config.seed,
        },
        "perplexity": {
            "data": config.eval_data,
            "windows": 0 if evaluation is None else len(evaluation),
            "seqlen": config.eval_seqlen,
            "dense": dense,
            "pruned": pruned,
        },
        "report": report.to_dict(),
        "versions": library_versions(),
    }
    saved = save_pruned(model, tokenizer, output, metadata, config.overwrite) if save else None
    if checkpoint is not None:
        checkpoint.clear()
    return RunResult(config, report, dense, pruned, saved, load_seconds, metadata)
