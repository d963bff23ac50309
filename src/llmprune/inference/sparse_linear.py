"""``SparseLinear``: a linear layer that keeps only its weight's kept values and bitmask (``cpu_kernels``).

It replaces an ``nn.Linear`` (or GPT-2's ``Conv1D``, whose ``[in, out]`` weight is stored transposed) in a
model served on the CPU. A few tokens at a time (decoding) run the sparse kernel. More (prefill) run, with
AVX-512 and a large enough float32 weight, the many-token kernel, which multiplies each kept weight into a
block of tokens at once and so does only the kept weights' work; otherwise they expand the weight into a
scratch buffer shared by all layers and run torch's dense matmul. A float32 weight is expanded a panel of
rows at a time, small enough to stay in the CPU's last-level cache while torch multiplies it (measured
faster than the dense layer itself, which reads its weight from memory), but never fewer rows than make
an efficient matmul: each panel re-reads all the inputs, and panels of wide weights (many inputs) cut to
the byte size alone are too thin and lose.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.inference.cpu_kernels import (
    BitmaskWeight,
    from_dense,
    has_many_tokens_kernel,
    multiply,
    multiply_many,
    row_block,
    to_dense,
)
from llmprune.models.packing import dtype_name

SPARSE_TOKENS = 16
"""Up to this many tokens in one call run the sparse kernel; more run the many-token kernel (AVX-512) or
expand the weight and run dense."""
MANY_MIN_WEIGHTS = 1 << 21
"""Weights smaller than this expand for many tokens even where the many-token kernel runs: they stay in
the cache, where torch's matmul on them ran faster than the kernel."""
MANY_MAX_DENSITY = 0.6
"""Denser weights expand for many tokens: the kernel's work grows with the kept weights, the expanded
matmul's does not (at 512 tokens the two were even at 40 % sparsity, expanding ahead at 30 %)."""
PANEL_BYTES = 4 << 20
"""The size of one expanded panel of rows in prefill (see the module docstring), unless that is fewer
than ``PANEL_MIN_ROWS`` rows."""
PANEL_MIN_ROWS = 256
"""The fewest rows in a panel: each panel re-reads all the inputs, so thin ones cost more than they save."""
BREAK_EVEN_SPARSITY = 0.3
"""Below this sparsity a layer gains too little from the kernels and stays dense."""


def too_dense(sparsity: float) -> str | None:
    """Why a layer of this sparsity stays dense (None: it is sparse enough for the kernels)."""
    if sparsity < BREAK_EVEN_SPARSITY:
        return f"sparsity {sparsity:.0%} is below the kernels' break-even of {BREAK_EVEN_SPARSITY:.0%}"
    return None


def panel_rows(weight: BitmaskWeight) -> int:
    """Rows expanded at a time for many tokens: all of them (bfloat16), or a panel of ``PANEL_BYTES``
    and at least ``PANEL_MIN_ROWS`` rows (float32)."""
    if weight.dtype is not torch.float32:
        return weight.rows
    return min(weight.rows, max(PANEL_MIN_ROWS, PANEL_BYTES // (weight.cols * weight.values.element_size())))


_scratch = threading.local()


def _scratch_for(count: int, dtype: torch.dtype) -> torch.Tensor:
    """One dense buffer per thread and dtype, grown to the largest layer expanded so far."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < count:
        buffer = buffers[dtype] = torch.empty(count, dtype=dtype)
    return buffer


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a ``BitmaskWeight`` (its tensors are buffers of this module)."""

    def __init__(self, weight: BitmaskWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.cols, weight.rows
        self.register_buffer("values", weight.values)
        self.register_buffer("mask", weight.mask)
        self.register_buffer("offsets", weight.offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SparseLinear:
        """From a dense ``[out, in]`` weight (its zeros are dropped)."""
        return cls(from_dense(weight), bias)

    @property
    def weight_layout(self) -> BitmaskWeight:
        return BitmaskWeight(self.out_features, self.in_features, self.values, self.mask, self.offsets)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.weight_layout.density

    def dense_weight(self) -> torch.Tensor:
        """The weight as a new dense ``[out, in]`` tensor."""
        return to_dense(self.weight_layout).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        few = flat.shape[0] <= SPARSE_TOKENS
        if few or self.uses_many_tokens_kernel():
            kernel = multiply if few else multiply_many
            y = kernel(self.values, self.mask, self.offsets, flat, self.out_features)
            if self.bias is not None:
                y += self.bias
        else:
            y = self._expanded(flat)
        if y.dtype is not x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def uses_many_tokens_kernel(self) -> bool:
        """Whether many tokens run the many-token kernel rather than expand: float32 weights of at least
        ``MANY_MIN_WEIGHTS`` entries and at most ``MANY_MAX_DENSITY``, with AVX-512 (torch's own bfloat16
        matmul, on AMX or bf16 instructions where the CPU has them, was far faster than the kernel)."""
        if self.in_features * self.out_features < MANY_MIN_WEIGHTS or self.values.dtype is not torch.float32:
            return False
        return self.weight_layout.density <= MANY_MAX_DENSITY and has_many_tokens_kernel()

    def _expanded(self, flat: torch.Tensor) -> torch.Tensor:
        """Many tokens: torch's matmul on the weight expanded whole or a panel of rows at a time."""
        layout = self.weight_layout
        flat = flat.to(layout.dtype)
        bias = None if self.bias is None else self.bias.to(layout.dtype)
        panel = panel_rows(layout)
        scratch = _scratch_for(panel * layout.cols, layout.dtype)
        if panel == layout.rows:
            return F.linear(flat, to_dense(layout, scratch), bias)
        y = torch.empty(flat.shape[0], layout.rows, dtype=layout.dtype)
        for first in range(0, layout.rows, panel):
            last = min(layout.rows, first + panel)
            y[:, first:last] = F.linear(flat, to_dense(row_block(layout, first, last), scratch),
                                        None if bias is None else bias[first:last])
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"sparsity={self.sparsity:.3f}, dtype={dtype_name(self.values.dtype)}, "
            f"bias={self.bias is not None}"
        )
