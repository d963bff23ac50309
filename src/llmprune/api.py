"""The Python API: ``prune`` a loaded model; ``run`` a whole configured job as ``llmprune prune`` does;
``evaluate`` a model as ``llmprune eval`` does."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.config import EvalConfig, PruneOptions, RunConfig
from llmprune.data.text import calibration_data, evaluation_data
from llmprune.errors import LlmpruneError, UsageError
from llmprune.evaluation.perplexity import perplexity
from llmprune.export.load import load
from llmprune.export.save import save_pruned, write_model_metadata
from llmprune.jobs import calibration_record, configured, perplexity_record, preflight, run_metadata
from llmprune.models.architecture import decoder_layers
from llmprune.models.loading import (
    fits_in_memory,
    load_plain_model,
    load_tokenizer,
    local_checkpoint,
    models_checked_once,
    resolve_device,
    resolve_dtype,
)
from llmprune.models.packed import MANIFEST_KEY, compress_weights
from llmprune.models.shards import CheckpointShards, ShardWriter, outside_layers, streaming_skeleton
from llmprune.pipeline.distributed import Communicator, communicator_from_environment
from llmprune.pipeline.offload import ActivationStore, LayerSource, StreamedLayers
from llmprune.pipeline.report import PruneReport
from llmprune.pipeline.resume import LayerCheckpoint
from llmprune.pruning import ProgressCallback, check_plan, prune_model
from llmprune.storage import prepare_output, staged_directory
from llmprune.structured.layout import unit_layout


def prune(
    model: nn.Module,
    calibration: torch.Tensor | Iterable[torch.Tensor],
    options: PruneOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    **overrides: Any,
) -> PruneReport:
    """Prune a loaded ``transformers`` causal LM in place; returns what was done, layer by layer.

    ``calibration`` is a LongTensor ``[n, seqlen]`` of token ids or an iterable of 1-D LongTensors.
    ``options`` is a ``PruneOptions`` (default: Wanda, unstructured 50 %); any of its fields passed as a
    keyword (``method="sparsegpt"``, ``pattern="2:4"``, ``true_sequential=True``...) overrides it.
    ``sparsity`` defaults to 0.5; with an N:M ``pattern`` it is implied (1 - N/M).
    ``progress(done, total)`` is called after each decoder layer.
    """
    return prune_model(model, calibration, configured(PruneOptions, options, overrides), progress)


@dataclass
class RunReport:
    """Outcome of ``run``: the report, perplexities and where the model went."""

    config: RunConfig
    report: PruneReport
    dense_perplexity: float | None
    pruned_perplexity: float | None
    output: Path | None
    load_seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)
    streamed: bool = False
    """Whether decoder layers were streamed from disk (``offload``, or a model too large for memory)."""


GENERATION_CONFIG = "generation_config.json"


def resume_checkpoint(config: RunConfig) -> LayerCheckpoint:
    """Where a run's progress is kept: a hidden sibling of its output, ``.NAME.resume``."""
    output = config.output_path()
    return LayerCheckpoint(output.with_name(f".{output.name}.resume"), config.pruning_recipe())


def run(
    config: RunConfig | None = None,
    /,
    *,
    save: bool = True,
    progress: ProgressCallback | None = None,
    comm: Communicator | None = None,
    **overrides: Any,
) -> RunReport:
    """Load, measure, prune, measure and save, as ``llmprune prune`` does: ``config``, a ``RunConfig``,
    or its fields as keywords (which override ``config``'s). Cheap checks come first, and the output is
    checked and held (``prepare_output``: locked against other runs) for the whole run.

    Progress is checkpointed after every decoder layer (when saving), so that a run killed midway can be
    continued with ``resume``; the checkpoint is deleted once the output is saved. Under ``torchrun`` (or
    with ``comm`` of several processes) every process prunes its share of the calibration data; only rank 0
    measures perplexity and saves, the others return without either. With ``offload`` (or when the model
    would not fit in memory) decoder layers are streamed from the checkpoint's shards one at a time and
    each pruned layer is written to the output at once.
    """
    config = configured(RunConfig, config, overrides)
    if comm is None:
        comm = communicator_from_environment(resolve_device(config.device))
        try:
            return run(config, save=save, progress=progress, comm=comm)
        finally:
            comm.close()
    save = save and comm.rank == 0  # the output (and its lock) is rank 0's
    held = prepare_output(config.output_path(), config.overwrite) if save else contextlib.nullcontext()
    with held, models_checked_once():
        return _run(config, save, progress, comm)


