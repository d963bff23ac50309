"""OWL's dense scoring pass (Yin et al., arXiv 2310.05175, §3): one walk over the unpruned model measuring
each decoder layer's outlier ratio from the Wanda scores of the linear layers to be pruned
(``methods.owl.outlier_ratio``); ``methods.owl.owl_sparsities`` turns the ratios into per-layer sparsities.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmprune.methods.owl import outlier_ratio
from llmprune.models.architecture import decoder_layers, read_weight
from llmprune.pipeline.distributed import Communicator
from llmprune.pipeline.offload import LayerSource
from llmprune.pipeline.statistics import InputStatistics
from llmprune.pipeline.walk import LayerContext, WalkContext, walk_layers


class OutlierScores:
    """Observes Σx² of the inputs of each decoder layer's linear layers in ``plan`` (per decoder layer:
    full dotted name → module) and records the layer's outlier ratio; the layer stays dense."""

    statistic = "input_norms"
    timing = "observe"

    def __init__(self, plan: list[dict[str, nn.Module]], threshold: float) -> None:
        self.plan, self.threshold = plan, threshold
        self.ratios = [math.nan] * len(plan)

    def targets(self, index: int, prefix: str, layer: nn.Module) -> dict[str, nn.Module] | None:
        return self.plan[index] or None  # nothing to score: the walk just runs the layer

    def apply(self, layer: nn.Module, stats: dict[str, InputStatistics], context: LayerContext) -> nn.Module:
        names = list(self.plan[context.index])
        weights = [read_weight(self.plan[context.index][name]) for name in names]
        norms = [stats[name].energy() for name in names]  # already summed over processes
        self.ratios[context.index] = outlier_ratio(weights, norms, self.threshold)
        return layer


@torch.no_grad()
def outlier_ratios(
    model: nn.Module,
    batches: list[torch.Tensor],
    comm: Communicator,
    plan: list[dict[str, nn.Module]],
    threshold: float,
    layers_from: LayerSource | None = None,
) -> list[float]:
    """Per decoder layer, the share of the Wanda scores of its linear layers in ``plan`` above ``threshold``
    × their mean, on the dense model (one walk; NaN for a layer with nothing in ``plan``). The same on
    every process (the statistics are summed over processes before the ratios are computed)."""
    layers = len(decoder_layers(model)[1])
    if len(plan) != layers:
        raise ValueError(f"the plan has {len(plan)} decoder layers, the model {layers}")
    step = OutlierScores(plan, threshold)
    walk_layers(model, batches, [step], WalkContext(comm), layers_from=layers_from)
    return step.ratios

