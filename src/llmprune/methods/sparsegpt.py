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
from llmprune.methods.patterns import Pattern, mark_lowest, mark_lowest_per_column, prune_count


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
        factor = hessian.flip(0, 1)  # a copy, overwritten below
        factor.diagonal().add_(current * mean_diag)
        # With J the exchange matrix: J H J = L Lᵀ gives H = R Rᵀ with R = J L J upper triangular, so
        # H⁻¹ = (R⁻¹)ᵀ R⁻¹ and U = R⁻¹ = J L⁻¹ J: one Cholesky and one triangular inverse, instead of
        # the reference's Cholesky, cholesky_inverse and second Cholesky (same U, a third of the work).
        if _cholesky_(factor):
            upper = _invert_lower_(factor).flip(0, 1)
            if bool(upper.amax().isfinite() & upper.amin().isfinite()):  # amax and amin propagate NaN
                return upper, current
        current = current * 10 if current > 0 else 1e-6
    raise CholeskyError(
        f"Hessian is not positive definite even with damping {current / 10:g}; "
        "use more calibration samples or a larger --damp"
    )


# Matrices up to this size go to LAPACK whole, larger ones by halves (_cholesky_, _invert_lower_).
_LEAF = 256


def _cholesky_(matrix: torch.Tensor, leaf: int = _LEAF) -> bool:
    """Overwrite a symmetric matrix with its lower Cholesky factor L; False if not positive definite.

    By halves: with matrix = [[A, Bᵀ], [B, C]], L₁₁ = chol(A), L₂₁ = B L₁₁⁻ᵀ, L₂₂ = chol(C - L₂₁L₂₁ᵀ).
    On the CPU ``cholesky_ex`` of a large matrix spends most of its time zeroing the upper triangle of
    its column-major result; the halves keep that small and do the rest in matmuls and triangular solves.
    """
    n = len(matrix)
    if n <= leaf:
        lower, info = torch.linalg.cholesky_ex(matrix)
        matrix.copy_(lower)
        return info.item() == 0
    h = n // 2
    if not _cholesky_(matrix[:h, :h], leaf):
        return False
    l21 = matrix[h:, :h]
    l21.copy_(torch.linalg.solve_triangular(matrix[:h, :h].mT, l21, upper=True, left=False))
    matrix[:h, h:] = 0.0
    return _cholesky_(matrix[h:, h:].addmm_(l21, l21.mT, alpha=-1.0), leaf)


def _invert_lower_(lower: torch.Tensor, leaf: int = _LEAF) -> torch.Tensor:
    """Overwrite a lower-triangular matrix with its inverse (exactly triangular too); returns it.

    By halves: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [-C⁻¹BA⁻¹, C⁻¹]], two half-size triangular solves per
    level: a third of the work of solving against the identity.
    """
    n = len(lower)
    if n <= leaf:
        identity = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return lower.copy_(torch.linalg.solve_triangular(lower, identity, upper=False).tril_())
    h = n // 2
    a, b, c = lower[:h, :h], lower[h:, :h], lower[h:, h:]
    b_a_inv = torch.linalg.solve_triangular(a, b, upper=False, left=False)
    b.copy_(torch.linalg.solve_triangular(c, b_a_inv, upper=False).neg_())
    _invert_lower_(a, leaf)
    _invert_lower_(c, leaf)
    return lower


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
    splits = list(row_splits) if row_splits is not None else [weight.shape[0]]
    sparsities = [sparsity] * len(splits) if isinstance(sparsity, float | int) else list(sparsity)
    if not pattern.is_nm and not any(sparsities):
        w = weight.detach().float().clone()
        return SparseGPTResult(w, torch.zeros_like(w, dtype=torch.bool), factor.damp)
    if sum(splits) != weight.shape[0]:
        raise ValueError(f"row_splits {splits} do not add up to the weight's {weight.shape[0]} rows")
    if pattern.is_nm and weight.shape[1] % pattern.m:
        raise ValueError(f"{weight.shape[1]} input columns are not divisible by M={pattern.m}")
    upper, dead = factor.upper, factor.dead
    bounds = [sum(splits[:k]) for k in range(len(splits) + 1)]
    segments = [(slice(a, b), s) for a, b, s in zip(bounds[:-1], bounds[1:], sparsities, strict=True)]

    # Work on Wᵀ so that a weight column is a contiguous row; the loop below runs once per input column.
    # The mask is float 0/1 (1 = removed): CPU kernels on bool tensors are several times slower.
    wt = weight.detach().t().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    dead_inputs = dead.nonzero().flatten()
    wt.index_fill_(0, dead_inputs, 0.0)
    removed = torch.empty_like(wt)
    cols = wt.shape[0]
    if pattern.is_nm:  # N:M groups must not straddle two blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block, block_removed, u_block = wt[i1:i2], removed[i1:i2], upper[i1:i2, i1:i2]
        if not pattern.is_nm:
            _mark_block(block, u_block.diagonal(), segments, block_removed)
        errors = _obs_block(block, block_removed, u_block, pattern if pattern.is_nm else None)
        block.addcmul_(block, block_removed, value=-1.0)  # zero the removed weights (+0.0, not -0.0)
        wt[i2:].addmm_(upper[i1:i2, i2:].t(), errors, alpha=-1.0)
    removed.index_fill_(0, dead_inputs, 1.0)
    # One transposing copy into 0/1 bytes, which are valid bools.
    mask = removed.t().to(torch.uint8, memory_format=torch.contiguous_format).view(torch.bool)
    return SparseGPTResult(wt.t().contiguous(), mask, factor.damp)