def _run(config: RunConfig, save: bool, progress: ProgressCallback | None, comm: Communicator) -> RunReport:
    main = comm.rank == 0
    if config.resume and comm.world_size > 1:
        raise UsageError("--resume is not supported with several processes yet; resume in one process")
    if config.resume and config.max_memory:
        raise UsageError("--resume is not supported with --max-memory yet")
    save = save and main
    comm.share(-(-config.nsamples // config.batch_size), config.nsamples)  # a batch for every process?
    output = config.output_path()
    if config.resume:
        if not save:
            raise UsageError("resume needs a run that saves its output")
        resume_checkpoint(config).check()
    sources = [config.calibration, *([config.eval_data] if config.eval_nsamples and main else [])]
    checked = preflight(config.model, comm.device, config.dtype, sources=sources, windows=config.windows())
    options = config.prune_options()
    check_plan(checked.skeleton, options)  # the layers to prune, the reconstruction asked for
    streamed = config.offload or not fits_in_memory(checked.model_bytes, comm.device)
    share = -(-config.nsamples // comm.world_size)  # this process's calibration samples, at most
    checked.check_activations(share, config.seqlen, config.max_memory_bytes)
    if options.pattern_spec.structured:
        unit_layout(checked.skeleton, options.units)  # units this family supports
        if streamed or config.resume:
            why = "--offload" if config.offload else "--resume" if config.resume else "a model this large"
            raise UsageError(f"structured pruning does not support {why} yet (it keeps the model in memory)")

    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    calibration = calibration_data(tokenizer, config.calibration, config.nsamples, config.seqlen, config.seed)
    evaluation = (
        evaluation_data(tokenizer, config.eval_data, config.eval_seqlen, config.eval_nsamples)
        if config.eval_nsamples and main
        else None
    )
    job = _Job(config, tokenizer, calibration, evaluation, comm, progress, save, started)
    activations = ActivationStore(config.max_memory_bytes, output.parent if save else None)
    try:
        return _run_streamed(job, activations) if streamed else _run_in_memory(job, activations)
    finally:
        activations.close()


@dataclass
class _Job:
    """What both ways of running (model in memory, layers streamed) are given."""

    config: RunConfig
    tokenizer: Any
    calibration: torch.Tensor
    evaluation: torch.Tensor | None
    comm: Communicator
    progress: ProgressCallback | None
    save: bool
    started: float

    def prune(
        self, model: nn.Module, activations: ActivationStore, layers_from: LayerSource | None = None
    ) -> tuple[PruneReport, LayerCheckpoint | None]:
        """Prune, checkpointing every layer when saving in one process; returns the report and the
        checkpoint, to be cleared once the output is saved."""
        resumable = self.save and self.comm.world_size == 1 and not self.config.pattern_spec.structured
        checkpoint = resume_checkpoint(self.config) if resumable else None
        if checkpoint is not None and not self.config.resume:
            checkpoint.clear()  # progress of an earlier run is not ours to continue
        options, comm = self.config.prune_options(), self.comm
        try:
            report = prune_model(
                model, self.calibration, options, self.progress, checkpoint, comm, layers_from, activations
            )
        except LlmpruneError:
            if checkpoint is not None:
                checkpoint.clear()  # bad input or NaN: resuming would only fail again
            raise
        return report, checkpoint

    def metadata(self, report: PruneReport, dense: float | None, pruned: float | None) -> dict[str, Any]:
        config = self.config
        return run_metadata(
            config.model_dump(),
            calibration=calibration_record(config),
            perplexity=perplexity_record(
                config.eval_data, self.evaluation, config.eval_seqlen, dense=dense, pruned=pruned
            ),
            report=report,
        )


def _run_in_memory(job: _Job, activations: ActivationStore) -> RunReport:
    config, comm, evaluation = job.config, job.comm, job.evaluation
    model = load_plain_model(config.model, config.dtype, str(comm.device))
    load_seconds = time.perf_counter() - job.started

    dense = perplexity(model, evaluation) if evaluation is not None else None
    report, checkpoint = job.prune(model, activations)
    pruned = perplexity(model, evaluation) if evaluation is not None else None
    metadata = job.metadata(report, dense, pruned)
    output = config.output_path()
    saved = None
    if job.save:
        saved = save_pruned(model, job.tokenizer, output, metadata, config.overwrite, config.save_format)
    if checkpoint is not None:
        checkpoint.clear()
    return RunReport(config, report, dense, pruned, saved, load_seconds, metadata)


def _run_streamed(job: _Job, activations: ActivationStore) -> RunReport:
    """Parts of the model read from the checkpoint's shards only while needed; each pruned decoder layer
    is written to the output's shards (``models/shards.py``) as soon as it is done."""
    config, comm, evaluation = job.config, job.comm, job.evaluation
    source = local_checkpoint(config.model)
    device, dtype = comm.device, resolve_dtype(config.dtype, comm.device)
    model, shards = streaming_skeleton(source, dtype)
    _, layers = decoder_layers(model)
    outside, _ = outside_layers(model, shards, head=True)
    load_seconds = time.perf_counter() - job.started

    def streamed(checkpoint: CheckpointShards, writer: ShardWriter | None = None) -> StreamedLayers:
        return StreamedLayers(model, checkpoint, device, dtype, writer, first_shard=len(outside) + 1)

    dense = perplexity(model, evaluation, layers_from=streamed(shards)) if evaluation is not None else None
    with contextlib.ExitStack() as stack:
        target: Path | None = None
        if job.save:
            target = stack.enter_context(staged_directory(config.output_path(), config.overwrite))
        elif comm.rank == 0:  # still written, to measure the pruned model, then deleted
            target = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".llmprune-")))
        writer = ShardWriter(target, len(outside) + len(layers)) if target is not None else None
        for number, name in enumerate(outside if writer is not None else [], start=1):
            writer.write(number, {name: _cast(shards.read(name), dtype)})  # one tensor in memory at a time
        report, checkpoint = job.prune(model, activations, streamed(shards, writer))
        pruned = None
        if writer is not None:
            writer.finish()
            if evaluation is not None:
                pruned = perplexity(model, evaluation, layers_from=streamed(CheckpointShards(target)))
        metadata = job.metadata(report, dense, pruned)
        if job.save:
            model.config.dtype = dtype
            model.config.save_pretrained(target)
            if (source / GENERATION_CONFIG).is_file():
                shutil.copy(source / GENERATION_CONFIG, target / GENERATION_CONFIG)
            job.tokenizer.save_pretrained(target)
            if config.save_format == "compressed":  # shard by shard, once the pruned model is measured
                metadata[MANIFEST_KEY] = compress_weights(target, target)
            write_model_metadata(target, metadata)
    if checkpoint is not None:
        checkpoint.clear()
    saved = config.output_path() if job.save else None
    return RunReport(config, report, dense, pruned, saved, load_seconds, metadata, streamed=True)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


