"""Refinements after a method has pruned a layer: re-fit the kept weights on the fixed mask, and improve
the mask itself by 1-swaps, both with the layer's reconstruction objective.

Conventions: ``dense`` W and ``weight`` W' are fp32 ``[out, in]`` (W' is 0.0 where ``mask`` is True, i.e.
removed), ``hessian`` H = (2/N) Σ x xᵀ ``[in, in]`` (symmetric PSD, possibly singular, with zero rows and
columns for dead inputs). Row r's error is e_r = (w_r − w'_r)ᵀ H (w_r − w'_r), which is ‖w_r X − w'_r X‖²
up to the constant 2/N; rows are independent, and every step below works on all rows at once (matmuls
of ``[out, in]`` by H, no loop over rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.errors import LlmpruneError
from llmprune.methods.patterns import Pattern


class ResolveError(LlmpruneError):
    """The re-solve stayed non-finite even at the highest damping tried (or its inputs were non-finite)."""


@dataclass
class ResolveResult:
    weight: torch.Tensor
    """Re-fitted weight W', fp32 ``[out, in]``, exactly +0.0 where masked."""
    damp: float
    """Relative damping actually used (greater than requested when a solve had to be retried)."""
    iterations: int = 0
    """Conjugate-gradient iterations run (fewer than asked when every row converged early)."""
    rows_kept: int = 0
    """Rows left at their start because the solve did not lower their error (rounding, breakdown)."""


@dataclass
class SwapResult:
    weight: torch.Tensor
    """W' after the swaps, fp32 ``[out, in]``: a restored weight takes its dense value (with ``refit``, its
    best value given the others), a pruned one +0.0, the others are as given."""
    mask: torch.Tensor
    """The refined mask (True = removed): same count per row, and per N:M group, as the start."""
    swaps: int
    """Swaps accepted in total (over all rows and rounds, rows reverted at the end not counted)."""
    rounds: int = 0
    """Rounds run (fewer than asked when no row improved any more)."""


