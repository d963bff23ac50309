"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774): one-shot pruning with OBS weight reconstruction.

Follows Algorithm 1 of the paper and the reference implementation (IST-DASLab/sparsegpt):
H = (2/N) Σ x xᵀ; dead inputs (H_ii = 0) get H_ii = 1 and their weights zeroed; damping λ = damp·mean(diag H);
the upper Cholesky factor U of H⁻¹ gives the OBS error scale [H⁻¹]_ii = U_ii² (eq. 3 and §3.3); columns are
processed left to right in blocks of ``blocksize`` with lazy batched updates of the columns to the right;
the unstructured mask is chosen adaptively per block from w²/U_ii² on the already-updated weights, and an
N:M mask every M columns likewise (§3.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmprune.errors import LlmpruneError
from llmprune.methods.patterns import Pattern, lowest_in_matrix, n_m_mask


class CholeskyError(LlmpruneError):
    """The damped Hessian stayed non-positive-definite even at the highest damping tried."""


@dataclass
class SparseGPTResult:
    weight: torch.Tensor
    """Pruned and OBS-updated weight, fp32, ``[out, in]``."""
    mask: torch.Tensor
    """True where a weight was removed."""
    damp: float
    """Relative damping actually used (greater than requested when Cholesky had to be retried)."""


def inverse_hessian_cholesky(
    hessian: torch.Tensor, damp: float, max_retries: int = 4
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H).

    If a factorisation fails, damping is multiplied by 10 and tried again, up to ``max_retries`` times;
    the damping used is returned so the caller can report it.
    """
    mean_diag = hessian.diagonal().mean()
    current = damp
    for _ in range(max_retries + 1):
        work = hessian.flip(0, 1)  # a copy; at most three matrices of this size are alive at once
        work.diagonal().add_(current * mean_diag)
        # With J the exchange matrix: J H J = L Lᵀ gives H = R Rᵀ with R = J L J upper triangular, so
        # H⁻¹ = (R⁻¹)ᵀ R⁻¹ and U = R⁻¹ = J L⁻¹ J: one Cholesky and one triangular inverse, instead of
        # the reference's Cholesky, cholesky_inverse and second Cholesky (same U, a third of the work).
        lower, info = torch.linalg.cholesky_ex(work)
        if info.item() == 0:
            work.zero_().diagonal().fill_(1.0)  # the identity, solved in place into L⁻¹
            torch.linalg.solve_triangular(lower, work, upper=False, out=work)
            lower = None
            upper = work.flip(0, 1)
            if bool(torch.isfinite(upper).all()):
                return upper, current
        work = lower = None
        current = current * 10 if current > 0 else 1e-6
    raise CholeskyError(
        f"Hessian is not positive definite even with damping {current / 10:g}; "
        "use more calibration samples or a larger --damp"
    )


@dataclass
class HessianFactor:
    """What SparseGPT needs from a Hessian, computed once per distinct input (q/k/v share one)."""

    upper: torch.Tensor
    """Upper Cholesky factor U of (H + λI)⁻¹, with dead inputs' diagonal set to 1."""
    dead: torch.Tensor
    """Inputs that were always zero (H_ii = 0): their weights are removed."""
    damp: float
    """Relative damping actually used."""


def factor_hessian(hessian: torch.Tensor, damp: float = 0.01, max_retries: int = 4) -> HessianFactor:
    """Handle dead inputs, damp, invert and factor a Hessian (raising damping if Cholesky fails)."""
    h = hessian.detach().float()
    dead = h.diagonal() == 0
    if bool(dead.any()):  # copy only then: the caller's Hessian is never changed
        h = h.clone()
        h[dead, dead] = 1.0
    upper, used = inverse_hessian_cholesky(h, damp, max_retries)
    return HessianFactor(upper, dead, used)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    damp: float = 0.01,
    max_retries: int = 4,
) -> SparseGPTResult:
    """Prune one ``[out, in]`` weight given the Hessian of its inputs; returns the reconstructed weight."""
    factor = factor_hessian(hessian, damp, max_retries)
    return sparsegpt_prune_factored(weight, factor, sparsity, pattern, blocksize)


def sparsegpt_prune_factored(
    weight: torch.Tensor,
    factor: HessianFactor,
    sparsity: float | Sequence[float],
    pattern: Pattern,
    blocksize: int = 128,
    row_splits: Sequence[int] | None = None,
) -> SparseGPTResult:
    """SparseGPT's column loop (Algorithm 1) given the factored inverse Hessian.

    Several weights that read the same input (q/k/v, gate/up) can be solved in one loop: stack them by
    rows and give their row counts in ``row_splits`` and one sparsity each. Rows never interact in the
    OBS update, and the adaptive mask is still chosen per original matrix, so this equals solving each
    matrix alone, with one pass over the columns instead of one per matrix.
    """
    w = weight.detach().float().clone()
    splits = list(row_splits) if row_splits is not None else [w.shape[0]]
    sparsities = [sparsity] * len(splits) if isinstance(sparsity, float | int) else list(sparsity)
    if not pattern.is_nm and not any(sparsities):
        return SparseGPTResult(w, torch.zeros_like(w, dtype=torch.bool), factor.damp)
    upper, dead = factor.upper, factor.dead
    cols = w.shape[1]
    w[:, dead] = 0.0
    diag = upper.diagonal()
    bounds = [sum(splits[:k]) for k in range(len(splits) + 1)]
    segments = [(slice(a, b), s) for a, b, s in zip(bounds[:-1], bounds[1:], sparsities, strict=True)]

    # Work on Wᵀ so that a weight column is a contiguous row; the loop below runs once per input column.
    wt = w.t().contiguous()
    mask_t = torch.zeros_like(wt, dtype=torch.bool)
    if pattern.is_nm:  # N:M groups must not straddle two blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block, block_mask, block_diag = wt[i1:i2], mask_t[i1:i2], diag[i1:i2]
        u_block = upper[i1:i2, i1:i2]
        if not pattern.is_nm:
            scores = (block / block_diag[:, None]) ** 2
            for rows, share in segments:
                block_mask[:, rows] = lowest_in_matrix(scores[:, rows], share)
        scale = block_mask.float() / block_diag[:, None]
        errors = torch.empty_like(block)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                scores = (block[group] / block_diag[group, None]) ** 2
                block_mask[group] = n_m_mask(scores.t(), pattern.n, pattern.m).t()
                scale[group] = block_mask[group].float() / block_diag[group, None]
            # OBS step: err = (w - q) / U_ii for removed weights, spread over the columns to the right.
            torch.mul(block[i], scale[i], out=errors[i])
            block[i:].addr_(u_block[i, i:], errors[i], alpha=-1.0)
        block.masked_fill_(block_mask, 0.0)
        wt[i2:].addmm_(upper[i1:i2, i2:].t(), errors, alpha=-1.0)
    return SparseGPTResult(wt.t().contiguous(), mask_t.t().contiguous() | dead.unsqueeze(0), factor.damp)
