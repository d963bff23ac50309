"""Removing attention heads and MLP channels from each decoder layer, for the sequential driver.

Every decoder layer loses the same number of units (so one config describes the result and plain
``from_pretrained`` loads it). For layer i the driver collects the Gram matrix and sums of the inputs of
the consuming projections (o_proj, down_proj) while the dense layer runs on the outputs of the already
pruned layers before it; ``StructuredBlocks`` then scores the units, keeps the best, slices q/k/v/o and
gate/up/down, re-fits the consumers (``reconstruct.py``) and builds the smaller layer from the new config.

Grouped-query attention: in ``queries`` mode each key/value group loses the same number of query heads
(so every group keeps serving the same number of them, as transformers requires); in ``groups`` mode
whole key/value groups go with all their query heads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmprune.config import PruneOptions
from llmprune.errors import UsageError
from llmprune.models.architecture import read_weight
from llmprune.pipeline.report import LinearReport
from llmprune.pipeline.statistics import InputStatistics
from llmprune.structured.layout import BlockLayout
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
    """How many units every decoder layer loses."""

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
    weight = weight.t() if isinstance(module, Conv1D) else weight
    return weight.to(module.weight.dtype).contiguous()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan_widths(
    layer: nn.Module, config, layout: BlockLayout, options: PruneOptions, fraction: float
) -> WidthPlan:
    """Units to remove from each layer so that ``fraction`` of its parameters go, the same fraction from
    attention and from the MLP when both kinds are removed (heads come in coarse steps; channels absorb
    the rounding)."""
    units = [u for u in options.units if u != "layers"]
    mlp = sum(_params(layer.get_submodule(p)) for p in (*layout.mlp_inputs, layout.mlp_output))
    width = read_weight(layer.get_submodule(layout.mlp_output)).shape[1]
    per_channel = mlp / width
    budget = fraction * sum(p.numel() for p in layer.parameters())
    heads = 0
    removed_by_heads = 0.0
    if "heads" in units:
        shape = attention_shape(config)
        attention = sum(_params(layer.get_submodule(p)) for p in layout.attention)
        share = budget * attention / (attention + (mlp if "channels" in units else 0))
        if options.head_mode == "queries":
            q, o = (layer.get_submodule(p) for p in (layout.attention[0], layout.attention[3]))
            step = (_params(q) + _params(o)) / shape.heads * shape.kv_heads  # one query head per group
            heads = min(round(share / step), shape.per_group - 1)
        else:
            step = attention / shape.kv_heads  # one key/value group and its query heads
            heads = min(round(share / step), shape.kv_heads - 1)
        removed_by_heads = heads * step
    channels = 0
    if "channels" in units:
        channels = min(max(round((budget - removed_by_heads) / per_channel), 0), width - 1)
    return WidthPlan(heads, channels, options.head_mode)


def config_after(config, layout: BlockLayout, plan: WidthPlan, use_bias: bool):
    """The config describing layers pruned by ``plan`` (widths, heads, explicit head size, biases)."""
    new = copy.deepcopy(config)
    if plan.channels:
        width = getattr(config, layout.mlp_width, None) or 4 * config.hidden_size  # GPT-2: n_inner=None
        setattr(new, layout.mlp_width, width - plan.channels)
    if plan.heads:
        shape = attention_shape(config)
        if plan.head_mode == "queries":
            new.num_attention_heads = shape.kv_heads * (shape.per_group - plan.heads)
        else:
            new.num_key_value_heads = shape.kv_heads - plan.heads
            new.num_attention_heads = new.num_key_value_heads * shape.per_group
        new.head_dim = shape.head_dim  # it would otherwise be re-derived from hidden_size / heads
    if use_bias and layout.bias_flags:
        for flag in layout.bias_flags:
            setattr(new, flag, True)
    return new


class StructuredBlocks:
    """The per-layer step of structured pruning: score, keep, slice, re-fit, rebuild."""

    def __init__(self, config, layout: BlockLayout, plan: WidthPlan, options: PruneOptions) -> None:
        self.layout, self.plan, self.options = layout, plan, options
        self.shape = attention_shape(config) if layout.attention else None
        # FLAP compensates removed units' mean output in the consumer's bias: give the family biases.
        self.use_bias = options.score == "flap" and layout.bias_flags is not None
        self.config = config_after(config, layout, plan, self.use_bias)

    def consumers(self) -> list[str]:
        """Layer-relative names of the projections whose inputs the statistics pass must see."""
        names = []
        if self.plan.heads:
            names.append(self.layout.attention[3])
        if self.plan.channels:
            names.append(self.layout.mlp_output)
        return names

    def __call__(
        self, index: int, prefix: str, layer: nn.Module, stats: dict[str, InputStatistics]
    ) -> tuple[nn.Module, list[LinearReport]]:
        """Layer ``index`` with its units removed (a new module), and a report row per consumer."""
        state = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
        reports = []
        if self.plan.heads:
            consumer = stats[f"{prefix}.{self.layout.attention[3]}"]
            reports.append(self._heads(index, prefix, layer, state, consumer))
        if self.plan.channels:
            consumer = stats[f"{prefix}.{self.layout.mlp_output}"]
            reports.append(self._channels(index, prefix, layer, state, consumer))
        parameter = next(layer.parameters())
        pruned = type(layer)(self.config, index).to(device=parameter.device, dtype=parameter.dtype)
        missing, unexpected = pruned.load_state_dict(_fill_missing(state, pruned), strict=False)
        if missing or unexpected:
            raise UsageError(f"decoder layer {index}: pruned weights do not fit ({missing or unexpected})")
        return pruned.eval(), reports

    # --- attention heads -------------------------------------------------------------------------------

    def _heads(self, index, prefix, layer, state, stats) -> LinearReport:
        q_name, k_name, v_name, o_name = self.layout.attention
        shape, plan = self.shape, self.plan
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

    def _channels(self, index, prefix, layer, state, stats) -> LinearReport:
        down = layer.get_submodule(self.layout.mlp_output)
        producers = [layer.get_submodule(name) for name in self.layout.mlp_inputs]
        columns = self._scores(down, stats, [read_weight(p) for p in producers])
        keep = keep_highest(columns, self.plan.channels)
        for name, module in zip(self.layout.mlp_inputs, producers, strict=True):
            _keep_rows(state, module, name, keep)
        return self._consume(index, prefix, down, self.layout.mlp_output, state, stats, keep)

    # --- shared ----------------------------------------------------------------------------------------

    def _scores(
        self, consumer: nn.Module, stats: InputStatistics, producers: list[torch.Tensor]
    ) -> torch.Tensor:
        weight, gram = read_weight(consumer), stats.gram_matrix()
        return column_scores(self.options.score, weight, gram, stats.sums, stats.tokens, producers)

    def _consume(self, index, prefix, consumer, name, state, stats, keep) -> LinearReport:
        """Slice the consumer's input columns to ``keep``, re-fitting or compensating as configured."""
        weight = read_weight(consumer).float()
        bias = consumer.bias.data.float() if consumer.bias is not None else None
        has_bias = bias is not None or self.use_bias
        damp = None
        if self.options.reconstruct:
            gram, sums, tokens = stats.gram_matrix(), stats.sums, stats.tokens
            refit = least_squares_refit(weight, bias, gram, sums, tokens, keep, has_bias, self.options.damp)
            new_weight, new_bias, damp = refit.weight, refit.bias, refit.damp
        else:
            new_weight = weight[:, keep]
            removed = torch.ones(weight.shape[1], dtype=torch.bool)
            removed[keep] = False
            flap = self.options.score == "flap" and has_bias
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
            block=index,
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
