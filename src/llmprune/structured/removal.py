"""Removing attention heads and MLP channels from each decoder layer, for the structured step.

By default every decoder layer loses the same number of units (so one config describes the result and
plain ``from_pretrained`` loads it); with ``--widths adaptive`` each layer has its own ``WidthPlan``
(``plan_adaptive``, the rule in ``allocate.py``) and the saved model records its per-layer widths
(``checkpoint.py``). For layer i the walk collects the Gram matrix and sums of the inputs of the
consuming projections (o_proj, down_proj) while the dense layer runs on the outputs of the already pruned
layers before it (``step.StructuredStep``); ``UnitRemoval`` then scores the units, keeps the best, slices
q/k/v/o and gate/up/down, re-fits the consumers (``reconstruct.py``) and builds the smaller layer from its
config (``build_layer``, also used to rebuild a saved model's layers).

Grouped-query attention: in ``queries`` mode each key/value group loses the same number of query heads
(so every group keeps serving the same number of them, as transformers requires); in ``groups`` mode
whole key/value groups go with all their query heads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.config import PruneOptions
from llmprune.errors import UsageError
from llmprune.models.architecture import read_weight, stored_layout
from llmprune.pipeline.report import LinearReport
from llmprune.pipeline.statistics import InputStatistics
from llmprune.structured.allocate import Steps, allocate, channel_steps, head_steps, standardize
from llmprune.structured.layout import UnitLayout
from llmprune.structured.reconstruct import least_squares_refit, mean_compensation
from llmprune.structured.scores import column_scores, keep_highest, unit_scores


@dataclass(frozen=True)
class Attention:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class WidthPlan:
    """How many units a decoder layer loses."""

    heads: int = 0
    """Query heads removed per key/value group (``queries`` mode) or key/value groups (``groups`` mode)."""
    channels: int = 0
    head_mode: str = "queries"


def attention_shape(config) -> Attention:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Attention(heads, kv_heads, head_dim)


def _stored(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An ``[out, in]`` weight in the module's own layout and dtype."""
    return stored_layout(module, weight).to(module.weight.dtype).contiguous()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unit_costs(layer: nn.Module, config, layout: UnitLayout, head_mode: str) -> tuple[float, float]:
    """Parameters of ``layer`` removed by one head step (one query head per key/value group, or one
    whole group with its query heads) and by one MLP channel: producer rows (and their biases) plus
    consumer columns."""

    def row(name: str) -> int:  # one output row of a producer, with its bias
        module = layer.get_submodule(name)
        return read_weight(module).shape[1] + (getattr(module, "bias", None) is not None)

    def column(name: str) -> int:  # one input column of a consumer
        return read_weight(layer.get_submodule(name)).shape[0]

    per_channel = sum(row(name) for name in layout.mlp_inputs) + column(layout.mlp_output)
    if layout.attention is None:
        return 0.0, per_channel
    q, k, v, o = layout.attention
    shape = attention_shape(config)
    query_head = shape.head_dim * (row(q) + column(o))
    if head_mode == "queries":
        return shape.kv_heads * query_head, per_channel
    return shape.per_group * query_head + shape.head_dim * (row(k) + row(v)), per_channel


def plan_widths(
    layer: nn.Module, config, layout: UnitLayout, options: PruneOptions, fraction: float
) -> WidthPlan:
    """Units to remove from each layer so that ``fraction`` of its parameters go, the same fraction from
    attention and from the MLP when both kinds are removed (heads come in coarse steps; channels absorb
    the rounding)."""
    units = [u for u in options.units if u != "layers"]
    mlp = sum(_params(layer.get_submodule(p)) for p in (*layout.mlp_inputs, layout.mlp_output))
    width = read_weight(layer.get_submodule(layout.mlp_output)).shape[1]
    step, per_channel = unit_costs(layer, config, layout, options.head_mode)
    budget = fraction * sum(p.numel() for p in layer.parameters())
    heads = 0
    if "heads" in units:
        shape = attention_shape(config)
        attention = sum(_params(layer.get_submodule(p)) for p in layout.attention)
        share = budget * attention / (attention + (mlp if "channels" in units else 0))
        most = shape.per_group - 1 if options.head_mode == "queries" else shape.kv_heads - 1
        heads = min(round(share / step), most)
    channels = 0
    if "channels" in units:
        channels = min(max(round((budget - heads * step) / per_channel), 0), width - 1)
    return WidthPlan(heads, channels, options.head_mode)


