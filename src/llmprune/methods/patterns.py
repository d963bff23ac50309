"""Sparsity patterns and the mask selections shared by every method.

A mask is a bool tensor shaped like the weight ``[out_features, in_features]``: True marks a weight to
remove. Scores are "importance": the lowest scores are pruned.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """``unstructured``, N:M (at most N non-zeros in every group of M consecutive inputs of a row), or
    ``structured`` (whole heads, channels or layers removed: see ``llmprune.structured``)."""

    n: int | None = None
    m: int | None = None
    structured: bool = False

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """Parse ``"unstructured"``, ``"structured"`` or ``"N:M"`` with 0 < N < M; raises ValueError."""
        if isinstance(text, Pattern):
            return text
        if text.strip().lower() == "unstructured":
            return cls()
        if text.strip().lower() == "structured":
            return cls(structured=True)
        match = _NM.match(text)
        if not match:
            raise ValueError(
                f"pattern must be 'unstructured', 'structured' or 'N:M' such as 2:4, got {text!r}"
            )
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
        return cls(n, m)

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def implied_sparsity(self) -> float | None:
        """1 - N/M for an N:M pattern, None for unstructured."""
        return None if self.m is None else 1.0 - self.n / self.m

    def __str__(self) -> str:
        if self.structured:
            return "structured"
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a sparsity removes (rounded to nearest, as exact as integers allow)."""
    return min(total, max(0, round(total * sparsity)))


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask the ``k`` lowest entries along the last dimension, ties broken by position.

    Equal to taking the first ``k`` of a stable sort, but a selection of the k-th value per row instead of
    a sort: several times faster on the CPU.
    """
    n = scores.shape[-1]
    if k <= 0 or k >= n:
        return torch.full_like(scores, k > 0, dtype=torch.bool)
    if scores.dtype in _EXACT_IN_FLOAT32:
        scores = _order_keys(scores.float())
        threshold = _kth_per_row(scores, k)
    else:
        threshold = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    at_most = scores <= threshold  # at least k per row; exactly k per row iff the total is k per row
    if int(torch.count_nonzero(at_most)) == k * (at_most.numel() // n):  # counts bools faster than sum()
        return at_most
    mask = scores < threshold  # ties at the threshold: keep the first ones by position
    ties = scores == threshold
    missing = k - torch.count_nonzero(mask, dim=-1).unsqueeze(-1)
    return mask | (ties & (ties.cumsum(dim=-1) <= missing))


def _kth_per_row(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest of each row of int32 ``keys`` (``[..., 1]``), 0 < k < row length.

    An unsorted ``topk`` of the smaller side (k lowest, or n - k + 1 highest) and its max (or min): the
    same value as ``kthvalue``, faster on the CPU, and faster on int32 keys than on floats.
    """
    n = keys.shape[-1]
    if k <= n - k + 1:
        return torch.topk(keys, k, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)
    return torch.topk(keys, n - k + 1, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)


def lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask the ``round(cols * sparsity)`` lowest scores of every row (Wanda's comparison group)."""
    return _lowest_k(scores, prune_count(scores.shape[1], sparsity))


def lowest_in_matrix(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask the ``round(numel * sparsity)`` lowest scores of the whole matrix (one threshold per matrix)."""
    k = prune_count(scores.numel(), sparsity)
    return mark_lowest(scores, k, torch.empty_like(scores, dtype=torch.bool))


# Below this many scores one kthvalue is about as fast as the two histograms of mark_lowest.
_HISTOGRAM_MIN = 1 << 14
_EXACT_IN_FLOAT32 = (torch.float32, torch.float16, torch.bfloat16)  # keyed as float32 without rounding


def mark_lowest(scores: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Set ``out`` to 1 at the ``k`` lowest of all ``scores`` and to 0 elsewhere; ties broken by position.

    Same selection as ``_lowest_k`` on the flattened scores (NaN aside), found with two 16-bit histograms
    of order-preserving integer keys instead of a ``kthvalue``, which is several times slower on the CPU.
    ``out`` may be of any dtype and strided (a float mask, a slice of a larger mask).
    """
    n = scores.numel()
    if k <= 0 or k >= n:
        return out.fill_(1 if k > 0 else 0)
    if n < _HISTOGRAM_MIN or scores.dtype not in _EXACT_IN_FLOAT32:
        return out.copy_(_lowest_k(scores.reshape(-1), k).view(scores.shape))
    keys = _order_keys(scores.float())
    key, below, up_to = _kth_key(keys, k)
    if up_to == k:
        return torch.le(keys, key, out=out)  # a strided ``out`` is written in place
    ties = (keys == key).reshape(-1)  # the k-th value is tied: keep the first of the ties by position
    first_ties = ties & (ties.cumsum(0) <= k - below)
    return out.copy_(((keys < key).reshape(-1) | first_ties).view(scores.shape))


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 scores are, with -0.0 and +0.0 equal."""
    bits = scores.view(torch.int32)
    if int(bits.min()) >= 0:  # no sign bit set: the bits are ordered already
        return bits
    sign = bits >> 31
    return (bits & 0x7FFFFFFF).bitwise_xor_(sign).sub_(sign)  # negative floats: magnitude bits, negated


def _kth_key(keys: torch.Tensor, k: int) -> tuple[int, int, int]:
    """The ``k``-th smallest of the int32 ``keys`` (flattened), and how many keys are below it and at most it.

    A histogram of the high 16 bits finds the bucket holding the k-th key, one of the low 16 bits of
    that bucket's keys finds the key itself.
    """
    high = (keys >> 16).add_(1 << 15).reshape(-1)
    bucket, before, _ = _find_bin(torch.bincount(high, minlength=1 << 16), k)
    base = (bucket - (1 << 15)) << 16
    # The bucket's keys map to 1..65536, all others to 0 or 65537 (keys - base wraps around in int32 only
    # for keys far from the bucket, and clamps outside it then too).
    low = (keys - base).clamp_(-1, 1 << 16).add_(1).reshape(-1)
    offset, below, up_to = _find_bin(torch.bincount(low, minlength=(1 << 16) + 2)[1:-1], k - before)
    return base + offset, before + below, before + up_to


def _find_bin(counts: torch.Tensor, k: int) -> tuple[int, int, int]:
    """The bin of a 2¹⁶-bin histogram holding the ``k``-th smallest value, and the counts before and up to it.

    Coarse to fine (256 x 256) on the host: a cumulative sum over all 2¹⁶ bins costs more than the rest.
    """
    rows = counts.view(256, 256)
    coarse = list(accumulate(rows.sum(dim=1).tolist()))
    row = bisect_left(coarse, k)
    before = coarse[row - 1] if row else 0
    fine = list(accumulate(rows[row].tolist(), initial=before))
    col = bisect_left(fine, k, lo=1) - 1
    return row * 256 + col, fine[col], fine[col + 1]


def mark_lowest_per_column(
    scores: torch.Tensor,
    k: int,
    out: torch.Tensor,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Set ``out`` to 1 at the ``k`` lowest scores of every column and 0 elsewhere; ties by row.

    For the few rows of an N:M group (SparseGPT selects one group at a time) the ranks come from all
    pairwise comparisons and one small matmul: a handful of float ops and no host synchronisation, faster
    than ``topk`` at this size. SparseGPT's scores are continuous, so its ties are rare. ``work`` may hold
    buffers of the scores' dtype for the comparisons (``[m, m, cols]``) and the ranks (``[m, cols]``), for
    a caller that selects many groups of the same shape.
    """
    m, cols = scores.shape
    if m > 16:
        return out.copy_(_lowest_k(scores.t(), k).t())
    weights, thresholds = _rank_weights(m, k, scores.dtype, scores.device)
    less, ranks = work if work is not None else (scores.new_empty(m, m, cols), scores.new_empty(m, cols))
    torch.lt(scores.unsqueeze(1), scores.unsqueeze(0), out=less)
    return torch.lt(torch.mm(weights, less.view(m * m, cols), out=ranks), thresholds, out=out)


@lru_cache
def _rank_weights(
    m: int, k: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W``, ``t`` such that ``W @ less < t`` marks the ``k`` lowest of ``m``, ``less[a, b] = s_a < s_b``.

    The rank of ``s_j`` (stable) is ``#{a > j: s_a < s_j} + #{a < j: s_a <= s_j}``, and
    ``s_a <= s_j`` is ``1 - less[j, a]``: so ``rank_j - j = Σ_{a>j} less[a, j] - Σ_{a<j} less[j, a]``.
    """
    weights = torch.zeros(m, m, m)
    for j in range(m):
        weights[j, j + 1 :, j] = 1.0
        weights[j, j, :j] = -1.0
    thresholds = k - torch.arange(m, dtype=torch.float32).unsqueeze(1)
    return weights.view(m, m * m).to(device, dtype), thresholds.to(device, dtype)


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive columns of each row, mask the ``m - n`` lowest scores.

    Selected with ``torch.topk``, the operator of both reference implementations, so that ties fall as
    they do there: quantized checkpoints hold many equal magnitudes, and the tie order alone moves the
    perplexity of magnitude 2:4 on the embedded model a lot (docs/benchmarks.md, "Magnitude 2:4 and
    tie-breaking"). The order is fixed for a given device and build, not across devices. ``topk`` is also
    faster on the CPU than ranking each group by pairwise comparisons.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not divisible by M={m}")
    groups = scores.reshape(-1, m)
    lowest = torch.topk(groups, m - n, dim=1, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    return mask.scatter_(1, lowest, True).view(rows, cols)


def select_mask(
    scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool = True
) -> torch.Tensor:
    """The mask a pattern selects from scores: N:M groups, else per row or per matrix."""
    if pattern.is_nm:
        return n_m_mask(scores, pattern.n, pattern.m)
    return lowest_per_row(scores, sparsity) if per_row else lowest_in_matrix(scores, sparsity)


def max_per_group(nonzero: torch.Tensor, m: int, dim: int = 1) -> int | None:
    """The most non-zeros in any group of ``m`` consecutive entries along dimension ``dim`` (1 or 0) of a
    2-D bool tensor: the smallest N for which it is N:M sparse; None if that width is not divisible by m."""
    rows, cols = nonzero.shape
    if nonzero.numel() == 0 or (cols if dim == 1 else rows) % m:
        return None
    ones = nonzero.contiguous().view(torch.uint8)  # summed as bytes: several times faster than bools
    grouped = ones.view(rows, cols // m, m) if dim == 1 else ones.view(rows // m, m, cols)
    counts = grouped.sum(dim=2 if dim == 1 else 1, dtype=torch.uint8 if m < 256 else torch.int32)
    return int(counts.max())


def n_m_violations(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool ``[rows, cols // m]``: True where a group of ``m`` consecutive inputs of a row holds more than
    ``n`` non-zeros (the groups ``n_m_mask`` prunes). ``cols`` must be divisible by ``m``."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not divisible by M={m}")
    return (weight.reshape(rows, cols // m, m) != 0).sum(dim=-1) > n
