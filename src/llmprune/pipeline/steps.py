"""The step that prunes the weights of linear layers (magnitude, Wanda, SparseGPT; unstructured or N:M).

For each decoder layer, ``LinearStep`` prunes the linear layers the options select from the statistics of
their inputs, with the outputs of the already pruned layers before it (``timing="after"``), or, with
``true_sequential``, each linear layer just before it runs, from the inputs it actually receives
(``timing="during"``), so that one forward pass per layer does both jobs.

Across processes (``torchrun``) each group of linear layers is solved by one process, which broadcasts the
result (see ``pipeline/distributed.py``).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.config import PruneOptions
from llmprune.errors import UsageError
from llmprune.methods import METHODS, LayerTask, Method, PruneOutcome, refine
from llmprune.methods.owl import owl_sparsities
from llmprune.models.architecture import (
    check_pattern_fits,
    linear_layers,
    read_weight,
    selects,
    write_weight,
)
from llmprune.pipeline.distributed import Communicator
from llmprune.pipeline.offload import LayerSource
from llmprune.pipeline.owl import outlier_ratios
from llmprune.pipeline.report import LinearReport, PruneReport
from llmprune.pipeline.statistics import InputStatistics, error_from_terms, error_terms
from llmprune.pipeline.walk import LayerContext, Timing, check_finite


@dataclass
class Target:
    """One linear layer to prune and how."""

    name: str
    layer: int
    """Index of the decoder layer holding it."""
    module: nn.Module
    task: LayerTask
    scheduled: bool = True
    """Its sparsity is its decoder layer's (not set by a ``layer_sparsity`` override)."""


def layer_sparsities(options: PruneOptions, num_layers: int) -> list[float]:
    """Sparsity of each decoder layer: uniform, or rising linearly with depth around the same mean (owl:
    uniform until ``LinearStep.prepare`` has scored the dense model)."""
    mean = options.target_sparsity
    if options.schedule in ("uniform", "owl") or num_layers == 1:
        return [mean] * num_layers
    spread = options.schedule_spread
    return [mean - spread + 2 * spread * i / (num_layers - 1) for i in range(num_layers)]


def plan_targets(
    model: nn.Module, options: PruneOptions, sparsities: list[float] | None = None
) -> list[list[Target]]:
    """The linear layers to prune in each decoder layer, with their tasks; validates shapes first.

    ``sparsities``: each decoder layer's sparsity (default: from the options' schedule); per-layer
    overrides (``layer_sparsity``) still win."""
    pattern = options.pattern_spec
    candidates = linear_layers(model)
    _check_selection([name for modules in candidates for name in modules], options)
    selected = [
        {name: module for name, module in modules.items() if selects(name, options.include, options.exclude)}
        for modules in candidates
    ]
    check_pattern_fits({name: module for modules in selected for name, module in modules.items()}, pattern)
    sparsities = sparsities or layer_sparsities(options, len(candidates))
    overrides = [(re.compile(regex), value) for regex, value in options.layer_sparsity.items()]
    plan = []
    for index, modules in enumerate(selected):
        targets = []
        for name, module in modules.items():
            override = next((value for regex, value in overrides if regex.search(name)), None)
            sparsity = sparsities[index] if override is None else override
            task = LayerTask(sparsity, pattern, options.blocksize, options.damp, options.magnitude_scope)
            targets.append(Target(name, index, module, task, override is None))
        plan.append(targets)
    return plan


def _check_selection(names: list[str], options: PruneOptions) -> None:
    """Every --include/--exclude glob and --layer-sparsity regex must select some of the linear layers
    ``names``: a typo would otherwise be ignored without a word, and the wrong layers pruned, or pruned at
    the wrong sparsity."""
    example = f" (their names look like {names[0]})" if names else ""
    for flag, globs in (("--include", options.include), ("--exclude", options.exclude)):
        for glob in globs:
            if not any(fnmatch.fnmatchcase(name, glob) for name in names):
                raise UsageError(f"{flag} {glob!r} matches no linear layer{example}")
    pruned = [name for name in names if selects(name, options.include, options.exclude)]
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


@dataclass(frozen=True)
class Refinement:
    """What ``--refine`` does to each linear layer after the method (``methods/refine.py``)."""

    steps: tuple[str, ...] = ()
    """``swaps`` and/or ``resolve`` (both: resolve, swaps, resolve)."""
    iterations: int = 20
    swap_rounds: int = 100

    @classmethod
    def of(cls, options: PruneOptions) -> Refinement:
        return cls(tuple(options.refine), options.refine_iterations, options.swap_rounds)


