"""Statistics of a linear layer's inputs, summed over calibration batches so that the sum does not depend
on how the batches are shared among processes.

Each batch's contribution (Σ x², Σ x, the upper triangle of Σ x xᵀ) is computed on its own in fp32, from
zero, and added to float64 totals; processes all-reduce the float64 totals, and a total is rounded to fp32
once, when a method reads it. A float64 sum of a few fp32 values is exact, hence the same in any order,
whenever the values lie within about 2^26 of each other (53 − 24 bits, less a few bits of carries);
beyond that it is rounded at 2^-53 of the total, below fp32's resolution, so that the fp32 result can only
change if that error straddles an fp32 rounding boundary (a chance of the order of 2^-29 per such value).
With the same batches on every process count (``pruning.prune_model`` shares whole batches), the same
batch gives the same bits, and the pruned weights are bit-identical for 1, 2 or N processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from llmprune.pipeline.distributed import Communicator

Collected = Literal["none", "input_norms", "moments", "hessian"]
"""What ``InputStatistics`` accumulates besides the token count: nothing, Σx² (``input_norms``: Wanda),
Σx² and Σx (``moments``: structured unit scores), or Σ x xᵀ and Σx (``hessian``: SparseGPT, structured
re-fitting). All but ``moments`` are the ``Statistic`` a pruning method may declare."""

GRAM_BLOCK = 256
"""Rows per block of the upper-triangular Gram accumulator."""


class UpperGram:
    """Σ over batches of xᵀx on and above the diagonal, in float64: row blocks of the upper triangle, views
    into one flat buffer (one all-reduce). About w²/2 float64 values: the bytes of a full fp32 matrix.

    Each batch's block products are computed fresh in fp32 (about 60 % of the full product's work for wide
    inputs) and added to the float64 blocks; the lower triangle is restored when the matrix is read.
    """

    def __init__(self, width: int, device: torch.device, block: int = GRAM_BLOCK) -> None:
        self.width = width
        self.starts = list(range(0, width, block))
        shapes = [(min(block, width - start), width - start) for start in self.starts]
        self.buffer = torch.zeros(sum(r * c for r, c in shapes), dtype=torch.float64, device=device)
        self.blocks: list[torch.Tensor] = []
        offset = 0
        for rows, columns in shapes:
            self.blocks.append(self.buffer[offset : offset + rows * columns].view(rows, columns))
            offset += rows * columns

    def add(self, x: torch.Tensor) -> None:
        """Add xᵀx of one batch's tokens ``x`` (``[tokens, width]``, fp32)."""
        for start, block in zip(self.starts, self.blocks, strict=True):
            block += torch.mm(x[:, start : start + len(block)].t(), x[:, start:])

    def diagonal(self) -> torch.Tensor:
        """Σ x² per input, rounded to fp32."""
        return torch.cat([block[:, : len(block)].diagonal() for block in self.blocks]).float()

    def matrix(self, scale: float = 1.0) -> torch.Tensor:
        """``scale`` · Σ x xᵀ, symmetric, rounded to fp32 once: one new matrix and block-sized temporaries."""
        out = torch.empty(self.width, self.width, device=self.buffer.device)
        for start, block in zip(self.starts, self.blocks, strict=True):
            stop = start + len(block)
            rows = block.mul(scale).float()
            out[start:stop, start:] = rows
            out[stop:, start:stop] = rows[:, len(block) :].t()
            square = rows[:, : len(block)]
            upper = torch.ones_like(square, dtype=torch.bool).triu_()
            out[start:stop, start:stop] = torch.where(upper, square, square.t())
        return out


