"""``SparseLinear``: a linear layer that keeps only its weight's kept values and bitmask (``cpu_kernels``).

It replaces an ``nn.Linear`` (or GPT-2's ``Conv1D``, whose ``[in, out]`` weight is stored transposed) in a
model served on the CPU. A few tokens at a time (decoding) run the sparse kernel. More (prefill) run, where it
was measured faster (``MANY_TOKENS_LIMITS``), the many-token kernel, which multiplies each kept weight into
a block of tokens at once and so does only the kept weights' work; otherwise they expand the weight into a
scratch buffer shared by all layers and run torch's dense matmul. A float32 weight is expanded a panel of
rows at a time, small enough to stay in the CPU's last-level cache while torch multiplies it (measured
faster than the dense layer itself, which reads its weight from memory), but never fewer rows than make
an efficient matmul: each panel re-reads all the inputs, and panels of wide weights (many inputs) cut to
the byte size alone are too thin and lose. bfloat16 weights on a CPU with AMX run ``AMX_TOKENS`` tokens on
the AMX kernel (``cpu_kernels.multiply_amx``), which expands a panel of rows at a time into the cache; on a
CPU with AVX-512 BF16 and no AMX, ``DPBF16_TOKENS`` tokens run the same on ``vdpbf16ps``
(``cpu_kernels.multiply_dpbf16``).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.inference.cpu_kernels import (
    BitmaskWeight,
    Bound,
    amx_available,
    bind,
    dpbf16_available,
    from_dense,
    isa,
    multiply,
    multiply_amx,
    multiply_bound,
    multiply_dpbf16,
    multiply_many,
    row_block,
    to_dense,
    torch_bfloat16_isa,
)
from llmprune.models.packing import dtype_name

SPARSE_TOKENS = 16
"""Up to this many tokens in one call run the sparse kernel; more run the many-token kernel or expand the
weight and run dense (``SparseLinear.path``)."""
AVX512_SPARSE_TOKENS = 32
"""With AVX-512, float32 weights that the many-token kernel does not take run the sparse kernel up to this
many tokens: there it was ahead of expanding (on AVX2 and for bfloat16 weights it was not, past 16)."""
MANY_TOKENS_LIMITS: dict[tuple[str, torch.dtype], tuple[int, float]] = {
    ("avx512", torch.float32): (1 << 21, 0.6),
    ("avx512", torch.bfloat16): (0, 1.0),
    ("avx2", torch.float32): (0, 1.0),
    ("avx2", torch.bfloat16): (0, 1.0),
}
"""Which weights run more than ``SPARSE_TOKENS`` tokens through the many-token kernel rather than expand,
by the kernels' instruction set and the values' dtype: those of at least this many entries and at most
this density (as measured against expanding, docs/benchmarks.md). With AVX-512, smaller float32 weights
stay in the cache, where torch's matmul on them was faster, and at 30 % sparsity expanding was ahead
(the kernel's work grows with the kept weights, the expanded matmul's does not). bfloat16 weights expand
wherever torch's bfloat16 matmul runs on bfloat16 dot products (``torch_bfloat16_isa``: AMX, or AVX-512
BF16 as on AMD Zen 4), which do twice the work per instruction of the kernel's float32 FMAs."""
PANEL_BYTES = 4 << 20
"""The size of one expanded panel of rows in prefill (see the module docstring), unless that is fewer
than ``PANEL_MIN_ROWS`` rows."""
PANEL_MIN_ROWS = 256
"""The fewest rows in a panel: each panel re-reads all the inputs, so thin ones cost more than they save."""
AMX_TOKENS = (5, 128)
"""bfloat16 weights on a CPU with AMX (``amx_available``) run this many tokens (inclusive) on the AMX kernel:
at 4 tokens the sparse kernel was as fast, at 256 the AMX kernel fell to expanding's speed, well below torch's
AMX matmul on the dense weight (docs/benchmarks.md)."""
DPBF16_TOKENS = (5, 192)
"""bfloat16 weights on a CPU with AVX-512 BF16 but no AMX (``dpbf16_available``) run this many tokens on the
AVX-512 BF16 kernel: measured on AMD Zen 4, the sparse kernel was ahead at 4 tokens, expanding at 512
(docs/benchmarks.md)."""
SPARSE_KERNEL, MANY_TOKENS_KERNEL, EXPAND = "sparse kernel", "many-token kernel", "expand + dense"
AMX_KERNEL, DPBF16_KERNEL = "AMX kernel", "AVX-512 BF16 kernel"
"""``SparseLinear.path``: what multiplies a call's tokens."""
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
        if x.dtype is torch.float32 and x.numel() <= SPARSE_TOKENS * self.in_features and x.is_contiguous():
            bound = self._bound()  # decoding: the fewest tensor reads (see cpu_kernels.Bound)
            if bound.usable and x.shape[-1] == bound.cols:
                y = torch.empty(*x.shape[:-1], self.out_features)
                multiply_bound(bound, x, y)
                bias = self._buffers["bias"]
                if bias is not None:
                    y += bias
                return y
        flat = x.reshape(-1, self.in_features)
        path = self.path(flat.shape[0])
        if path == EXPAND:
            y = self._expanded(flat)
        else:
            kernels = {SPARSE_KERNEL: multiply, MANY_TOKENS_KERNEL: multiply_many, AMX_KERNEL: multiply_amx,
                       DPBF16_KERNEL: multiply_dpbf16}
            kernel = kernels[path]
            y = kernel(self.values, self.mask, self.offsets, flat, self.out_features)
            if self.bias is not None:
                y += self.bias
        if y.dtype is not x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _bound(self) -> Bound:
        buffers = self._buffers
        values, mask, offsets = buffers["values"], buffers["mask"], buffers["offsets"]
        bound = self.__dict__.get("_bound_weight")
        if bound is None or not bound.holds(values, mask, offsets):
            bound = bind(values, mask, offsets, self.out_features, self.in_features)
            self.__dict__["_bound_weight"] = bound
        return bound

    def path(self, tokens: int) -> str:
        """What multiplies this many tokens in one call: ``SPARSE_KERNEL``, ``MANY_TOKENS_KERNEL``,
        ``AMX_KERNEL``, ``DPBF16_KERNEL`` or ``EXPAND`` (torch's matmul on the expanded weight)."""
        if self.values.dtype is torch.bfloat16:  # a panel kernel: AMX where it runs, else AVX-512 BF16
            panels = (AMX_KERNEL, AMX_TOKENS) if amx_available() else (
                (DPBF16_KERNEL, DPBF16_TOKENS) if dpbf16_available() else None)
            if panels is not None and panels[1][0] <= tokens <= panels[1][1]:
                return panels[0]
        if tokens <= SPARSE_TOKENS:
            return SPARSE_KERNEL
        if self.uses_many_tokens_kernel():
            return MANY_TOKENS_KERNEL
        if tokens <= AVX512_SPARSE_TOKENS and self.values.dtype is torch.float32 and isa() == "avx512":
            return SPARSE_KERNEL
        return EXPAND

    def probe_tokens(self) -> tuple[int, ...]:
        """One token count for each path this layer takes (``path``), the first of a few around the limits
        between them: what a check of the layer against its dense weight runs to cover every kernel."""
        counts = (SPARSE_TOKENS, AVX512_SPARSE_TOKENS + 1, AMX_TOKENS[0] - 1, AMX_TOKENS[1] + 1,
                  DPBF16_TOKENS[0] - 1, DPBF16_TOKENS[1] + 1)
        probes: dict[str, int] = {}
        for tokens in counts:
            probes.setdefault(self.path(tokens), tokens)
        return tuple(probes.values())

    def uses_many_tokens_kernel(self) -> bool:
        """Whether more than ``SPARSE_TOKENS`` tokens run the many-token kernel rather than expand (see
        ``MANY_TOKENS_LIMITS``)."""
        limits = MANY_TOKENS_LIMITS.get((isa(), self.values.dtype))
        if limits is None or self.in_features * self.out_features < limits[0]:
            return False
        if self.values.dtype is torch.bfloat16 and torch_bfloat16_isa() is not None:
            return False
        return self.weight_layout.density <= limits[1]

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
