"""Re-fitting the projection that consumes removed units, so the block's output stays close to the dense one.

With X the consumer's calibration inputs, S the kept input columns and Y = W X + b the dense outputs, the
damped least-squares fit of the kept columns is

    W'_S = W G[:, S] (G_SS + λI)⁻¹,   G = X Xᵀ,

(with a bias, the same on inputs extended by a constant 1, whose row of G holds Σx and N). It needs only the
Gram matrix that the statistics pass already accumulates. Without re-fitting, FLAP (arXiv 2312.11983 §3.3)
compensates a removed column's mean contribution in the bias: b' = b + W[:, R] E[X_R].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.methods.sparsegpt import CholeskyError


@dataclass
class Refit:
    weight: torch.Tensor
    """``[out, len(keep)]``, fp32."""
    bias: torch.Tensor | None
    damp: float
    """Relative damping used (raised above the requested one when the Cholesky factorisation failed)."""


def least_squares_refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gram: torch.Tensor,
    sums: torch.Tensor,
    tokens: int,
    keep: torch.Tensor,
    fit_bias: bool,
    damp: float = 0.01,
    max_retries: int = 4,
) -> Refit:
    """Damped least-squares weights (and bias, with ``fit_bias``) for the kept input columns ``keep``.

    ``gram`` is Σ x xᵀ and ``sums`` Σ x over ``tokens`` tokens; λ = damp · mean(diag G_SS) (the bias entry
    is not damped).
    """
    w = weight.float()
    b = torch.zeros(w.shape[0], device=w.device) if bias is None else bias.float()
    g = gram.float()
    if fit_bias:
        width = g.shape[0]
        extended = torch.empty(width + 1, width + 1, device=g.device)
        extended[:width, :width] = g
        extended[:width, width] = extended[width, :width] = sums.float()
        extended[width, width] = float(tokens)
        g, w = extended, torch.cat([w, b[:, None]], dim=1)
        keep = torch.cat([keep, torch.tensor([width], device=keep.device)])
    kept = g[keep][:, keep]
    cross = w @ g[:, keep]  # W G[:, S]: the dense outputs correlated with the kept inputs
    scale = kept.diagonal()[: len(keep) - int(fit_bias)].mean().clamp_min(1e-12)
    current = damp
    for _ in range(max_retries + 1):
        damped = kept.clone()
        damped.diagonal()[: len(keep) - int(fit_bias)].add_(current * scale)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            solution = torch.cholesky_solve(cross.t(), factor).t()
            if bool(torch.isfinite(solution).all()):
                if fit_bias:
                    return Refit(solution[:, :-1].contiguous(), solution[:, -1].contiguous(), current)
                return Refit(solution, None if bias is None else b, current)
        current *= 10
    raise CholeskyError(f"least-squares re-fit failed even with damping {current / 10:g}")


def mean_compensation(
    weight: torch.Tensor, bias: torch.Tensor | None, sums: torch.Tensor, tokens: int, removed: torch.Tensor
) -> torch.Tensor:
    """FLAP's bias after removing input columns ``removed``: b + W[:, R] · mean(X_R)."""
    base = torch.zeros(weight.shape[0], device=weight.device) if bias is None else bias.float()
    return base + weight.float()[:, removed] @ (sums.float()[removed] / tokens)