@dataclass
class Refined:
    """A linear layer's refinement: errors over every calibration token before and after, swaps made."""

    before: float
    after: float
    swaps: int | None


def _hessian(stats: InputStatistics) -> torch.Tensor:
    """The Hessian (2/N) Σ x xᵀ of an input, computed once and shared by the layers that read it."""
    if "hessian" not in stats.prepared:
        stats.prepared["hessian"] = stats.statistic()
        stats.gram = None  # the matrix above replaces the float64 sums
    return stats.prepared["hessian"]


def _method_statistic(method: Method, stats: InputStatistics) -> torch.Tensor | None:
    """The statistic ``method`` reads, also when a refinement made the walk collect the Hessian."""
    if method.statistic == "hessian":
        return _hessian(stats)
    if method.statistic == "input_norms":
        return stats.energy()  # Σx², also the Hessian's diagonal sums
    return None


def _refine(
    dense: torch.Tensor, outcome: PruneOutcome, hessian: torch.Tensor, task: LayerTask, how: Refinement
) -> tuple[PruneOutcome, Refined]:
    """``how``'s steps on one layer's outcome, from the dense weights and the input's Hessian."""
    weight, mask, swaps, damp = outcome.weight, outcome.mask, None, outcome.damp
    before = refine.layer_error(dense, weight, hessian)

    def resolve(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
        solved = refine.resolve_weights(dense, weight, mask, hessian, how.iterations, task.damp)
        return solved.weight, solved.damp if damp is None else max(damp, solved.damp)

    # With both: re-solve first, so that swaps weigh each exchange against the best kept weights, then
    # re-solve the new support.
    if "resolve" in how.steps and "swaps" in how.steps:
        weight, damp = resolve(weight)
    if "swaps" in how.steps:
        swapped = refine.swap_mask(dense, weight, mask, hessian, task.pattern, how.swap_rounds)
        weight, mask, swaps = swapped.weight, swapped.mask, swapped.swaps
    if "resolve" in how.steps:
        weight, damp = resolve(weight)
    after = refine.layer_error(dense, weight, hessian)
    return PruneOutcome(weight, mask, damp), Refined(before, after, swaps)


def _solve(
    targets: list[Target], method: Method, stats: InputStatistics, how: Refinement
) -> tuple[list[torch.Tensor], list[PruneOutcome], list[Refined | None]]:
    """The dense fp32 weights of linear layers sharing one input, the outcomes of the method and of the
    refinement for them, and what the refinement did to each."""
    dense = [read_weight(t.module).to(torch.float32, copy=True) for t in targets]
    for target, weight in zip(targets, dense, strict=True):
        check_finite(weight, f"weights of {target.name}")
    key = (method.name, targets[0].task.damp)  # damping is the only task field a preparation reads
    if key not in stats.prepared:
        if how.steps:
            statistic = _method_statistic(method, stats)
        else:
            statistic = stats.statistic()
            stats.gram = None  # the Hessian above replaces it; freed before the factorisation needs memory
        stats.prepared[key] = method.prepare(statistic, targets[0].task)
        del statistic
    outcomes = method.prune(dense, stats.prepared[key], [t.task for t in targets])
    if not how.steps:
        return dense, outcomes, [None] * len(targets)
    hessian = _hessian(stats)
    refined = [
        _refine(weight, outcome, hessian, target.task, how)
        for weight, outcome, target in zip(dense, outcomes, targets, strict=True)
    ]
    return dense, [outcome for outcome, _ in refined], [what for _, what in refined]


def prune_groups(
    groups: list[list[Target]],
    method: Method,
    stats: list[InputStatistics],
    comm: Communicator,
    first_owner: int = 0,
    how: Refinement = Refinement(),
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
        solved = {g: _solve(groups[g], method, stats[g], how) for g in turn if owners[g] == comm.rank}
        for g in turn:
            targets, device = groups[g], stats[g].device
            # Per layer: damping used, error before and after refinement, swaps (NaN: none).
            facts = torch.full((len(targets), 4), math.nan, dtype=torch.float64)
            if g in solved:
                dense, outcomes, refined = solved.pop(g)
                for k, (target, outcome, what) in enumerate(zip(targets, outcomes, refined, strict=True)):
                    write_weight(target.module, outcome.weight)
                    facts[k, 0] = math.nan if outcome.damp is None else outcome.damp
                    if what is not None:
                        facts[k, 1:3] = torch.tensor([what.before, what.after], dtype=torch.float64)
                        facts[k, 3] = math.nan if what.swaps is None else what.swaps
            else:
                dense = [read_weight(t.module).to(torch.float32, copy=True) for t in targets]
            if comm.world_size > 1:
                for target in targets:
                    comm.broadcast(target.module.weight.data, owners[g])
                facts = facts.to(device)
                comm.broadcast(facts, owners[g])
            samples = stats[g].sample_batches()
            for target, weight, row in zip(targets, dense, facts.tolist(), strict=True):
                damp, before, after, swaps = (None if math.isnan(value) else value for value in row)
                stored = read_weight(target.module)
                terms.append(error_terms(weight, stored.float(), samples))
                reports.append(
                    LinearReport(
                        name=target.name,
                        layer=target.layer,
                        shape=tuple(weight.shape),
                        target_sparsity=target.task.sparsity,
                        achieved_sparsity=1.0 - int(torch.count_nonzero(stored)) / stored.numel(),
                        relative_error=0.0,  # below, once every process's terms are summed
                        damp=damp,
                        damp_raised=damp is not None and damp > target.task.damp * (1 + 1e-9),
                        refined_from=before,
                        refined_to=after,
                        swaps=None if swaps is None else int(swaps),
                    )
                )
    totals = torch.stack(terms)
    comm.all_reduce(totals)
    for report, total in zip(reports, totals, strict=True):
        report.relative_error = error_from_terms(total)
    return reports


class LinearStep:
    """Prunes the selected linear layers of each decoder layer with a method (``PruneOptions.method``)."""

    what = "pruning"
    streams = True
    """It may stream layers and checkpoint them (``pruning.PruningStep``)."""

    @staticmethod
    def wanted(options: PruneOptions) -> bool:
        """Unstructured and N:M patterns."""
        return not options.pattern_spec.structured

    def __init__(self, model: nn.Module, options: PruneOptions) -> None:
        self.method = METHODS[options.method]
        self.options = options
        self.plan = plan_targets(model, options)
        self.refinement = Refinement.of(options)
        # A refinement works on the Hessian, whatever the method reads.
        self.statistic = "hessian" if self.refinement.steps else self.method.statistic
        self.timing: Timing = "during" if options.true_sequential else "after"
        self._by_name = {target.name: target for targets in self.plan for target in targets}

    def prepare(
        self,
        model: nn.Module,
        batches: list[torch.Tensor],
        comm: Communicator,
        report: PruneReport,
        layers_from: LayerSource,
    ) -> None:
        """``--schedule owl``: score the dense model once and give each decoder layer its sparsity."""
        options = self.options
        if options.schedule == "depth":
            report.layer_sparsities = layer_sparsities(options, len(self.plan))
        if options.schedule != "owl":
            return
        modules = [{target.name: target.module for target in targets} for targets in self.plan]
        ratios = outlier_ratios(model, batches, comm, modules, options.owl_threshold, layers_from)
        # The mean is over the weights the schedule sets: per-layer overrides keep their own sparsity.
        sizes = [sum(t.module.weight.numel() for t in targets if t.scheduled) for targets in self.plan]
        sparsities = owl_sparsities(ratios, options.target_sparsity, options.owl_lambda, sizes)
        self.plan = plan_targets(model, options, sparsities)
        self._by_name = {target.name: target for targets in self.plan for target in targets}
        report.outlier_ratios, report.layer_sparsities = ratios, sparsities

    def finish(self, model: nn.Module, report: PruneReport) -> None:
        """Nothing to do after the walk."""

    def targets(self, index: int, prefix: str, layer: nn.Module) -> dict[str, nn.Module] | None:
        return {target.name: target.module for target in self.plan[index]} or None

    def apply(self, layer: nn.Module, stats: dict[str, InputStatistics], context: LayerContext) -> nn.Module:
        comm, targets = context.walk.comm, self.plan[context.index]
        if self.timing == "during":  # one target, as it is reached; each solved by the next process
            name = next(iter(stats))
            groups, group_stats, first_owner = [[self._by_name[name]]], [stats[name]], context.position
            names = [name]
        else:
            # Layers reading the same input with the same settings are pruned in one call (SparseGPT: one
            # solve).
            by_key: dict[tuple, list[Target]] = {}
            for target in targets:
                task = target.task
                key = (id(stats[target.name]), task.damp, task.blocksize, task.pattern)
                by_key.setdefault(key, []).append(target)
            groups, first_owner = list(by_key.values()), 0
            group_stats = [stats[group[0].name] for group in groups]
            names = [target.name for target in targets]
        solved = prune_groups(groups, self.method, group_stats, comm, first_owner, self.refinement)
        rows = {row.name: row for row in solved}
        context.walk.rows.extend(rows[name] for name in names)
        return layer
