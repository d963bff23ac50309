"""Structured pruning: whole attention heads, MLP channels and decoder layers, for a model that is actually
smaller. ``prepare`` splits the parameter budget, removes whole layers by block influence (ShortGPT, arXiv
2403.03853) and returns the per-layer step (``blocks.StructuredBlocks``) that the sequential driver runs.

Budget: ``sparsity`` is the fraction of the decoder layers' parameters removed. With layers and widths
both requested, each kind of unit takes an equal share; within a layer, heads and channels remove the same
fraction of the attention's and of the MLP's parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.config import PruneOptions
from llmprune.models.architecture import decoder_layers
from llmprune.pipeline.capture import capture_layer_inputs, run_layer
from llmprune.pipeline.distributed import Communicator
from llmprune.structured.blocks import StructuredBlocks, plan_widths
from llmprune.structured.layout import block_layout


def decoder_parameters(model: nn.Module) -> int:
    _, layers = decoder_layers(model)
    return sum(p.numel() for p in layers.parameters())


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[torch.Tensor], comm: Communicator) -> list[float]:
    """Per decoder layer, 1 - mean cosine similarity of its input and output hidden states over the
    calibration tokens (ShortGPT's block influence: low means the layer changes little)."""
    _, layers = decoder_layers(model)
    captured = capture_layer_inputs(model, layers, batches)
    hidden = captured.hidden
    totals = torch.zeros(len(layers), 2, dtype=torch.float64)
    for index, layer in enumerate(layers):
        outputs = [run_layer(layer, h, c) for h, c in zip(hidden, captured.calls[index], strict=True)]
        for before, after in zip(hidden, outputs, strict=True):
            cosine = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
            totals[index, 0] += cosine.sum().item()
            totals[index, 1] += cosine.numel()
        hidden = outputs
    comm.all_reduce(totals)
    return (1 - totals[:, 0] / totals[:, 1]).tolist()


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


def prepare(
    model: nn.Module, options: PruneOptions, batches: list[torch.Tensor], comm: Communicator
) -> tuple[list[int], StructuredBlocks | None]:
    """Remove whole layers if asked (returns their original indices) and plan the per-layer removal."""
    units = options.units
    layout = block_layout(model, units)  # fails fast on units the family does not support
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
    plan = plan_widths(layers[0], model.config, layout, options, budget / (per_layer * len(layers)))
    if not (plan.heads or plan.channels):
        return removed, None
    return removed, StructuredBlocks(model.config, layout, plan, options)