@dataclass
class EvalReport:
    """What ``evaluate`` measured, each part None when not asked for: ``perplexity`` (``value``, ``data``,
    ``windows``, ``seqlen``, ``seconds``) and lm-eval ``tasks`` (metric values per task)."""

    model: str
    perplexity: dict[str, Any] | None = None
    tasks: dict[str, dict[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """As ``llmprune eval --json`` prints it."""
        return {"model": self.model, "perplexity": self.perplexity, "tasks": self.tasks}


def evaluate(
    config: EvalConfig | None = None,
    /,
    *,
    progress: Callable[[int, int], None] | None = None,
    quiet: bool = False,
    **overrides: Any,
) -> EvalReport:
    """Perplexity of a model and, with ``tasks``, lm-eval tasks on the same loaded model, as ``llmprune
    eval`` does: ``config``, an ``EvalConfig``, or its fields as keywords (which override ``config``'s).

    Model, data and task names (and the tasks' datasets) are checked before the model is loaded; any
    checkpoint ``llmprune.load`` reads can be evaluated. ``progress(done, total)`` follows the perplexity
    windows; ``quiet`` turns off lm-eval's progress bars.
    """
    config = configured(EvalConfig, config, overrides)
    with models_checked_once():
        return _evaluate(config, progress, quiet)


def _evaluate(config: EvalConfig, progress: Callable[[int, int], None] | None, quiet: bool) -> EvalReport:
    manager = None

    def check_tasks() -> None:  # names checked before the model is read, their datasets after its config
        nonlocal manager
        if config.tasks:
            from llmprune.evaluation.tasks import check_task_names, task_manager

            manager = task_manager(config.task_dir)
            check_task_names(config.tasks, manager)

    sources = [config.data] if config.perplexity else []
    lengths = config.windows()
    preflight(config.model, config.device, config.dtype, sources=sources, windows=lengths, checks=check_tasks)
    if manager is not None:
        from llmprune.evaluation.tasks import load_tasks

        load_tasks(config.tasks, manager)
    report = EvalReport(config.model)
    tokenizer = load_tokenizer(config.model)
    windows = None
    if config.perplexity:
        windows = evaluation_data(tokenizer, config.data, config.seqlen, config.nsamples or None)
    loaded = load(config.model, config.dtype, config.device)  # also what needs llmprune to load
    if windows is not None:
        started = time.perf_counter()
        value = perplexity(loaded, windows, progress=progress)
        report.perplexity = {
            "value": value,
            "data": config.data,
            "windows": len(windows),
            "seqlen": config.seqlen,
            "seconds": time.perf_counter() - started,
        }
    if config.tasks:
        from llmprune.evaluation.tasks import evaluate_tasks

        report.tasks = evaluate_tasks(
            loaded,
            tokenizer,
            config.tasks,
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            batch_size=config.batch_size,
            manager=manager,
            quiet=quiet,
        )
    return report
