"""Magnitude pruning: remove the weights of smallest |W|.

The reference repositories (locuslab/wanda, IST-DASLab/sparsegpt) use one threshold per matrix; a per-row
comparison group is offered as an option.
"""

from __future__ import annotations

import torch

from llmprune.methods.patterns import Pattern, select_mask


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, pattern: Pattern, scope: str = "matrix"
) -> torch.Tensor:
    """Mask of the smallest-magnitude weights; ``scope`` is ``"matrix"`` or ``"row"``."""
    return select_mask(weight.abs(), sparsity, pattern, per_row=(scope == "row"))