def row_errors(dense: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row e_r = (w_r − w'_r)ᵀ H (w_r − w'_r), float64 ``[out]`` (fp32 matmul, float64 sums)."""
    return _quadratic(dense.float() - weight.float(), hessian.float())


def layer_error(dense: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative reconstruction error sqrt(Σ_r e_r / Σ_r w_rᵀ H w_r) = ‖WX − W'X‖ / ‖WX‖ (0 when no signal)."""
    h = hessian.float()
    error = float(row_errors(dense, weight, h).sum())
    reference = float(_quadratic(dense.float(), h).sum())
    return (max(error, 0.0) / reference) ** 0.5 if reference > 0 else 0.0


def _quadratic(rows: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """xᵀ H x for every row x of ``rows``, float64."""
    return (rows @ h).mul_(rows).sum(dim=1, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Re-solve on a fixed mask.

# How often (in iterations) the conjugate-gradient loop checks on the host whether every row converged.
_CHECK_EVERY = 4


def resolve_weights(
    dense: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    iterations: int,
    damp: float = 0.0,
    *,
    tol: float = 1e-6,
    max_retries: int = 4,
) -> ResolveResult:
    """Re-fit the kept weights with the mask fixed, minimising Σ_r e_r (the least-squares optimum on
    each row's support S: w'_S = (H_SS)⁻¹ H_S,: w).

    Jacobi-preconditioned conjugate gradients on all rows at once (as ALPS, Meng et al., arXiv 2406.07831
    §3.3, solves its fixed-support step), warm-started at ``weight``, for at most ``iterations`` steps; a
    row stops when its residual is below ``tol`` times its right-hand side. Damping H + λI with
    λ = damp·mean(diag H). If the result is not finite the solve is repeated with damping ×10 (as
    SparseGPT's Cholesky), up to ``max_retries`` times, and the damping used is returned; a row whose
    (undamped) error did not fall keeps its start. Masked entries are exactly +0.0.
    """
    _check_shapes(dense, weight, mask, hessian)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    dense, h = dense.float(), hessian.float()
    start = weight.float().masked_fill(mask, 0.0)  # a copy: the caller's weight is never changed
    difference = dense - start
    gradient = difference @ h  # (W − W') H: half the gradient of e_r, and e_r itself
    before = (gradient * difference).sum(dim=1, dtype=torch.float64)
    if not bool(before.isfinite().all()):
        raise ResolveError("re-solve: the weights or the Hessian are not finite")
    keep = (~mask).float()
    # A row has converged when its residual is below tol times its right-hand side P ⊙ (W H).
    target = (dense @ h).mul_(keep).square_().sum(dim=1).clamp_min_(torch.finfo(torch.float32).tiny)
    target.mul_(tol * tol)
    mean_diag = float(h.diagonal().mean())
    current = damp
    for _ in range(max_retries + 1):
        solved, steps = _pcg(start, difference, gradient, keep, h, current * mean_diag, iterations, target)
        if bool(solved.isfinite().all()):
            break
        current = current * 10 if current > 0 else 1e-6
    else:
        raise ResolveError(f"re-solve is not finite even with damping {current / 10:g}")
    worse = ~(row_errors(dense, solved, h) <= before)  # the true (undamped) error; NaN counts as worse
    solved[worse] = start[worse]
    return ResolveResult(solved.masked_fill_(mask, 0.0), current, steps, int(worse.sum()))


def _pcg(
    start: torch.Tensor,
    difference: torch.Tensor,
    gradient: torch.Tensor,
    keep: torch.Tensor,
    h: torch.Tensor,
    lam: float,
    iterations: int,
    target: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Preconditioned CG on every row's normal equations (H_λ)_SS w'_S = (H_λ)_S,: w, rows batched,
    from W' = ``start`` (``difference`` = W − W', ``gradient`` = (W − W') H).

    With P = keep (1 on the support), the operator is A v = P ⊙ (v H_λ) and the residual
    R = P ⊙ ((W − W') H_λ) (minus half the gradient of e_r); one matmul by H per iteration. Each row has
    its own step α_r = r·z / p·Ap and β_r = r'·z' / r·z; a row whose curvature p·Ap is not positive
    (a direction in H's null space: dead inputs, too few samples) or whose squared residual is below
    its ``target`` takes no step.
    """
    x = start.clone()

    def apply(v: torch.Tensor) -> torch.Tensor:  # P ⊙ (v H + λ v)
        return torch.addmm(v, v, h, beta=lam).mul_(keep) if lam else (v @ h).mul_(keep)

    diag = h.diagonal() + lam
    precond = _inverse(diag)  # Jacobi; 0 on a dead input (no step there)
    residual = torch.add(gradient, difference, alpha=lam).mul_(keep)
    z = residual * precond
    direction = z.clone()
    rz = (residual * z).sum(dim=1)
    steps = 0
    for steps in range(1, iterations + 1):
        a_direction = apply(direction)
        curvature = (direction * a_direction).sum(dim=1)
        done = residual.square().sum(dim=1) <= target
        alpha = torch.where((curvature > 0) & ~done, rz / curvature, 0.0)
        x.addcmul_(alpha[:, None], direction)
        residual.addcmul_(alpha[:, None], a_direction, value=-1.0)
        torch.mul(residual, precond, out=z)
        rz_next = (residual * z).sum(dim=1)
        beta = torch.where(rz > 0, rz_next / rz, 0.0)
        direction.mul_(beta[:, None]).add_(z)
        rz = rz_next
        if steps % _CHECK_EVERY == 0 and bool((residual.square().sum(dim=1) <= target).all()):
            break
    return x, steps


# ---------------------------------------------------------------------------------------------------------
# Mask refinement by 1-swaps.

# An accepted swap must lower e_r by more than this share of the row's start error (fp32 rounding of the
# incremental gradient must not pass for an improvement).
_MIN_GAIN = 1e-6
# The gradient G = (W − W') H is updated by two rows of H per swap, and recomputed (for the rows still
# searched) every so many rounds.
_REFRESH_EVERY = 32
# N:M: rows per chunk of the all-pairs evaluation are chosen so that a chunk has about this many pairs.
_PAIR_BUDGET = 1 << 22


def swap_mask(
    dense: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    rounds: int,
    *,
    candidates: int = 16,
    refit: bool = False,
) -> SwapResult:
    """Improve the mask by 1-swaps (SparseSwaps, arXiv 2512.10922; DSnoT's prune-and-grow, arXiv
    2310.08915): in a row, restore a pruned weight i and prune a kept weight j when that lowers e_r.

    With d = w − w' and g = H d (per row), restoring i to its dense value (d_i: w_i → 0) and pruning j
    (d_j += w'_j) changes e_r by exactly
        Δ = −2 g_i d_i + d_i² H_ii + 2 g_j w'_j + w'_j² H_jj − 2 d_i w'_j H_ij.
    With ``refit`` the restored weight takes instead its best value given the others (d_i moves by
    −(g_i + w'_j H_ij)/H_ii), for Δ = 2 g_j w'_j + w'_j² H_jj − (g_i + w'_j H_ij)² / H_ii, never more.
    For N:M, i and j lie in the same group of ``pattern.m`` inputs (all pairs are checked); unstructured,
    anywhere in the row (the pairs of the ``candidates`` best i alone and best j alone are checked).
    Each round makes the best swap of every row at once, for at most ``rounds`` rounds, and stops when no
    row improves (a row that found no swap is not searched again: nothing in it changed). Per-row (and
    per-group) counts are unchanged; a row whose recomputed error ends above its start (rounding) is
    reverted to its start.
    """
    _check_shapes(dense, weight, mask, hessian)
    if pattern.structured:
        raise ValueError("swaps apply to unstructured and N:M patterns, not structured pruning")
    if pattern.is_nm and dense.shape[1] % pattern.m:
        raise ValueError(f"{dense.shape[1]} input columns are not divisible by M={pattern.m}")
    if rounds < 0 or candidates < 1:
        raise ValueError(f"rounds must be >= 0 and candidates >= 1, got {rounds} and {candidates}")
    dense, h = dense.float(), hessian.float()
    start_mask = mask.clone()
    start = weight.float().masked_fill(mask, 0.0)
    w, mask = start.clone(), mask.clone()
    d = dense - w
    g = d @ h
    before = _quadratic(d, h)
    threshold = (before * -_MIN_GAIN).float()
    diag = h.diagonal()
    blocks = _diagonal_blocks(h, pattern.m) if pattern.is_nm else None
    k = min(candidates, w.shape[1])
    per_row = torch.zeros(len(w), dtype=torch.int64, device=w.device)
    rows = torch.arange(len(w), device=w.device)  # the rows still searched
    done = 0
    for done in range(1, rounds + 1):
        if done % _REFRESH_EVERY == 0:
            g[rows] = d[rows] @ h
        terms = (d[rows], w[rows], g[rows], mask[rows], diag)
        if blocks is not None:
            delta, i, j = _best_in_groups(*terms, blocks, refit)
        else:
            delta, i, j = _best_in_rows(*terms, h, k, refit)
        better = delta < threshold[rows]
        rows, i, j = rows[better], i[better], j[better]
        if rows.numel() == 0:
            done -= 1
            break
        pruned = w[rows, j]
        # d_i moves to 0 (w'_i = w_i), or with ``refit`` to its best value: by −(g_i + w'_j H_ij) / H_ii.
        step = (g[rows, i] + pruned * h[i, j]).div_(diag[i]).neg_() if refit else -d[rows, i]
        # g += δ_i H_i,: + δ_j H_j,: (H symmetric), with δ_i = ``step`` and δ_j = w'_j.
        g[rows] += step[:, None] * h[i] + pruned[:, None] * h[j]
        d[rows, i] += step
        w[rows, i] = dense[rows, i] - d[rows, i]  # the dense value exactly when d_i became 0
        d[rows, j] = dense[rows, j]
        w[rows, j] = 0.0
        mask[rows, i] = False
        mask[rows, j] = True
        per_row[rows] += 1
    worse = ~(_quadratic(dense - w, h) <= before)
    w[worse], mask[worse] = start[worse], start_mask[worse]
    per_row[worse] = 0
    return SwapResult(w.masked_fill_(mask, 0.0), mask, int(per_row.sum()), done)


def _single_terms(
    d: torch.Tensor, w: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, diag: torch.Tensor, refit: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Change of e_r for restoring each pruned weight alone (``gain``: at its dense value, or with
    ``refit`` at its best value; +inf where kept, or dead with ``refit``) and for pruning each kept weight
    alone (``cost``, +inf where pruned)."""
    inf = torch.tensor(float("inf"), device=d.device)
    if refit:
        gain = torch.where(mask & (diag > 0), g.square().div_(diag).neg_(), inf)
    else:
        gain = torch.where(mask, (d * diag - 2 * g).mul_(d), inf)
    cost = torch.where(mask, inf, (w * diag + 2 * g).mul_(w))
    return gain, cost


def _pair_changes(
    gain: torch.Tensor,
    cost: torch.Tensor,
    d_i: torch.Tensor,
    g_i: torch.Tensor,
    inverse_i: torch.Tensor,
    w_j: torch.Tensor,
    h_ij: torch.Tensor,
    refit: bool,
) -> torch.Tensor:
    """Exact Δ of every pair (i restored, j pruned), the arguments broadcast ``[..., i, j]``; +inf where i is
    not pruned or j not kept (``gain`` or ``cost`` +inf: the other terms are finite). ``inverse_i`` is
    1 / H_ii, 0 for a dead input (whose ``gain`` is +inf with ``refit``)."""
    if refit:  # cost_j − (g_i + w'_j H_ij)² / H_ii; ``gain`` (finite or +inf) only gates the pruned i
        gate = torch.where(gain.isfinite(), 0.0, float("inf"))
        return (h_ij * w_j).add_(g_i).square_().mul_(inverse_i).neg_().add_(cost).add_(gate)
    return (h_ij * (-2 * d_i)).mul_(w_j).add_(gain).add_(cost)


def _best_in_rows(
    d: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor,
    diag: torch.Tensor,
    h: torch.Tensor,
    k: int,
    refit: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unstructured: each row's best pair (Δ, i, j) among its k best restorations × k best prunings."""
    gain, cost = _single_terms(d, w, g, mask, diag, refit)
    gain_k, i = torch.topk(gain, k, dim=1, largest=False)
    cost_k, j = torch.topk(cost, k, dim=1, largest=False)
    delta = _pair_changes(
        gain_k[:, :, None],
        cost_k[:, None, :],
        d.gather(1, i)[:, :, None],
        g.gather(1, i)[:, :, None],
        _inverse(diag)[i][:, :, None],
        w.gather(1, j)[:, None, :],
        h[i[:, :, None], j[:, None, :]],
        refit,
    )
    best, at = delta.flatten(1).min(dim=1)
    return best, i.gather(1, (at // k)[:, None])[:, 0], j.gather(1, (at % k)[:, None])[:, 0]


def _inverse(diag: torch.Tensor) -> torch.Tensor:
    """1 / H_ii, and 0 for a dead input (H_ii = 0)."""
    return torch.where(diag > 0, 1.0 / diag.clamp_min(torch.finfo(diag.dtype).tiny), 0.0)


def _diagonal_blocks(h: torch.Tensor, m: int) -> torch.Tensor:
    """H's ``[groups, m, m]`` diagonal blocks: H_ij for i, j in the same group of m consecutive inputs."""
    groups = len(h) // m
    return h.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _best_in_groups(
    d: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor,
    diag: torch.Tensor,
    blocks: torch.Tensor,
    refit: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N:M: each row's best pair (Δ, i, j) over all (pruned i, kept j) pairs within its groups."""
    groups, m, _ = blocks.shape
    gain, cost = _single_terms(d, w, g, mask, diag, refit)
    inverse_i = _inverse(diag).view(groups, m, 1)
    chunk = max(1, _PAIR_BUDGET // (groups * m * m))
    best, at = [], []
    for r1 in range(0, len(d), chunk):
        rows, shape = slice(r1, r1 + chunk), (-1, groups, m)
        gain_i, d_i, g_i = (t[rows].view(shape)[..., :, None] for t in (gain, d, g))
        cost_j, w_j = (t[rows].view(shape)[..., None, :] for t in (cost, w))
        delta = _pair_changes(gain_i, cost_j, d_i, g_i, inverse_i, w_j, blocks, refit)
        chunk_best, chunk_at = delta.flatten(1).min(dim=1)  # over (group, i, j)
        best.append(chunk_best)
        at.append(chunk_at)
    best_all, at_all = torch.cat(best), torch.cat(at)
    group = at_all // (m * m)
    return best_all, group * m + at_all // m % m, group * m + at_all % m


def _check_shapes(
    dense: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor
) -> None:
    if dense.dim() != 2 or weight.shape != dense.shape or mask.shape != dense.shape:
        raise ValueError(
            f"dense, weight and mask must share one [out, in] shape, got {tuple(dense.shape)}, "
            f"{tuple(weight.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    if hessian.shape != (dense.shape[1], dense.shape[1]):
        raise ValueError(f"hessian must be [{dense.shape[1]}, {dense.shape[1]}], got {tuple(hessian.shape)}")
