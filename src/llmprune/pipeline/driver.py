"""The sequential layer-by-layer driver: the one place where calibration data flows through the model.

For each decoder layer i, in order: collect input statistics of its linear layers while it runs on the
outputs of the already-pruned layers 0..i-1, prune them, then recompute the layer's outputs with the pruned
weights and hand those to layer i+1 (SparseGPT §3.5; Wanda §3). With ``true_sequential`` every linear layer
is pruned in a pre-forward hook from the inputs it actually receives, which have already gone through the
pruned sublayers before it, so one forward pass per layer does both jobs.

Across processes (``torchrun``) each process runs its share of the calibration batches; statistics are
summed over processes before a layer is pruned, and each group of linear layers is solved by one process,
which broadcasts the result (see ``pipeline/distributed.py``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.config import PruneOptions
from llmprune.errors import NonFiniteError, UsageError
from llmprune.methods import METHODS, LayerTask, Method, Pattern, PruneOutcome, Statistic
from llmprune.models.architecture import (
    decoder_layers,
    input_width,
    prunable_modules,
    read_weight,
    write_weight,
)
from llmprune.pipeline.capture import LayerCall, capture_layer_inputs, model_device, run_layer
from llmprune.pipeline.distributed import Communicator
from llmprune.pipeline.lockstep import Lockstep
from llmprune.pipeline.offload import ActivationStore, LayerSource
from llmprune.pipeline.report import LinearReport, PruneReport
from llmprune.pipeline.resume import LayerCheckpoint
from llmprune.pipeline.statistics import InputStatistics, error_from_terms, error_terms
from llmprune.structured import decoder_parameters
from llmprune.structured import prepare as prepare_structured
from llmprune.structured.blocks import StructuredBlocks

ProgressCallback = Callable[[int, int], None]


@dataclass
class Target:
    """One linear layer to prune and how."""

    name: str
    block: int
    module: nn.Module
    task: LayerTask


def layer_sparsities(options: PruneOptions, num_layers: int) -> list[float]:
    """Sparsity of each decoder layer: uniform, or rising linearly with depth around the same mean."""
    mean = options.target_sparsity
    if options.schedule == "uniform" or num_layers == 1:
        return [mean] * num_layers
    spread = options.schedule_spread
    return [mean - spread + 2 * spread * i / (num_layers - 1) for i in range(num_layers)]


def plan_targets(model: nn.Module, options: PruneOptions) -> list[list[Target]]:
    """The linear layers to prune in each decoder layer, with their tasks; validates shapes first."""
    path, layers = decoder_layers(model)
    pattern = options.pattern_spec
    sparsities = layer_sparsities(options, len(layers))
    overrides = [(re.compile(regex), value) for regex, value in options.layer_sparsity.items()]
    candidates = [prunable_modules(layer, f"{path}.{index}") for index, layer in enumerate(layers)]
    _check_selection([name for modules in candidates for name in modules], options)
    plan = []
    for index, modules in enumerate(candidates):
        targets = []
        for name, module in modules.items():
            if not _selected(name, options):
                continue
            if pattern.is_nm and input_width(module) % pattern.m:
                raise UsageError(
                    f"{name}: input width {input_width(module)} is not divisible by M={pattern.m} "
                    f"of pattern {pattern}"
                )
            sparsity = next((value for regex, value in overrides if regex.search(name)), sparsities[index])
            task = LayerTask(sparsity, pattern, options.blocksize, options.damp, options.magnitude_scope)
            targets.append(Target(name, index, module, task))
        plan.append(targets)
    return plan


def _selected(name: str, options: PruneOptions) -> bool:
    """Whether --include/--exclude leave the linear layer ``name`` to be pruned."""
    if options.include and not any(fnmatch.fnmatchcase(name, glob) for glob in options.include):
        return False
    return not any(fnmatch.fnmatchcase(name, glob) for glob in options.exclude)


def _check_selection(names: list[str], options: PruneOptions) -> None:
    """Every --include/--exclude glob and --layer-sparsity regex must select some of the linear layers
    ``names``: a typo would otherwise be ignored without a word, and the wrong layers pruned, or pruned at
    the wrong sparsity."""
    example = f" (their names look like {names[0]})" if names else ""
    for flag, globs in (("--include", options.include), ("--exclude", options.exclude)):
        for glob in globs:
            if not any(fnmatch.fnmatchcase(name, glob) for name in names):
                raise UsageError(f"{flag} {glob!r} matches no linear layer{example}")
    pruned = [name for name in names if _selected(name, options)]
    if not pruned:
        raise UsageError("no linear layer matches --include/--exclude: nothing to prune")
    regexes = [re.compile(regex) for regex in options.layer_sparsity]
    applied = {next((r for r in regexes if r.search(name)), None) for name in pruned}
    for regex in regexes:
        if not any(regex.search(name) for name in names):
            raise UsageError(f"--layer-sparsity {regex.pattern!r} matches no linear layer{example}")
        if regex not in applied:
            raise UsageError(
                f"--layer-sparsity {regex.pattern!r} sets no layer: the layers it matches are excluded or "
                "set by an earlier pattern (the first match wins)"
            )


def structured_targets(model: nn.Module, blocks: StructuredBlocks | None) -> list[list[Target]]:
    """Per decoder layer, the projections consuming the units to remove (their inputs are scored)."""
    path, layers = decoder_layers(model)
    if blocks is None:
        return [[] for _ in layers]
    task = LayerTask(0.0, Pattern(structured=True))
    return [
        [Target(f"{path}.{i}.{name}", i, layer.get_submodule(name), task) for name in blocks.consumers(i)]
        for i, layer in enumerate(layers)
    ]


def _update_config(config, pruned) -> None:
    """Copy the widths a structured run changed into the model's own config (shared by its modules)."""
    for field, value in pruned.to_dict().items():
        if getattr(config, field, None) != value:
            setattr(config, field, value)


