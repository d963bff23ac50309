"""The structured step: what the walk runs to remove units, and the dense scoring passes before it.

Before the walk (``StructuredStep.prepare``) the parameter budget is split, whole layers go by block
influence (ShortGPT, arXiv 2403.03853: one dense pass, ``LayerInfluence``), and each layer's units to
remove are planned: the same in every layer, or (``widths="adaptive"``) from FLAP's global ranking of the
units' scores on the dense model (one more dense pass, ``UnitStatistics``). During the walk each decoder
layer with units to remove is replaced by a smaller one (``removal.UnitRemoval``), built from the
statistics of its consumers' inputs (o_proj, down_proj) on the outputs of the already pruned layers.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.config import PruneOptions
from llmprune.models.architecture import decoder_layers
from llmprune.pipeline.distributed import Communicator
from llmprune.pipeline.offload import LayerSource
from llmprune.pipeline.report import PruneReport
from llmprune.pipeline.statistics import InputStatistics
from llmprune.pipeline.walk import LayerContext, WalkContext, walk_layers
from llmprune.structured.layout import UnitLayout, unit_layout
from llmprune.structured.removal import UnitRemoval, plan_adaptive, plan_widths


def decoder_parameters(model: nn.Module) -> int:
    _, layers = decoder_layers(model)
    return sum(p.numel() for p in layers.parameters())


class LayerInfluence:
    """Observes each layer's inputs and outputs: Σ of their cosine similarity, and the token count."""

    statistic = "none"
    timing = "observe"

    def __init__(self, layers: int) -> None:
        self.totals = torch.zeros(layers, 2, dtype=torch.float64)

    def targets(self, index: int, prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
        return {}

    def apply(self, layer: nn.Module, stats: dict[str, InputStatistics], context: LayerContext) -> nn.Module:
        for before, after in zip(context.inputs, context.outputs, strict=True):
            cosine = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
            self.totals[context.index, 0] += cosine.sum().item()
            self.totals[context.index, 1] += cosine.numel()
        return layer


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[torch.Tensor], comm: Communicator) -> list[float]:
    """Per decoder layer, 1 - mean cosine similarity of its input and output hidden states over the
    calibration tokens (ShortGPT's block influence: low means the layer changes little)."""
    _, layers = decoder_layers(model)
    step = LayerInfluence(len(layers))
    walk_layers(model, batches, [step], WalkContext(comm))
    comm.all_reduce(step.totals)
    return (1 - step.totals[:, 0] / step.totals[:, 1]).tolist()


class UnitStatistics:
    """Observes Σx² and Σx of the inputs of each layer's projections ``consumers`` (layer-relative)."""

    statistic = "moments"
    timing = "observe"

    def __init__(self, consumers: list[str]) -> None:
        self.consumers = consumers
        self.stats: list[dict[str, InputStatistics]] = []

    def targets(self, index: int, prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
        return {f"{prefix}.{name}": layer.get_submodule(name) for name in self.consumers}

    def apply(self, layer: nn.Module, stats: dict[str, InputStatistics], context: LayerContext) -> nn.Module:
        self.stats.append({name: stats[f"{context.prefix}.{name}"] for name in self.consumers})
        return layer


@torch.no_grad()
def consumer_statistics(
    model: nn.Module, consumers: list[str], batches: list[torch.Tensor], comm: Communicator
) -> list[dict[str, InputStatistics]]:
    """Per decoder layer, Σx² and Σx of the inputs of its projections ``consumers`` (layer-relative
    names), with every layer dense (FLAP scores the dense model)."""
    step = UnitStatistics(consumers)
    walk_layers(model, batches, [step], WalkContext(comm))
    return step.stats


def remove_layers(model: nn.Module, indices: list[int]) -> None:
    """Delete decoder layers in place, renumbering the rest and the config (count, per-layer types)."""
    path, layers = decoder_layers(model)
    gone = set(indices)
    kept = [layer for i, layer in enumerate(layers) if i not in gone]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, nn.ModuleList(kept))
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in gone]
    for field in ("num_hidden_layers", "n_layer"):
        if hasattr(config, field):
            setattr(config, field, len(kept))