def _mark_block(
    block: torch.Tensor, diag: torch.Tensor, segments: list[tuple[slice, float]], out: torch.Tensor
) -> None:
    """The unstructured mask of one block: its share of lowest w²/U_ii² in each matrix (segment of rows)."""
    scores = torch.div(block, diag[:, None]).square_()
    for rows, share in segments:
        mark_lowest(scores[:, rows], prune_count(scores[:, rows].numel(), share), out[:, rows])


# Columns per sub-block of the column loop: rank-1 updates stay within the sub-block (cache-sized), one
# matmul then carries the sub-block's errors to the rest of the block.
_SUB_BLOCK = 16


def _obs_block(
    block: torch.Tensor, removed: torch.Tensor, u_block: torch.Tensor, pattern: Pattern | None = None
) -> torch.Tensor:
    """OBS steps for the columns of one block (rows of ``block``, updated in place); returns the errors.

    ``u_block`` is the block's diagonal block of U. With an N:M ``pattern``, ``removed`` is filled here,
    one group at a time from the weights as updated so far; otherwise it holds the block's mask.
    """
    diag = u_block.diagonal()
    # err = (w - 0) / U_ii where removed, 0 where kept: err = w * scale.
    scale = removed / diag[:, None] if pattern is None else torch.empty_like(block)
    errors = torch.empty_like(block)
    columns = list(zip(block.unbind(), scale.unbind(), errors.unbind(), strict=True))
    if pattern is not None:
        m = pattern.m
        groups = list(zip(*(t.split(m) for t in (block, removed, scale, diag[:, None])), strict=True))
        # Buffers reused by every group: its scores, and the comparisons and ranks of its selection.
        rows = block.shape[1]
        scores = block.new_empty(m, rows)
        work = (block.new_empty(m, m, rows), block.new_empty(m, rows)) if m <= 16 else None
    sub_block = _SUB_BLOCK if pattern is None else max(m, _SUB_BLOCK // m * m)
    n = block.shape[0]
    for j1 in range(0, n, sub_block):
        j2 = min(j1 + sub_block, n)
        update = block[j1:j2].addr_
        # U is upper triangular, so updating the whole sub-block with row i of U leaves rows < i as they
        # are: one rank-1 update per column, without slicing in the loop.
        u_rows = u_block[j1:j2, j1:j2].unbind()
        if pattern is None:
            for (w, s, e), u_row in zip(columns[j1:j2], u_rows, strict=True):
                torch.mul(w, s, out=e)
                update(u_row, e, alpha=-1.0)
        else:
            for i in range(j1, j2):
                if i % m == 0:
                    w, r, s, d = groups[i // m]
                    mark_lowest_per_column(torch.div(w, d, out=scores).square_(), m - pattern.n, r, work)
                    torch.div(r, d, out=s)
                w, s, e = columns[i]
                torch.mul(w, s, out=e)
                update(u_rows[i - j1], e, alpha=-1.0)
        if j2 < n:
            block[j2:].addmm_(u_block[j1:j2, j2:].t(), errors[j1:j2], alpha=-1.0)
    return errors