def plan_adaptive(
    layers: nn.ModuleList,
    config,
    layout: UnitLayout,
    options: PruneOptions,
    budget: float,
    stats: list[dict[str, InputStatistics]],
) -> list[WidthPlan]:
    """Per-layer units to remove so that ``budget`` parameters go in all, from one ranking of every
    layer's units by their standardized scores (FLAP's rule, ``allocate.py``). ``stats[i]`` holds the
    column statistics of layer i's consumers' inputs (o_proj, down_proj), measured on the dense model."""
    units = [u for u in options.units if u != "layers"]
    steps: list[Steps] = []
    owners: list[tuple[int, str]] = []
    for index, layer in enumerate(layers):
        head_cost, channel_cost = unit_costs(layer, config, layout, options.head_mode)
        if "heads" in units:
            shape = attention_shape(config)
            attention = layout.attention
            columns = _scores(layer, attention[3], [attention[0]], options.unit_score, stats[index])
            heads = unit_scores(standardize(columns), shape.head_dim) / shape.head_dim  # mean z per head
            steps.append(Steps(head_steps(heads, shape.kv_heads, options.head_mode), head_cost))
            owners.append((index, "heads"))
        if "channels" in units:
            columns = _scores(layer, layout.mlp_output, layout.mlp_inputs, options.unit_score, stats[index])
            steps.append(Steps(channel_steps(standardize(columns)), channel_cost))
            owners.append((index, "channels"))
    counts = {owner: taken for owner, taken in zip(owners, allocate(steps, budget), strict=True)}
    return [
        WidthPlan(counts.get((i, "heads"), 0), counts.get((i, "channels"), 0), options.head_mode)
        for i in range(len(layers))
    ]


def _scores(
    layer: nn.Module, consumer: str, producers, score: str, stats: dict[str, InputStatistics]
) -> torch.Tensor:
    """Column scores of ``layer``'s projection ``consumer`` from its input statistics."""
    columns = stats[consumer]
    weights = [read_weight(layer.get_submodule(name)) for name in producers]
    module = layer.get_submodule(consumer)
    return column_scores(score, read_weight(module), columns.energy(), columns.sums, columns.tokens, weights)


def config_widths(config, layout: UnitLayout) -> dict[str, int]:
    """The widths ``config`` gives every decoder layer: MLP ``intermediate``, and query ``heads`` and
    ``kv_heads`` where heads can be removed (the per-layer record of an adaptive model, ``checkpoint.py``)."""
    widths = {"intermediate": getattr(config, layout.mlp_width, None) or 4 * config.hidden_size}  # GPT-2
    if layout.attention is not None:
        shape = attention_shape(config)
        widths.update(heads=shape.heads, kv_heads=shape.kv_heads)
    return widths


def widths_after(config, layout: UnitLayout, plan: WidthPlan) -> dict[str, int]:
    """A layer's widths once ``plan`` has removed its units."""
    widths = config_widths(config, layout)
    widths["intermediate"] -= plan.channels
    if plan.heads:
        shape = attention_shape(config)
        if plan.head_mode == "queries":
            widths["heads"] = shape.kv_heads * (shape.per_group - plan.heads)
        else:
            widths["kv_heads"] = shape.kv_heads - plan.heads
            widths["heads"] = widths["kv_heads"] * shape.per_group
    return widths


def config_with_widths(config, layout: UnitLayout, widths: dict[str, int]):
    """``config`` describing a decoder layer of the given widths (``config_widths``' keys)."""
    new = copy.deepcopy(config)
    if widths["intermediate"] != config_widths(config, layout)["intermediate"]:
        setattr(new, layout.mlp_width, widths["intermediate"])
    if "heads" in widths and (widths["heads"], widths["kv_heads"]) != (
        config.num_attention_heads,
        attention_shape(config).kv_heads,
    ):
        new.head_dim = attention_shape(config).head_dim  # it would otherwise be re-derived from hidden size
        new.num_attention_heads, new.num_key_value_heads = widths["heads"], widths["kv_heads"]
    return new