def plan_removal(
    model: nn.Module, options: PruneOptions, batches: list[torch.Tensor], comm: Communicator
) -> tuple[list[int], UnitRemoval | None]:
    """Remove whole layers if asked (returns their original indices) and plan the per-layer removal."""
    units = options.units
    layout = unit_layout(model, units)  # fails fast on units the family does not support
    _, layers = decoder_layers(model)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    budget = options.target_sparsity * per_layer * len(layers)
    removed: list[int] = []
    if "layers" in units:
        share = budget / len(units)
        count = min(round(share / per_layer), len(layers) - 1)
        if count:
            influence = block_influence(model, batches, comm)
            removed = sorted(sorted(range(len(layers)), key=lambda i: (influence[i], i))[:count])
            remove_layers(model, removed)
        budget -= count * per_layer
    _, layers = decoder_layers(model)
    if layout is None or budget <= 0:
        return removed, None
    if options.widths == "adaptive":
        stats = consumer_statistics(model, _consumers(layout, units), batches, comm)
        plans = plan_adaptive(layers, model.config, layout, options, budget, stats)
    else:
        fraction = budget / (per_layer * len(layers))
        plans = [plan_widths(layers[0], model.config, layout, options, fraction)] * len(layers)
    if not any(plan.heads or plan.channels for plan in plans):
        return removed, None
    removal = UnitRemoval(model.config, layout, plans, options)
    for index, plan in enumerate(plans):
        if not (plan.heads or plan.channels):  # the walk leaves it alone: give it the others' biases now
            layers[index] = removal.rebuilt_unchanged(index, layers[index])
    return removed, removal


def _consumers(layout: UnitLayout, units: list[str]) -> list[str]:
    """The projections whose input columns are the units to remove."""
    return ([layout.attention[3]] if "heads" in units else []) + (
        [layout.mlp_output] if "channels" in units else []
    )


def update_config(config, pruned) -> None:
    """Copy the widths a structured run changed into the model's own config (shared by its modules)."""
    for field, value in pruned.to_dict().items():
        if getattr(config, field, None) != value:
            setattr(config, field, value)


class StructuredStep:
    """Structured pruning (``--pattern structured``): replaces each decoder layer with units to remove by a
    smaller one, built from the Gram matrix and sums of its consumers' inputs."""

    what = "structured pruning"
    streams = False
    """It keeps the whole model in memory: no streamed layers, no checkpoints (``pruning.PruningStep``)."""
    statistic = "hessian"
    timing = "after"

    @staticmethod
    def wanted(options: PruneOptions) -> bool:
        """``--pattern structured``."""
        return options.pattern_spec.structured

    def __init__(self, model: nn.Module, options: PruneOptions) -> None:
        self.options = options
        self.removal: UnitRemoval | None = None

    def prepare(
        self,
        model: nn.Module,
        batches: list[torch.Tensor],
        comm: Communicator,
        report: PruneReport,
        layers_from: LayerSource,
    ) -> None:
        """Remove whole layers, plan each layer's units (both from dense passes over the calibration data)."""
        report.parameters_before = decoder_parameters(model)
        report.removed_layers, self.removal = plan_removal(model, self.options, batches, comm)

    def targets(self, index: int, prefix: str, layer: nn.Module) -> dict[str, nn.Module] | None:
        if self.removal is None:
            return None
        names = self.removal.consumers(index)
        return {f"{prefix}.{name}": layer.get_submodule(name) for name in names} or None

    def apply(self, layer: nn.Module, stats: dict[str, InputStatistics], context: LayerContext) -> nn.Module:
        smaller, rows = self.removal(context.index, context.prefix, layer, stats)
        context.walk.rows.extend(rows)
        return smaller

    def finish(self, model: nn.Module, report: PruneReport) -> None:
        """Count the parameters left; give the model's config the new widths."""
        report.parameters_after = decoder_parameters(model)
        if self.removal is not None:
            update_config(model.config, self.removal.config)