class InputStatistics:
    """What the per-layer steps need about one input tensor, shared by every linear layer that reads it.

    ``input_norms``: Σ_t x_t² per input feature (Wanda). ``hessian``: (2/N) Σ_t x_t x_tᵀ (SparseGPT), with
    Σ_t x_t. ``moments``: Σ_t x_t² and Σ_t x_t (structured scores: the inputs' means and variances).
    All are float64 totals of per-batch fp32 sums (see the module's docstring), rounded when read. With a
    ``stride``, every ``stride``-th token is also kept to measure reconstruction error ||WX - W'X|| / ||WX||
    later; ``offset`` is the index of this process's first token among all processes' (0 for a single
    process). Without one (None), no tokens are kept.
    """

    def __init__(
        self, width: int, statistic: Collected, stride: int | None, device: torch.device, offset: int = 0
    ) -> None:
        self.tokens = 0
        self.stride = None if stride is None else max(1, stride)
        self.offset = offset
        self.device = device
        self.reduced = False
        wide = {"dtype": torch.float64, "device": device}
        self.sq_norms = torch.zeros(width, **wide) if statistic in ("input_norms", "moments") else None
        self.gram = UpperGram(width, device) if statistic == "hessian" else None
        self.sums = torch.zeros(width, **wide) if statistic in ("hessian", "moments") else None
        """Σ_t x_t per feature (float64), with the Hessian or the moments (structured pruning)."""
        self._samples: list[torch.Tensor] = []
        self.prepared: dict = {}
        """Methods' preparations of the statistic (e.g. SparseGPT's factored Hessian), shared by readers."""

    def update(self, inputs: torch.Tensor) -> None:
        """Add one batch's inputs (``[..., width]``)."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if self.sq_norms is not None:
            self.sq_norms += x.square().sum(dim=0)  # several times faster than vector_norm(dim=0)
        if self.gram is not None:
            self.gram.add(x)
        if self.sums is not None:
            self.sums += x.sum(dim=0)
        if self.stride is not None:
            first = (-(self.offset + self.tokens)) % self.stride
            self._samples.append(x[first :: self.stride].clone())
        self.tokens += x.shape[0]

    def reduce(self, comm: Communicator) -> None:
        """Sum the statistics and token count over processes before use (later calls do nothing)."""
        if self.reduced:
            return
        self.reduced = True
        if comm.world_size == 1:
            return
        totals = [self.sq_norms, self.sums, None if self.gram is None else self.gram.buffer]
        for tensor in totals:
            if tensor is not None:
                comm.all_reduce(tensor)
        tokens = torch.tensor([self.tokens], dtype=torch.int64, device=self.device)
        comm.all_reduce(tokens)
        self.tokens = int(tokens)

    def statistic(self) -> torch.Tensor | None:
        """The fp32 tensor a method consumes: squared input norms, the Hessian, or None."""
        if self.sq_norms is not None:
            return self.sq_norms.float()
        if self.gram is not None:
            return self.gram.matrix(2.0 / max(self.tokens, 1))
        return None

    def energy(self) -> torch.Tensor:
        """Σ_t x_t² per input, fp32 (from the Gram matrix's diagonal when that is what is kept)."""
        return self.sq_norms.float() if self.sq_norms is not None else self.gram.diagonal()

    def gram_matrix(self) -> torch.Tensor:
        """Σ_t x_t x_tᵀ, symmetric, fp32 (the Hessian without its 2/N)."""
        return self.gram.matrix()

    def samples(self) -> torch.Tensor:
        """The kept calibration tokens, ``[k, width]``."""
        return torch.cat(self._samples)

    def sample_batches(self) -> list[torch.Tensor]:
        """The kept calibration tokens, one ``[k_b, width]`` tensor per batch."""
        return list(self._samples)


def error_terms(
    dense: torch.Tensor, pruned: torch.Tensor, samples: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """``[||W X - W' X||², ||W X||²]`` over sample tokens (``samples``: ``[k, in]``, or one such tensor per
    batch), float64: sums over batches of each batch's fp32 terms, so that the terms of several processes'
    batches add up to those of one process (to the bit, as the statistics)."""
    difference = dense - pruned
    terms = torch.zeros(2, dtype=torch.float64, device=dense.device)
    for batch in [samples] if isinstance(samples, torch.Tensor) else samples:
        norms = torch.stack([torch.linalg.norm(batch @ difference.t()), torch.linalg.norm(batch @ dense.t())])
        terms += norms.double().square()
    return terms


def error_from_terms(terms: torch.Tensor) -> float:
    """||W X - W' X||_F / ||W X||_F from ``error_terms`` (0 when there is no signal)."""
    difference, reference = terms.tolist()
    return math.sqrt(difference / reference) if reference > 0 else 0.0
