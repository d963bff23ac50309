"""Per-layer widths chosen adaptively (``--widths adaptive``), as pure functions of unit scores.

The rule is FLAP's adaptive structure search (An et al., arXiv 2312.11983 §3.2, "AL-AM": adaptive across
layers and modules). On the dense model, each layer's column scores of one kind (the input columns of
o_proj for heads, of down_proj for MLP channels) are standardized within that layer and kind,
z = (s - mean) / std, so that layers and kinds whose raw scores have different scales become comparable; a
unit's score is the mean z of its columns. All units of all layers are then ranked together and the
lowest go first until the parameter budget is spent, each unit counting its own parameters (a head costs
far more than a channel). So a layer keeps more of a kind of unit when a few of its units dominate the
rest, and loses more when many of its units score far below its typical one.

Removal comes in steps of equal cost within a layer and kind (one query head from every key/value group,
a whole group, or one channel), so every step list is ascending and a layer's removal is a prefix of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Steps:
    """The successive removal steps of one kind of unit in one layer, cheapest score first."""

    scores: torch.Tensor
    """Score of step 1, 2, ... (ascending); its length is the most steps the layer allows."""
    cost: float
    """Parameters removed by one step."""


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over one layer's columns of one kind (FLAP's per-layer standardization)."""
    scores = scores.double()
    spread = scores.std() if scores.numel() > 1 else scores.new_tensor(0.0)
    return (scores - scores.mean()) / spread.clamp_min(1e-12)


def head_steps(head_scores: torch.Tensor, kv_heads: int, mode: str) -> torch.Tensor:
    """Ascending step scores for attention heads from per-query-head scores (mean z of their columns).

    ``queries``: step r removes the r-th weakest query head of every key/value group (its score: their
    mean), and every group keeps one head; ``groups``: step r removes the r-th weakest whole group (its
    score: the mean of its heads), and one group stays.
    """
    grouped = head_scores.reshape(kv_heads, -1)
    if mode == "queries":
        return grouped.sort(dim=1).values.mean(dim=0)[:-1]
    return grouped.mean(dim=1).sort().values[:-1]


def channel_steps(channel_scores: torch.Tensor) -> torch.Tensor:
    """Ascending step scores for MLP channels (one channel each); one channel stays."""
    return channel_scores.sort().values[:-1]


def allocate(steps: list[Steps], budget: float) -> list[int]:
    """How many steps of each list to take so that about ``budget`` parameters go, lowest scores first.

    Steps are taken in ascending order of score over all lists; one that would overshoot the budget by
    more than half the cheapest step is skipped (and so are the later steps of its list, which cost as
    much), so cheaper units fill the rest: the budget is met to within half the cheapest unit, unless
    the allowed steps run out first.
    """
    if not steps:
        return []
    tolerance = min(s.cost for s in steps) / 2
    order = sorted(
        (score, index, position)
        for index, s in enumerate(steps)
        for position, score in enumerate(s.scores.tolist())
    )
    taken = [0] * len(steps)
    blocked = [False] * len(steps)
    removed = 0.0
    for _, index, position in order:
        if blocked[index] or position != taken[index]:
            continue
        cost = steps[index].cost
        if removed + cost > budget + tolerance:
            blocked[index] = True
            continue
        taken[index] += 1
        removed += cost
    return taken
