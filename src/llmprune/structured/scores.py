"""Importance of removable units, as pure functions of weights and input statistics.

A unit (an attention head, an MLP channel) owns some input columns of the projection that consumes it
(o_proj / down_proj); every score is a sum over those columns. ``energy`` is Σ_t x_t² per input feature
(the diagonal of the Gram matrix), ``sums`` Σ_t x_t, ``tokens`` N, all over the calibration tokens entering
the consumer (``pipeline.statistics.InputStatistics``).
"""

from __future__ import annotations

import torch


def column_scores(
    score: str,
    consumer: torch.Tensor,
    energy: torch.Tensor,
    sums: torch.Tensor,
    tokens: int,
    producers: list[torch.Tensor] = (),
) -> torch.Tensor:
    """Importance of each input column ``c`` of ``consumer`` (``[out, in]``):

    - ``magnitude``: ||W[:, c]||² plus the squared norm of row c of each producer (the unit's other weights);
    - ``wanda``: ||X_c||₂ · Σ_i |W[i, c]| (Wanda's |W|·||X|| of arXiv 2306.11695, summed over the column);
    - ``flap``: Var(X_c) · ||W[:, c]||² (FLAP's fluctuation metric, arXiv 2312.11983 eq. 4).
    """
    weight = consumer.float()
    energy = energy.float()
    if score == "magnitude":
        columns = weight.square().sum(dim=0)
        for producer in producers:
            columns = columns + producer.float().square().sum(dim=1)
        return columns
    if score == "wanda":
        return energy.clamp_min(0).sqrt() * weight.abs().sum(dim=0)
    if score == "flap":
        mean = sums.float() / tokens
        variance = (energy / tokens - mean.square()).clamp_min(0) * tokens / max(tokens - 1, 1)
        return variance * weight.square().sum(dim=0)
    raise ValueError(f"unknown structured score {score!r}")


def unit_scores(columns: torch.Tensor, unit_width: int) -> torch.Tensor:
    """Sum column scores over consecutive units of ``unit_width`` columns (a head: ``head_dim``)."""
    return columns.reshape(-1, unit_width).sum(dim=1)


def keep_highest(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices (ascending) of the units kept when the ``remove`` lowest-scoring ones go; ties keep the
    earlier unit."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[: len(scores) - remove].sort().values