def config_after(config, layout: UnitLayout, plan: WidthPlan, use_bias: bool):
    """The config describing layers pruned by ``plan`` (widths, heads, explicit head size, biases)."""
    new = config_with_widths(config, layout, widths_after(config, layout, plan))
    if use_bias and layout.bias_flags:
        for flag in layout.bias_flags:
            setattr(new, flag, True)
    return new


def build_layer(layer: nn.Module, config, index: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new decoder layer of ``layer``'s class built from ``config``, holding ``state`` (biases the config
    adds start at zero), on ``layer``'s device and dtype; every tensor must fit."""
    parameter = next(layer.parameters())
    built = type(layer)(config, index).to(device=parameter.device, dtype=parameter.dtype)
    missing, unexpected = built.load_state_dict(_fill_missing(state, built), strict=False)
    if missing or unexpected:
        raise UsageError(f"decoder layer {index}: pruned weights do not fit ({missing or unexpected})")
    return built.eval()


class UnitRemoval:
    """What structured pruning does to each decoder layer: score, keep, slice, re-fit, rebuild."""

    def __init__(self, config, layout: UnitLayout, plans: list[WidthPlan], options: PruneOptions) -> None:
        self.layout, self.plans, self.options = layout, plans, options
        self.shape = attention_shape(config) if layout.attention else None
        # FLAP compensates removed units' mean output in the consumer's bias: give the family biases.
        self.use_bias = options.unit_score == "flap" and layout.bias_flags is not None
        self.configs = [config_after(config, layout, plan, self.use_bias) for plan in plans]
        uniform = all(plan == plans[0] for plan in plans)
        # The model's own config: the new widths when every layer has them; otherwise the dense widths
        # (each layer has its own, recorded when the model is saved: ``checkpoint.py``).
        keep = WidthPlan(head_mode=options.head_mode)
        self.config = self.configs[0] if uniform else config_after(config, layout, keep, self.use_bias)

    def consumers(self, index: int) -> list[str]:
        """Layer-relative names of the projections of layer ``index`` whose inputs must be measured (none
        when the layer keeps all its units)."""
        names = []
        if self.plans[index].heads:
            names.append(self.layout.attention[3])
        if self.plans[index].channels:
            names.append(self.layout.mlp_output)
        return names

    def rebuilt_unchanged(self, index: int, layer: nn.Module) -> nn.Module:
        """Layer ``index`` when its plan removes nothing: the same weights, with the biases that the
        pruned layers gain (FLAP compensation) at zero, so that all layers share one config's flags."""
        if not self.use_bias:
            return layer
        state = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
        return build_layer(layer, self.configs[index], index, state)

    def __call__(
        self, index: int, prefix: str, layer: nn.Module, stats: dict[str, InputStatistics]
    ) -> tuple[nn.Module, list[LinearReport]]:
        """Layer ``index`` with its units removed (a new module), and a report row per consumer."""
        plan = self.plans[index]
        state = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
        reports = []
        if plan.heads:
            consumer = stats[f"{prefix}.{self.layout.attention[3]}"]
            reports.append(self._heads(index, prefix, layer, state, consumer, plan))
        if plan.channels:
            consumer = stats[f"{prefix}.{self.layout.mlp_output}"]
            reports.append(self._channels(index, prefix, layer, state, consumer, plan))
        return build_layer(layer, self.configs[index], index, state), reports

    # --- attention heads -------------------------------------------------------------------------------

    def _heads(self, index, prefix, layer, state, stats, plan: WidthPlan) -> LinearReport:
        q_name, k_name, v_name, o_name = self.layout.attention
        shape = self.shape
        o = layer.get_submodule(o_name)
        q = layer.get_submodule(q_name)
        columns = self._scores(o, stats, [read_weight(q)])
        heads = unit_scores(columns, shape.head_dim)
        if plan.head_mode == "queries":
            grouped = heads.reshape(shape.kv_heads, shape.per_group)
            kept_heads = torch.cat(
                [g * shape.per_group + keep_highest(grouped[g], plan.heads) for g in range(shape.kv_heads)]
            )
            kept_groups = torch.arange(shape.kv_heads)
        else:
            kept_groups = keep_highest(heads.reshape(shape.kv_heads, -1).sum(dim=1), plan.heads)
            kept_heads = (kept_groups[:, None] * shape.per_group + torch.arange(shape.per_group)).flatten()
        dim = torch.arange(shape.head_dim)
        q_rows = (kept_heads[:, None] * shape.head_dim + dim).flatten()
        kv_rows = (kept_groups[:, None] * shape.head_dim + dim).flatten()
        for name, rows in ((q_name, q_rows), (k_name, kv_rows), (v_name, kv_rows)):
            _keep_rows(state, layer.get_submodule(name), name, rows)
        return self._consume(index, prefix, o, o_name, state, stats, q_rows)

    # --- MLP channels ----------------------------------------------------------------------------------

    def _channels(self, index, prefix, layer, state, stats, plan: WidthPlan) -> LinearReport:
        down = layer.get_submodule(self.layout.mlp_output)
        producers = [layer.get_submodule(name) for name in self.layout.mlp_inputs]
        columns = self._scores(down, stats, [read_weight(p) for p in producers])
        keep = keep_highest(columns, plan.channels)
        for name, module in zip(self.layout.mlp_inputs, producers, strict=True):
            _keep_rows(state, module, name, keep)
        return self._consume(index, prefix, down, self.layout.mlp_output, state, stats, keep)

    # --- shared ----------------------------------------------------------------------------------------

    def _scores(
        self, consumer: nn.Module, stats: InputStatistics, producers: list[torch.Tensor]
    ) -> torch.Tensor:
        energy = stats.energy()  # Σ x² per input (the stored upper triangle holds the diagonal)
        return column_scores(
            self.options.unit_score, read_weight(consumer), energy, stats.sums, stats.tokens, producers
        )

    def _consume(self, index, prefix, consumer, name, state, stats, keep) -> LinearReport:
        """Slice the consumer's input columns to ``keep``, re-fitting or compensating as configured."""
        weight = read_weight(consumer).float()
        bias = consumer.bias.data.float() if consumer.bias is not None else None
        has_bias = bias is not None or self.use_bias
        damp = None
        if self.options.refits:
            gram, sums, tokens = stats.gram_matrix(), stats.sums, stats.tokens
            refit = least_squares_refit(weight, bias, gram, sums, tokens, keep, has_bias, self.options.damp)
            new_weight, new_bias, damp = refit.weight, refit.bias, refit.damp
        else:
            new_weight = weight[:, keep]
            removed = torch.ones(weight.shape[1], dtype=torch.bool)
            removed[keep] = False
            flap = self.options.unit_score == "flap" and has_bias
            new_bias = mean_compensation(weight, bias, stats.sums, stats.tokens, removed) if flap else bias
        state[f"{name}.weight"] = _stored(consumer, new_weight)
        if new_bias is not None:
            state[f"{name}.bias"] = new_bias.to(consumer.weight.dtype)
        samples = stats.samples()
        dense = samples @ weight.t() + (0 if bias is None else bias)
        pruned = samples[:, keep] @ new_weight.t() + (0 if new_bias is None else new_bias)
        error = float(torch.linalg.norm(dense - pruned) / torch.linalg.norm(dense).clamp_min(1e-12))
        removed_fraction = 1 - len(keep) / weight.shape[1]
        return LinearReport(
            name=f"{prefix}.{name}",
            layer=index,
            shape=tuple(new_weight.shape),
            target_sparsity=removed_fraction,
            achieved_sparsity=removed_fraction,
            relative_error=error,
            damp=damp,
            damp_raised=damp is not None and damp > self.options.damp * (1 + 1e-9),
        )


def _keep_rows(state: dict[str, torch.Tensor], module: nn.Module, name: str, rows: torch.Tensor) -> None:
    """Keep output rows ``rows`` of a producer (its weight and bias) in ``state``."""
    state[f"{name}.weight"] = _stored(module, read_weight(module)[rows])
    if module.bias is not None:
        state[f"{name}.bias"] = module.bias.data[rows].clone()


def _fill_missing(state: dict[str, torch.Tensor], layer: nn.Module) -> dict[str, torch.Tensor]:
    """Biases the new config adds (FLAP compensation) that the dense layer did not have start at zero."""
    filled = dict(state)
    for name, tensor in layer.state_dict().items():
        if name not in filled and name.endswith(".bias"):
            filled[name] = torch.zeros_like(tensor)
    return filled
