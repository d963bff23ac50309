"""Statistics of a linear layer's inputs, accumulated over calibration tokens in fp32."""

from __future__ import annotations

import torch

from llmprune.methods import Statistic


class InputStatistics:
    """What the methods need about one input tensor, shared by every linear layer that reads it.

    ``input_norms``: Σ_t x_t² per input feature (Wanda). ``hessian``: (2/N) Σ_t x_t x_tᵀ (SparseGPT).
    Every ``stride``-th token is also kept to measure reconstruction error ||WX - W'X|| / ||WX|| later.
    """

    def __init__(self, width: int, statistic: Statistic, stride: int, device: torch.device) -> None:
        self.tokens = 0
        self.stride = max(1, stride)
        self.sq_norms = torch.zeros(width, device=device) if statistic == "input_norms" else None
        self.gram = torch.zeros(width, width, device=device) if statistic == "hessian" else None
        self._samples: list[torch.Tensor] = []
        self.prepared: dict = {}
        """Methods' preparations of the statistic (e.g. SparseGPT's factored Hessian), shared by readers."""

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if self.sq_norms is not None:
            self.sq_norms += x.square().sum(dim=0)  # several times faster than vector_norm(dim=0)
        if self.gram is not None:
            _add_upper_gram(self.gram, x)
        first = (-self.tokens) % self.stride
        self._samples.append(x[first :: self.stride].clone())
        self.tokens += x.shape[0]

    def statistic(self) -> torch.Tensor | None:
        """The tensor a method consumes: squared input norms, the Hessian, or None."""
        if self.sq_norms is not None:
            return self.sq_norms
        if self.gram is not None:
            upper = self.gram.triu()
            return (upper + upper.triu(1).t()) * (2.0 / max(self.tokens, 1))
        return None

    def samples(self) -> torch.Tensor:
        """The kept calibration tokens, ``[k, width]``."""
        return torch.cat(self._samples)


def _add_upper_gram(gram: torch.Tensor, x: torch.Tensor, block: int = 256) -> None:
    """gram += xᵀx on and above the diagonal only, in row blocks: about 60 % of the full product's work
    for wide inputs (the lower triangle is restored from the upper one when the Hessian is read)."""
    width = x.shape[1]
    for start in range(0, width, block):
        gram[start : start + block, start:].addmm_(x[:, start : start + block].t(), x[:, start:])


def relative_error(dense: torch.Tensor, pruned: torch.Tensor, samples: torch.Tensor) -> float:
    """||W X - W' X||_F / ||W X||_F over sample tokens (``samples`` is ``[k, in]``)."""
    reference = samples @ dense.t()
    difference = samples @ (dense - pruned).t()
    norm = torch.linalg.norm(reference)
    return float(torch.linalg.norm(difference) / norm) if norm > 0 else 0.0