def calibration_rows(calibration: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The calibration sequences as a list of 1-D LongTensors, validated."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise UsageError("calibration must be a LongTensor [n, seqlen] or an iterable of 1-D LongTensors")
        rows = list(calibration)
    else:
        rows = [torch.as_tensor(row) for row in calibration]
    if not rows:
        raise UsageError("calibration data is empty")
    for row in rows:
        if row.dim() != 1 or row.dtype != torch.long:
            raise UsageError("each calibration sequence must be a 1-D LongTensor of token ids")
    return rows


def calibration_batches(
    calibration: torch.Tensor | Iterable[torch.Tensor], batch_size: int
) -> list[torch.Tensor]:
    """Group calibration sequences into batches of equal-length rows."""
    batches: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    for row in calibration_rows(calibration):
        if run and (len(run) == batch_size or run[0].shape != row.shape):
            batches.append(torch.stack(run))
            run = []
        run.append(row)
    batches.append(torch.stack(run))
    return batches


class StopLayer(Exception):
    """Raised by a statistics hook once a dense pass has fed every statistic: the rest is not needed."""


class _StatisticsHooks:
    """Pre-forward hooks that feed each target's input into statistics shared by identity of the input.

    Linear layers reading the very same tensor (q/k/v, gate/up) share one accumulator, so a Hessian or a
    norm is computed once per distinct input. ``on_ready`` (one-pass mode) prunes as soon as stats exist.
    """

    def __init__(
        self,
        targets: list[Target],
        statistic: Statistic,
        stride: int,
        offset: int = 0,
        on_ready: Callable[[Target, InputStatistics], None] | None = None,
    ) -> None:
        self.statistic, self.stride, self.offset, self.on_ready = statistic, stride, offset, on_ready
        self.stats: dict[str, InputStatistics] = {}
        self._leaders: set[str] = set()
        self._seen: dict[int, tuple[torch.Tensor, InputStatistics]] = {}
        # Calls seen in the first batch; afterwards a dense pass can stop at the last one (it has what it
        # needs: nothing after the last linear layer feeds a statistic).
        self._calls: list[str] = []
        self._stop_after: tuple[str, int] | None = None
        self._count: dict[str, int] = {}
        self._handles = [t.module.register_forward_pre_hook(self._hook(t)) for t in targets]

    def _hook(self, target: Target):
        def pre_forward(_module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if target.name not in self.stats:
                seen = self._seen.get(id(inputs))
                if seen is not None and seen[0] is inputs:
                    self.stats[target.name] = seen[1]
                else:
                    stats = InputStatistics(
                        inputs.shape[-1], self.statistic, self.stride, inputs.device, self.offset
                    )
                    stats.update(inputs)
                    self.stats[target.name] = stats
                    self._leaders.add(target.name)
                    self._seen[id(inputs)] = (inputs, stats)
            elif target.name in self._leaders:
                self.stats[target.name].update(inputs)
            if self.on_ready is not None:
                self.on_ready(target, self.stats[target.name])
            elif self._stop_after is None:
                self._calls.append(target.name)
            else:
                self._count[target.name] = self._count.get(target.name, 0) + 1
                if (target.name, self._count[target.name]) == self._stop_after:
                    raise StopLayer

        return pre_forward

    def next_batch(self) -> None:
        self._seen.clear()
        self._count.clear()
        if self._stop_after is None and self._calls:
            last = self._calls[-1]
            self._stop_after = (last, self._calls.count(last))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    # A sum is NaN/Inf if any element is; only then (or on overflow) look element by element.
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"NaN or Inf in {what}")


def _checked(tensor: torch.Tensor, what: str) -> torch.Tensor:
    _check_finite(tensor, what)
    return tensor


def _solve(
    targets: list[Target], method: Method, stats: InputStatistics
) -> tuple[list[torch.Tensor], list[PruneOutcome]]:
    """The dense fp32 weights of linear layers sharing one input, and the method's outcomes for them."""
    dense = [read_weight(t.module).to(torch.float32, copy=True) for t in targets]
    for target, weight in zip(targets, dense, strict=True):
        _check_finite(weight, f"weights of {target.name}")
    key = (method.name, targets[0].task.damp)  # damping is the only task field a preparation reads
    if key not in stats.prepared:
        statistic = stats.statistic()
        stats.gram = None  # the Hessian above replaces it; freed before the factorisation needs memory
        stats.prepared[key] = method.prepare(statistic, targets[0].task)
        del statistic
    return dense, method.prune(dense, stats.prepared[key], [t.task for t in targets])


def prune_groups(
    groups: list[list[Target]],
    method: Method,
    stats: list[InputStatistics],
    comm: Communicator,
    first_owner: int = 0,
) -> list[LinearReport]:
    """Prune groups of linear layers in place (each group reads one input, ``stats[g]``); report each.

    Group g is solved by process ``(first_owner + g) % world_size``, which broadcasts its pruned weights so
    that every process holds the same. Groups go ``world_size`` at a time, one to each process at once. The
    relative error sums every process's error terms (its own sample tokens) before the ratio.
    """
    reports: list[LinearReport] = []
    terms: list[torch.Tensor] = []
    for start in range(0, len(groups), comm.world_size):
        turn = range(start, min(start + comm.world_size, len(groups)))
        owners = {g: (first_owner + g) % comm.world_size for g in turn}
        solved = {g: _solve(groups[g], method, stats[g]) for g in turn if owners[g] == comm.rank}
        for g in turn:
            targets, device = groups[g], stats[g].device
            if g in solved:
                dense, outcomes = solved.pop(g)
                for target, outcome in zip(targets, outcomes, strict=True):
                    write_weight(target.module, outcome.weight)
                damps = [math.nan if o.damp is None else o.damp for o in outcomes]
            else:
                dense = [read_weight(t.module).to(torch.float32, copy=True) for t in targets]
                damps = [math.nan] * len(targets)
            if comm.world_size > 1:
                for target in targets:
                    comm.broadcast(target.module.weight.data, owners[g])
                shared = torch.tensor(damps, dtype=torch.float64, device=device)
                comm.broadcast(shared, owners[g])
                damps = shared.tolist()
            samples = stats[g].sample_batches()
            for target, weight, damp in zip(targets, dense, damps, strict=True):
                stored = read_weight(target.module)
                terms.append(error_terms(weight, stored.float(), samples))
                reports.append(
                    LinearReport(
                        name=target.name,
                        block=target.block,
                        shape=tuple(weight.shape),
                        target_sparsity=target.task.sparsity,
                        achieved_sparsity=1.0 - int(torch.count_nonzero(stored)) / stored.numel(),
                        relative_error=0.0,  # below, once every process's terms are summed
                        damp=None if math.isnan(damp) else damp,
                        damp_raised=not math.isnan(damp) and damp > target.task.damp * (1 + 1e-9),
                    )
                )
    totals = torch.stack(terms)
    comm.all_reduce(totals)
    for report, total in zip(reports, totals, strict=True):
        report.relative_error = error_from_terms(total)
    return reports


@dataclass
class _Run:
    """What the pruning of every layer in one run shares."""

    method: Method
    stride: int
    """Every ``stride``-th calibration token is kept to measure reconstruction error."""
    offset: int
    """Index of this process's first calibration token."""
    report: PruneReport
    comm: Communicator
    blocks: StructuredBlocks | None = None
    """Structured pruning: the step that removes units from a whole layer (instead of ``method``)."""


def _dense_statistics(
    layer: nn.Module,
    hidden: Sequence[torch.Tensor],
    calls: list[LayerCall],
    targets: list[Target],
    statistic: Statistic,
    run: _Run,
) -> dict[str, InputStatistics]:
    """Statistics of the targets' inputs while the (still dense) layer runs on every batch, summed over
    processes (in the same order on every process; statistics shared by several targets once)."""
    hooks = _StatisticsHooks(targets, statistic, run.stride, run.offset)
    try:
        for h, c in zip(hidden, calls, strict=True):
            with contextlib.suppress(StopLayer):
                run_layer(layer, h, c)
            hooks.next_batch()
    finally:
        hooks.remove()
    missing = [t.name for t in targets if t.name not in hooks.stats]
    if missing:
        raise UsageError(f"never called during the forward pass: {', '.join(missing)}")
    for target in targets:
        hooks.stats[target.name].reduce(run.comm)
    return hooks.stats


def _prune_from_dense_pass(
    layer: nn.Module,
    hidden: Sequence[torch.Tensor],
    calls: list[LayerCall],
    targets: list[Target],
    run: _Run,
) -> nn.Module:
    """Collect statistics from the dense layer, then prune its targets; returns the layer to go on with
    (a new, smaller one when structured pruning removed units)."""
    if run.blocks is not None:
        stats = _dense_statistics(layer, hidden, calls, targets, "hessian", run)
        index = targets[0].block
        prefix = targets[0].name.removesuffix(run.blocks.consumers(index)[0]).rstrip(".")
        smaller, rows = run.blocks(index, prefix, layer, stats)
        run.report.layers.extend(rows)
        return smaller
    stats = _dense_statistics(layer, hidden, calls, targets, run.method.statistic, run)
    # Layers reading the same input with the same settings are pruned in one call (SparseGPT: one solve).
    groups: dict[tuple, list[Target]] = {}
    for target in targets:
        task = target.task
        key = (id(stats[target.name]), task.damp, task.blocksize, task.pattern)
        groups.setdefault(key, []).append(target)
    group_list = list(groups.values())
    group_stats = [stats[group[0].name] for group in group_list]
    results = {row.name: row for row in prune_groups(group_list, run.method, group_stats, run.comm)}
    run.report.layers.extend(results[t.name] for t in targets)
    return layer


def _prune_in_one_pass(
    layer: nn.Module,
    hidden: list[torch.Tensor],
    calls: list[LayerCall],
    targets: list[Target],
    run: _Run,
) -> list[torch.Tensor]:
    """True-sequential: prune each target just before it runs, from the inputs it receives; return outputs.

    Batches run in lockstep: each stops at a target's pre-hook until all batches have fed its statistics,
    then the target is pruned once and every batch runs it with the pruned weights.
    """
    done: set[str] = set()
    lockstep = Lockstep()

    def prune_now(target: Target, stats: InputStatistics) -> None:
        # Every process reaches the same targets in the same order, so the collectives match up.
        if target.name not in done:
            owner = len(done)
            done.add(target.name)
            stats.reduce(run.comm)
            run.report.layers.extend(
                prune_groups([[target]], run.method, [stats], run.comm, first_owner=owner)
            )

    def ready(target: Target, stats: InputStatistics) -> None:
        lockstep.meet(target.name, lambda: prune_now(target, stats))

    hooks = _StatisticsHooks(targets, run.method.statistic, run.stride, run.offset, on_ready=ready)
    try:
        outputs = lockstep.run(
            [lambda h=h, c=c: run_layer(layer, h, c) for h, c in zip(hidden, calls, strict=True)]
        )
    finally:
        hooks.remove()
    missing = [t.name for t in targets if t.name not in done]
    if missing:
        raise UsageError(f"never called during the forward pass: {', '.join(missing)}")
    return outputs


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
    method = METHODS[options.method]
    structured = options.pattern_spec.structured
    plan = None if structured else plan_targets(model, options)
    rows = calibration_rows(calibration)
    total_tokens = sum(row.numel() for row in rows)
    batches = calibration_batches(rows, options.batch_size)  # the same batches for any number of processes
    share = comm.share(len(batches), len(rows))
    offset = sum(batch.numel() for batch in batches[: share.start])  # index of this process's first token
    batches = batches[share]
    stride = max(1, total_tokens // options.error_tokens)
    was_training = model.training
    model.eval()
    layers_from = layers_from or LayerSource()
    activations = activations or ActivationStore()
    report = PruneReport(options.method, options.pattern, options.target_sparsity)
    blocks = None
    if structured:
        if type(layers_from) is not LayerSource or checkpoint is not None:
            raise UsageError("structured pruning does not stream layers or checkpoint them yet")
        report.parameters_before = decoder_parameters(model)
        report.removed_layers, blocks = prepare_structured(model, options, batches, comm)
        plan = structured_targets(model, blocks)
    _, layers = decoder_layers(model)
    layers_from.load_outside(head=False)
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    captured = capture_layer_inputs(model, layers, batches)  # every layer's call arguments, even if resuming
    layers_from.release_outside()
    for batch in captured.hidden:
        _check_finite(batch, "the embeddings' output")
    first = 0
    restored = None
    if checkpoint is not None:
        restored = checkpoint.restore(layers, device, lambda i, w: layers_from.restore(i, layers[i], w))
    if restored is not None:
        first, captured.hidden, finished = restored
        report.layers.extend(finished)
    hidden = activations.start(captured.hidden)
    captured.hidden = []  # the store holds them now
    if progress is not None:
        progress(first, len(layers))
    run = _Run(method, stride, offset, report, comm, blocks)
    for index in range(first, len(layers)):
        layer, targets, calls = layers[index], plan[index], captured.calls[index]
        layers_from.load(index, layer)
        what = f"the outputs of decoder layer {index}"
        if targets and options.true_sequential:
            outputs = _prune_in_one_pass(layer, list(hidden), calls, targets, run)
        else:
            if targets:
                layer = layers[index] = _prune_from_dense_pass(layer, hidden, calls, targets, run)
            outputs = (run_layer(layer, h, c) for h, c in zip(hidden, calls, strict=True))
        hidden = activations.keep(_checked(batch, what) for batch in outputs)
        if checkpoint is not None:
            checkpoint.save(index, layer, list(hidden), report.layers)
        layers_from.finish(index, layer)
        if progress is not None:
            progress(index + 1, len(layers))

    if structured:
        report.parameters_after = decoder_parameters(model)
        if blocks is not None:
            _update_config(model.config, blocks.config)
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return report
