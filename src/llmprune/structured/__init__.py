"""Structured pruning: whole attention heads, MLP channels and decoder layers, for a model that is actually
smaller. ``prepare`` splits the parameter budget, removes whole layers by block influence (ShortGPT, arXiv
2403.03853) and returns the per-layer step (``blocks.StructuredBlocks``) that the sequential driver runs.

Budget: ``sparsity`` is the fraction of the decoder layers' parameters removed. With layers and widths
both requested, each kind of unit takes an equal share. With uniform widths (the default), every layer
loses the same units, heads and channels removing the same fraction of the attention's and of the MLP's
parameters; with ``widths="adaptive"`` one dense scoring pass measures every layer's units and a global
ranking (FLAP's, ``allocate.py``) decides how many each layer loses before the sequential driver runs.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.config import PruneOptions
from llmprune.models.architecture import decoder_layers
from llmprune.pipeline.capture import capture_layer_inputs, run_layer
from llmprune.pipeline.distributed import Communicator
from llmprune.structured.blocks import StructuredBlocks, plan_adaptive, plan_widths
from llmprune.structured.layout import BlockLayout, block_layout
from llmprune.structured.scores import ColumnStatistics


def decoder_parameters(model: nn.Module) -> int:
    _, layers = decoder_layers(model)
    return sum(p.numel() for p in layers.parameters())


def _dense_pass(model: nn.Module, batches: list[torch.Tensor]):
    """Run the calibration batches through every decoder layer in turn; yields each layer's index, its
    inputs and its outputs (one list of hidden states per batch)."""
    _, layers = decoder_layers(model)
    captured = capture_layer_inputs(model, layers, batches)
    hidden = captured.hidden
    for index, layer in enumerate(layers):
        outputs = [run_layer(layer, h, c) for h, c in zip(hidden, captured.calls[index], strict=True)]
        yield index, hidden, outputs
        hidden = outputs


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[torch.Tensor], comm: Communicator) -> list[float]:
    """Per decoder layer, 1 - mean cosine similarity of its input and output hidden states over the
    calibration tokens (ShortGPT's block influence: low means the layer changes little)."""
    _, layers = decoder_layers(model)
    totals = torch.zeros(len(layers), 2, dtype=torch.float64)
    for index, inputs, outputs in _dense_pass(model, batches):
        for before, after in zip(inputs, outputs, strict=True):
            cosine = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
            totals[index, 0] += cosine.sum().item()
            totals[index, 1] += cosine.numel()
    comm.all_reduce(totals)
    return (1 - totals[:, 0] / totals[:, 1]).tolist()


@torch.no_grad()
def consumer_statistics(
    model: nn.Module, consumers: list[str], batches: list[torch.Tensor], comm: Communicator
) -> list[dict[str, ColumnStatistics]]:
    """Per decoder layer, the column statistics of the inputs of its projections ``consumers``
    (layer-relative names), with every layer dense (FLAP scores the dense model)."""
    _, layers = decoder_layers(model)
    stats: list[dict[str, ColumnStatistics]] = [{} for _ in layers]
    handles = []

    def hook(index: int, name: str):
        def pre_forward(_module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if name not in stats[index]:
                stats[index][name] = ColumnStatistics(inputs.shape[-1], inputs.device)
            stats[index][name].update(inputs)

        return pre_forward

    try:
        for index, layer in enumerate(layers):
            for name in consumers:
                handles.append(layer.get_submodule(name).register_forward_pre_hook(hook(index, name)))
        for _ in _dense_pass(model, batches):
            pass
    finally:
        for handle in handles:
            handle.remove()
    for per_layer in stats:
        for column in per_layer.values():
            comm.all_reduce(column.energy)
            comm.all_reduce(column.sums)
            tokens = torch.tensor([column.tokens], dtype=torch.int64, device=column.energy.device)
            comm.all_reduce(tokens)
            column.tokens = int(tokens)
    return stats


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
    if options.widths == "adaptive":
        stats = consumer_statistics(model, _consumers(layout, units), batches, comm)
        plans = plan_adaptive(layers, model.config, layout, options, budget, stats)
    else:
        fraction = budget / (per_layer * len(layers))
        plans = [plan_widths(layers[0], model.config, layout, options, fraction)] * len(layers)
    if not any(plan.heads or plan.channels for plan in plans):
        return removed, None
    blocks = StructuredBlocks(model.config, layout, plans, options)
    for index, plan in enumerate(plans):
        if not (plan.heads or plan.channels):  # the driver leaves it alone: give it the others' biases now
            layers[index] = blocks.rebuilt_unchanged(index, layers[index])
    return removed, blocks


def _consumers(layout: BlockLayout, units: list[str]) -> list[str]:
    """The projections whose input columns are the units to remove."""
    return ([layout.attention[3]] if "heads" in units else []) + (
        [layout.mlp_output] if "channels" in units else []
    )
