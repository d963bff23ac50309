"""Wanda: Pruning by Weights and activations (Sun et al., arXiv 2306.11695).

Score S_ij = |W_ij| · ||X_j||_2 (paper eq. 1), with ||X_j|| the L2 norm of input feature j over every
calibration token. Weights are compared within each output row (paper §3, "comparison group"); for N:M the
group is each run of M consecutive inputs of a row.
"""

from __future__ import annotations

import torch

from llmprune.methods.patterns import Pattern, select_mask


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W| · ||X_j||, given the per-input sum of squares Σ_t x_tj² accumulated in fp32."""
    return weight.abs().float().mul_(input_sq_norms.float().sqrt().unsqueeze(0))  # abs() is a new tensor


def wanda_mask(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float, pattern: Pattern
) -> torch.Tensor:
    """Mask of the lowest Wanda scores per output row (or per N:M group)."""
    return select_mask(wanda_scores(weight, input_sq_norms), sparsity, pattern, per_row=True)
