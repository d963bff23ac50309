"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., arXiv 2310.05175).

Each decoder layer's outlier ratio (paper §3, "Layerwise Outlier Distribution", LOD) is the share of its
Wanda scores A_ij = |W_ij| · ||X_j||_2 that exceed M times their mean, over all the pruned linear layers of
the decoder layer together (the reference code's ``check_outlier_mean`` on the concatenated scores).
Layers with more outliers are pruned less (paper eq. 2: S_l = 1 - D_l, D_l the outlier ratio mapped into
a band of width 2λ around the target sparsity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llmprune.methods.wanda import wanda_scores


def outlier_ratio(
    weights: Sequence[torch.Tensor], sq_norms: Sequence[torch.Tensor], threshold: float
) -> float:
    """Share (in [0, 1]) of the Wanda scores of one decoder layer's linear layers above ``threshold`` × their
    mean; ``weights[k]`` is ``[out, in]``, ``sq_norms[k]`` its inputs' Σ_t x_t² (``[in]``).

    The mean is over all the layers' scores together (as the reference concatenates them); it is computed
    matrix by matrix (float64 sums), then each matrix's scores are counted against it, so that only one
    matrix's scores exist at a time. The ratio does not depend on the scale of ``sq_norms`` (Σ or mean)."""
    if len(weights) != len(sq_norms) or not weights:
        raise ValueError("outlier_ratio needs one sq_norms per weight, and at least one weight")
    total = 0.0
    count = 0
    for weight, norms in zip(weights, sq_norms, strict=True):
        # Σ_ij |W_ij| √(Σx²)_j = Σ_j √(Σx²)_j Σ_i |W_ij|: the same sum without materialising the scores.
        columns = weight.abs().sum(dim=0, dtype=torch.float64)
        total += float(columns @ norms.double().sqrt())
        count += weight.numel()
    bound = threshold * total / count
    outliers = sum(int((wanda_scores(w, n) > bound).sum()) for w, n in zip(weights, sq_norms, strict=True))
    return outliers / count


def owl_sparsities(
    ratios: Sequence[float], mean: float, spread: float, sizes: Sequence[int] | None = None
) -> list[float]:
    """Per-layer sparsities in [mean − spread, mean + spread] from the layers' outlier ratios: fewer
    outliers, more pruning; their mean weighted by ``sizes`` (parameters pruned per layer; None: equal) is
    ``mean``.

    A layer whose ratio is NaN (nothing to score) or whose size is 0 (nothing to prune) gets ``mean`` and
    takes no part in the mapping. All-equal ratios or ``spread`` 0 give ``mean`` everywhere.
    """
    if spread < 0:
        raise ValueError(f"the OWL spread must be >= 0, got {spread}")
    sizes = [1] * len(ratios) if sizes is None else list(sizes)
    if len(sizes) != len(ratios):
        raise ValueError(f"{len(ratios)} outlier ratios but {len(sizes)} layer sizes")
    if any(size < 0 for size in sizes):
        raise ValueError("layer sizes must be >= 0")
    used = [i for i, (r, n) in enumerate(zip(ratios, sizes, strict=True)) if n > 0 and not math.isnan(r)]
    result = [float(mean)] * len(ratios)
    if not used or spread == 0:
        return result
    weight = sum(sizes[i] for i in used)
    centre = sum(sizes[i] * ratios[i] for i in used) / weight
    widest = max(abs(ratios[i] - centre) for i in used)
    if widest == 0:
        return result
    # The reference (OWL repo, prune_wanda_outlier) min-max normalises the ratios to [0, 2λ], subtracts
    # their mean and keeps 1 − s + that: s_i = s − 2λ (r_i − mean(r)) / (max r − min r), affine and
    # decreasing in r_i with mean s, but reaching up to s ± 2λ (one layer far from the others) instead of
    # staying in [s − λ, s + λ]. The same affine map with r's size-weighted mean as its centre and the slope
    # scaled so that the farthest layer lands on the band's edge keeps every layer inside the band and the
    # size-weighted mean exactly s (Σ n_i (r_i − r̄) = 0); for two layers it is the reference's map.
    for i in used:
        result[i] = mean - spread * (ratios[i] - centre) / widest
    return result
