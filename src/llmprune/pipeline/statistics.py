"""Statistics of a linear layer's inputs, accumulated over calibration tokens in fp32."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from llmprune.methods import Statistic

if TYPE_CHECKING:
    from llmprune.pipeline.distributed import Communicator


class InputStatistics:
    """What the methods need about one input tensor, shared by every linear layer that reads it.

    ``input_norms``: Σ_t x_t² per input feature (Wanda). ``hessian``: (2/N) Σ_t x_t x_tᵀ (SparseGPT).
    Every ``stride``-th token is also kept to measure reconstruction error ||WX - W'X|| / ||WX|| later;
    ``offset`` is the index of this process's first token among all processes' (0 for a single process).
    """

    def __init__(
        self, width: int, statistic: Statistic, stride: int, device: torch.device, offset: int = 0
    ) -> None:
        self.tokens = 0
        self.stride = max(1, stride)
        self.offset = offset
        self.device = device
        self.reduced = False
        self.sq_norms = torch.zeros(width, device=device) if statistic == "input_norms" else None
        self.gram = torch.zeros(width, width, device=device) if statistic == "hessian" else None
        self.sums = torch.zeros(width, device=device) if statistic == "hessian" else None
        """Σ_t x_t per feature, with the Hessian (structured pruning: means and variances)."""
        self._samples: list[torch.Tensor] = []
        self.prepared: dict = {}
        """Methods' preparations of the statistic (e.g. SparseGPT's factored Hessian), shared by readers."""

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if self.sq_norms is not None:
            self.sq_norms += x.square().sum(dim=0)  # several times faster than vector_norm(dim=0)
        if self.gram is not None:
            _add_upper_gram(self.gram, x)
            self.sums += x.sum(dim=0)
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
        for tensor in (self.sq_norms, self.gram, self.sums):
            if tensor is not None:
                comm.all_reduce(tensor)
        tokens = torch.tensor([self.tokens], dtype=torch.int64, device=self.device)
        comm.all_reduce(tokens)
        self.tokens = int(tokens)

    def statistic(self) -> torch.Tensor | None:
        """The tensor a method consumes: squared input norms, the Hessian, or None."""
        if self.sq_norms is not None:
            return self.sq_norms
        if self.gram is not None:
            return self.gram_matrix().mul_(2.0 / max(self.tokens, 1))
        return None

    def gram_matrix(self) -> torch.Tensor:
        """Σ_t x_t x_tᵀ, symmetric (the Hessian without its 2/N): one new matrix, no other temporaries."""
        width = self.gram.shape[0]
        upper = torch.ones(width, width, dtype=torch.bool, device=self.gram.device).triu_()
        return torch.where(upper, self.gram, self.gram.t())

    def samples(self) -> torch.Tensor:
        """The kept calibration tokens, ``[k, width]``."""
        return torch.cat(self._samples)


def _add_upper_gram(gram: torch.Tensor, x: torch.Tensor, block: int = 256) -> None:
    """gram += xᵀx on and above the diagonal only, in row blocks: about 60 % of the full product's work
    for wide inputs (the lower triangle is restored from the upper one when the Hessian is read)."""
    width = x.shape[1]
    for start in range(0, width, block):
        gram[start : start + block, start:].addmm_(x[:, start : start + block].t(), x[:, start:])


def error_terms(dense: torch.Tensor, pruned: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """``[||W X - W' X||², ||W X||²]`` over sample tokens (``samples`` is ``[k, in]``): sums over tokens,
    so the terms of several processes' samples add up."""
    reference = samples @ dense.t()
    difference = samples @ (dense - pruned).t()
    return torch.stack([torch.linalg.norm(difference), torch.linalg.norm(reference)]).square()


def error_from_terms(terms: torch.Tensor) -> float:
    """||W X - W' X||_F / ||W X||_F from ``error_terms`` (0 when there is no signal)."""
    difference, reference = terms.tolist()
    return math.sqrt(difference / reference) if reference > 0 else 0.0


def relative_error(dense: torch.Tensor, pruned: torch.Tensor, samples: torch.Tensor) -> float:
    """||W X - W' X||_F / ||W X||_F over sample tokens (``samples`` is ``[k, in]``)."""
    return error_from_terms(error_terms(dense, pruned, samples))
