"""Sparse linear kernels for CPUs: a weight as its kept values plus a bitmask, multiplied without the zeros.

A ``[rows, cols]`` weight is held as ``BitmaskWeight``: the non-zeros row by row (``values``, float32 or
bfloat16, followed by ``PAD`` zeros so a vector load may run past the last row), one bit per weight
(``mask``: ``[rows, row_bytes]`` uint8, bit ``j`` of row ``r`` at byte ``j // 8``, bit ``j % 8``, as the
compressed checkpoints store it; rows padded to whole 64-bit words) and where each row's values start
(``offsets``, int64 ``[rows + 1]``). N:M weights use the same layout (the mask marks the N kept positions
of each group: for 2:4 as many bytes as the 2-bit positions), so one kernel serves unstructured and any N:M.

The multiplication (``matmul``) and the expansion back to a dense matrix (``to_dense``) run in
``llmprune._sparse_cpu`` (C, ``csrc/sparse_cpu.c``): one code path per instruction set, picked at run time
from the CPU's features (AVX-512 with VBMI2's expand instructions, AVX2 + FMA, portable C), or forced with
``LLMPRUNE_CPU_KERNEL=avx512|avx2|portable``; threads over output rows, as many as
``torch.get_num_threads()``, on the OpenMP team torch itself runs on (whose threads are already awake
after torch's operators) or, without one or with ``LLMPRUNE_CPU_THREADS=pool``, on a pthread pool of
the module's own. Memory traffic per weight falls from 4 bytes (float32) to
``4 * density + 1/8``: decoding a few tokens, which reads every weight once per token, speeds up by as much.
For many tokens (prefill), ``multiply_many`` multiplies each kept weight into a block of tokens at once, so
its work is the kept weights' alone (vector kernels with AVX-512 and AVX2; the portable C one serves checks).
On CPUs with AMX, ``multiply_amx`` multiplies bfloat16 weights on the tiles, expanding a panel of rows at a
time into the cache (``LLMPRUNE_CPU_AMX=0`` turns it off; it runs only where the AVX-512 path does);
``multiply_dpbf16`` does the same with AVX-512 BF16's ``vdpbf16ps`` (AMD Zen 4 and later, Intel from Cooper
Lake; ``LLMPRUNE_CPU_DPBF16=0`` turns it off).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmprune.errors import UsageError

PAD = 64
"""Zero values after the last row: the kernels may load a full vector past a row's last value."""
ISA_VARIABLE = "LLMPRUNE_CPU_KERNEL"
ISAS = ("avx512", "avx2", "portable")
THREADS_VARIABLE = "LLMPRUNE_CPU_THREADS"
THREAD_BACKENDS = ("openmp", "pool")
AMX_VARIABLE = "LLMPRUNE_CPU_AMX"
DPBF16_VARIABLE = "LLMPRUNE_CPU_DPBF16"
VALUE_DTYPES = (torch.float32, torch.bfloat16)
REINSTALL = "pip install --force-reinstall --no-deps -e ."


@dataclass
class BitmaskWeight:
    """A ``[rows, cols]`` weight in the kernels' layout (see the module docstring)."""

    rows: int
    cols: int
    values: torch.Tensor
    mask: torch.Tensor
    offsets: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.rows * self.cols)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.mask, self.offsets))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.values, self.mask, self.offsets


def row_bytes(cols: int) -> int:
    """Bytes of one row of the mask: whole 64-bit words."""
    return 8 * math.ceil(cols / 64)


def _from_bits(bits: torch.Tensor, values: torch.Tensor) -> BitmaskWeight:
    """The layout from a bool ``[rows, cols]`` mask and the values it marks (row-major, 1-D)."""
    rows, cols = bits.shape
    padded = torch.zeros(rows, row_bytes(cols) * 8, dtype=torch.bool)
    padded[:, :cols] = bits
    mask = torch.from_numpy(np.packbits(padded.numpy(), axis=1, bitorder="little"))
    counts = bits.sum(dim=1, dtype=torch.int64)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    stored = torch.zeros(values.numel() + PAD, dtype=values.dtype)
    stored[: values.numel()] = values
    return BitmaskWeight(rows, cols, stored, mask, offsets)


def from_dense(weight: torch.Tensor) -> BitmaskWeight:
    """The layout of a dense ``[rows, cols]`` float32 or bfloat16 weight: its non-zeros and their bits."""
    if weight.dim() != 2 or weight.dtype not in VALUE_DTYPES:
        raise ValueError(f"expected a float32 or bfloat16 matrix, got {tuple(weight.shape)} {weight.dtype}")
    weight = weight.detach().cpu().contiguous()
    native = _native()
    if native is None:
        bits = weight != 0
        return _from_bits(bits, weight[bits])
    rows, cols = weight.shape
    mask = torch.empty(rows, row_bytes(cols), dtype=torch.uint8)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    code = _code(weight.dtype)
    native.mask_of(weight.data_ptr(), rows, cols, code, mask.data_ptr(), offsets.data_ptr() + 8, threads())
    torch.cumsum(offsets[1:], 0, out=offsets[1:])
    values = torch.zeros(int(offsets[-1]) + PAD, dtype=weight.dtype)
    native.gather(weight.data_ptr(), mask.data_ptr(), offsets.data_ptr(), values.data_ptr(), rows, cols, code,
                  threads())
    return BitmaskWeight(rows, cols, values, mask, offsets)


def to_dense(weight: BitmaskWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``[rows, cols]`` matrix, written into ``out`` (any tensor of at least that many elements
    of the values' dtype) when given."""
    count = weight.rows * weight.cols
    if out is None:
        out = torch.empty(count, dtype=weight.dtype)
    dense = out.reshape(-1)[:count].view(weight.rows, weight.cols)
    native = _native()
    if native is None:
        bits = _bits(weight)
        dense.zero_()
        dense[bits] = weight.values[int(weight.offsets[0]) : weight.nnz]
        return dense
    native.to_dense(*_pointers(weight), dense.data_ptr(), weight.rows, weight.cols, _code(weight.dtype),
                    threads())
    return dense


def row_block(weight: BitmaskWeight, first: int, last: int) -> BitmaskWeight:
    """Rows ``first .. last - 1`` of a weight, as a view (the offsets still index the whole values)."""
    return BitmaskWeight(last - first, weight.cols, weight.values, weight.mask[first:last],
                         weight.offsets[first : last + 1])


def matmul(weight: BitmaskWeight, x: torch.Tensor) -> torch.Tensor:
    """``x @ dense(weight).T`` for ``x`` ``[tokens, cols]`` (float32 or bfloat16, any strides), in
    float32 ``[tokens, rows]`` (accumulated in float32)."""
    if x.dim() != 2 or x.shape[1] != weight.cols:
        raise ValueError(f"expected [tokens, {weight.cols}] inputs, got {tuple(x.shape)}")
    return multiply(weight.values, weight.mask, weight.offsets, x, weight.rows)


def multiply(
    values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor, rows: int
) -> torch.Tensor:
    """``matmul`` on a weight's tensors, unchecked: the per-token path of ``SparseLinear``, kept short
    because a decoding step calls it for every linear layer."""
    native = _MODULE if _LOADED else _native()
    if native is None:
        dense = to_dense(BitmaskWeight(rows, x.shape[1], values, mask, offsets))
        return x.to(torch.float32) @ dense.to(torch.float32).T
    return _multiply_with(native, values, mask, offsets, x, rows)


def _multiply_with(native, values, mask, offsets, x, rows) -> torch.Tensor:
    cols, width = x.shape[1], 8 * mask.shape[1]  # the kernels read inputs for whole mask words
    if width != cols:
        x = F.pad(x.to(torch.float32), (0, width - cols))
    elif x.dtype is not torch.float32 or x.stride(1) != 1:
        x = x.to(torch.float32).contiguous()
    tokens = x.shape[0]
    out = torch.empty(tokens, rows)
    native.matmul(values.data_ptr(), mask.data_ptr(), offsets.data_ptr(), x.data_ptr(), x.stride(0),
                  out.data_ptr(), rows, cols, tokens, _CODES[values.dtype], torch.get_num_threads())
    return out


@dataclass(frozen=True, slots=True)
class Bound:
    """A weight's tensors and what ``multiply_bound`` passes of them, read once: a decoding step calls the
    kernel for every linear layer, and after each one has streamed its weight through the caches, every
    tensor attribute read in Python costs memory accesses (measured: tens of microseconds a call)."""

    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    pointers: tuple[int, int, int]
    rows: int
    cols: int
    code: int
    usable: bool
    """Whether ``multiply_bound`` may run: the compiled module is there and rows of ``cols`` inputs are whole
    mask words (else ``multiply`` pads them)."""

    def holds(self, values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor) -> bool:
        """Whether these are still its tensors, where they were (a deep copy holds copies of them)."""
        mine = self.tensors
        same = mine[0] is values and mine[1] is mask and mine[2] is offsets
        return same and values.data_ptr() == self.pointers[0]


def bind(values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, rows: int, cols: int) -> Bound:
    """``Bound`` of a weight's tensors, for ``multiply_bound``."""
    usable = _native() is not None and 8 * mask.shape[1] == cols
    pointers = (values.data_ptr(), mask.data_ptr(), offsets.data_ptr())
    return Bound((values, mask, offsets), pointers, rows, cols, _CODES[values.dtype], usable)


def multiply_bound(bound: Bound, x: torch.Tensor, out: torch.Tensor) -> None:
    """``multiply`` into ``out`` (float32, ``[..., rows]``) for contiguous float32 ``x`` (``[..., cols]``),
    unchecked: ``bound.usable`` must hold."""
    native = _MODULE if _LOADED else _native()
    native.matmul(*bound.pointers, x.data_ptr(), bound.cols, out.data_ptr(), bound.rows, bound.cols,
                   x.numel() // bound.cols, bound.code, torch.get_num_threads())


def torch_bfloat16_isa() -> str | None:
    """The bfloat16 dot-product instructions torch's bfloat16 matmul runs on here (oneDNN): ``"amx"``
    (tiles), ``"avx512_bf16"`` (``vdpbf16ps``), or None where it has neither and converts to float32, as
    the CPU reports them and unless ``ONEDNN_MAX_CPU_ISA`` caps them away."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    uncapped = not cap or cap in ("ALL", "DEFAULT")
    # private probes of torch's: where one is absent, assume the CPU lacks what it checks
    for name, probe, cap_names in (
        ("amx", "_is_amx_tile_supported", ("AMX",)),
        ("avx512_bf16", "_is_avx512_bf16_supported", ("AMX", "BF16", "FP16", "AVX10")),
    ):
        supported = getattr(torch.cpu, probe, None)
        if supported is not None and supported() and (uncapped or any(part in cap for part in cap_names)):
            return name
    return None


def amx_available() -> bool:
    """Whether ``multiply_amx`` runs here: the compiled module has the AMX kernel, the CPU and the OS let
    this process use the tiles, the AVX-512 path is the one selected, and ``LLMPRUNE_CPU_AMX`` is not 0."""
    return _panels_available(AMX_VARIABLE, "amx")


def dpbf16_available() -> bool:
    """Whether ``multiply_dpbf16`` runs here: as ``amx_available`` for AVX-512 BF16 and
    ``LLMPRUNE_CPU_DPBF16``."""
    return _panels_available(DPBF16_VARIABLE, "avx512_bf16")


def _panels_available(variable: str, engine: str) -> bool:
    native = _native()
    if native is None or os.environ.get(variable, "").strip() == "0":
        return False
    return native.selected() == "avx512" and engine in _panel_engines(native)


@functools.cache
def _panel_engines(native) -> tuple[str, ...]:
    """What the CPU and OS let this process run of ``PANEL_ENGINES`` (asked once: ``path`` asks per call)."""
    return tuple(native.panel_engines())


def multiply_amx(
    values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor, rows: int
) -> torch.Tensor:
    """``multiply`` for bfloat16 values on AMX tiles (``amx_available`` must hold), the inputs rounded to
    bfloat16 (what a bfloat16 model's are); float32 ``[tokens, rows]``."""
    return _multiply_panels_with(_native(), "amx", values, mask, offsets, x, rows)


def multiply_dpbf16(
    values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor, rows: int
) -> torch.Tensor:
    """``multiply_amx`` on AVX-512 BF16 (``dpbf16_available`` must hold)."""
    return _multiply_panels_with(_native(), "avx512_bf16", values, mask, offsets, x, rows)


PANEL_ENGINES = ("amx", "avx512_bf16")
"""The engines of the compiled module's bfloat16 panel kernel (``matmul_panels``), by its codes."""


def _multiply_panels_with(native, engine: str, values, mask, offsets, x, rows) -> torch.Tensor:
    """The compiled bfloat16 panel kernel on ``engine`` (one of ``PANEL_ENGINES``)."""
    x = x.to(torch.bfloat16)
    if x.stride(1) != 1:
        x = x.contiguous()
    tokens, cols = x.shape
    packed = torch.empty(native.bf16_packed_size(tokens, cols), dtype=torch.bfloat16)
    out = torch.empty(tokens, rows)
    native.matmul_panels(PANEL_ENGINES.index(engine), values.data_ptr(), mask.data_ptr(), offsets.data_ptr(),
                         x.data_ptr(), x.stride(0), packed.data_ptr(), out.data_ptr(), rows, cols, tokens,
                         torch.get_num_threads())
    return out


def multiply_many(
    values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor, rows: int
) -> torch.Tensor:
    """``multiply`` for many tokens (prefill): each kept weight against a block of tokens at once (see
    ``matmul_many`` in ``csrc/sparse_cpu.c``), from inputs packed here; float32 ``[tokens, rows]``."""
    native = _native()
    if native is None:
        return multiply(values, mask, offsets, x, rows)
    return _multiply_many_with(native, values, mask, offsets, x, rows)


def many_blocks(tokens: int, wide: int, *tails: int) -> list[tuple[int, int, int]]:
    """How ``multiply_many`` packs this many tokens: ``(first, last, tokens per block)`` for the blocks of
    ``wide`` tokens, then for one last block of the narrowest of ``tails`` (ascending) that holds all the
    tokens left, if one does (a short prompt, or a prompt's tail, then pays a narrower block rather than a
    wide one's padding)."""
    rest = tokens % wide
    tail = next((width for width in tails if rest <= width), None) if rest else None
    if tail is None:
        return [(0, tokens, wide)]
    if tokens == rest:
        return [(0, tokens, tail)]
    return [(0, tokens - rest, wide), (tokens - rest, tokens, tail)]


def _multiply_many_with(native, values, mask, offsets, x, rows) -> torch.Tensor:
    tokens, cols = x.shape
    width = 8 * mask.shape[1]
    wide, *tails = native.many_blocks()
    parts = [(first, last, block, -(-(last - first) // block)) for first, last, block in
             many_blocks(tokens, wide, *tails)]
    packed = torch.zeros(sum(blocks * block for *_, block, blocks in parts) * width)
    start = 0
    for first, last, block, blocks in parts:
        # [blocks, width, block]: column j of a block holds input j of its tokens; padding zero
        by_token = packed[start : start + blocks * block * width].view(blocks, width, block).transpose(1, 2)
        start += blocks * block * width
        whole = (last - first) // block * block
        by_token[: whole // block, :, :cols].copy_(x[first : first + whole].reshape(-1, block, cols))
        if whole < last - first:
            by_token[-1, : last - first - whole, :cols].copy_(x[first + whole : last])
    tail = parts[-1][2] if parts[-1][2] != wide else 0  # the kernel reads the layout from it
    out = torch.empty(tokens, rows)
    native.matmul_many(values.data_ptr(), mask.data_ptr(), offsets.data_ptr(), packed.data_ptr(),
                       out.data_ptr(), rows, cols, tokens, tail, _CODES[values.dtype],
                       torch.get_num_threads())
    return out


def _bits(weight: BitmaskWeight) -> torch.Tensor:
    bits = np.unpackbits(weight.mask.numpy(), axis=1, bitorder="little")[:, : weight.cols]
    return torch.from_numpy(bits).view(torch.bool)


def _pointers(weight: BitmaskWeight) -> tuple[int, int, int]:
    return weight.values.data_ptr(), weight.mask.data_ptr(), weight.offsets.data_ptr()


_CODES = {dtype: code for code, dtype in enumerate(VALUE_DTYPES)}


def _code(dtype: torch.dtype) -> int:
    return _CODES[dtype]


def threads() -> int:
    """Threads the kernels use: torch's own count."""
    return max(1, torch.get_num_threads())


def thread_contention() -> str | None:
    """A note when torch's OpenMP threads will compete with the kernels' own pool: by default they spin
    for a while after each torch operation, on the cores the pool's threads then need (measured: a layer
    called right after a parallel torch operation took twice as long). ``OMP_WAIT_POLICY=PASSIVE``, set
    before Python starts, makes them sleep instead. On torch's own team (the default) nothing competes."""
    if threads() < 2 or "OpenMP" not in torch.__config__.parallel_info():
        return None
    if thread_backend() != "pool":
        return None
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return None
    return (
        "torch's OpenMP threads spin between operations and slow the sparse kernels' own threads: "
        "set OMP_WAIT_POLICY=PASSIVE in the environment before starting Python (or use 1 thread)"
    )


_MODULE: object | None = None
_LOADED = False


def _native():
    """``llmprune._sparse_cpu`` with its instruction set chosen, or None when it is not built (the torch
    reference below then computes the same results, slowly: ``require_native`` refuses to run so)."""
    global _MODULE, _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            from llmprune import _sparse_cpu  # type: ignore[attr-defined]
        except ImportError:
            _MODULE = None
        else:
            _sparse_cpu.select(_wanted_isa(_sparse_cpu))
            _sparse_cpu.select_threads(_wanted_threads(_sparse_cpu))
            _MODULE = _sparse_cpu
            _check_selected(_sparse_cpu)
    return _MODULE


def _wanted(variable: str, names: tuple[str, ...], available: list[str], unavailable: str) -> str:
    """The choice forced by environment ``variable`` (one of ``names``), else the best ``available``
    one; a forced choice that is unknown or not available here is a one-line usage error."""
    forced = os.environ.get(variable, "").strip().lower()
    if not forced:
        return available[0]
    if forced not in names:
        raise UsageError(f"{variable}={forced!r}: expected one of {', '.join(names)}")
    if forced not in available:
        raise UsageError(f"{variable}={forced}: {unavailable}")
    return forced


def _wanted_isa(module) -> str:
    supported = module.supported()
    return _wanted(ISA_VARIABLE, ISAS, supported, f"this CPU supports only {', '.join(supported)}")


def _wanted_threads(module) -> str:
    return _wanted(THREADS_VARIABLE, THREAD_BACKENDS, module.thread_backends(),
                   "no OpenMP runtime is loaded in this process")


def _check_selected(module) -> None:
    """Compare the chosen instruction set's kernels with the portable C ones on a small random case, once
    per process: a wrong result on an untested CPU must fail loudly, not serve garbage."""
    chosen = module.selected()
    if chosen == "portable":
        return
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(67, 200, generator=generator)
    dense[torch.rand(67, 200, generator=generator) < 0.6] = 0
    x = torch.randn(70, 200, generator=generator)
    engines = module.panel_engines() if chosen == "avx512" else []
    bf16_weight = from_dense(dense.to(torch.bfloat16)).tensors()
    results = {}
    for name in (chosen, "portable"):
        module.select(name)
        results[name] = [
            multiply_with(module, *from_dense(dense.to(dtype)).tensors(), inputs, dense.shape[0])
            for dtype in VALUE_DTYPES
            for multiply_with, inputs in ((_multiply_with, x[:11]), (_multiply_many_with, x[:30]),
                                          (_multiply_many_with, x[:40]), (_multiply_many_with, x))
        ] + [  # the bfloat16 panel kernels against the portable sparse kernel on the same bfloat16 inputs
            _multiply_panels_with(module, engine, *bf16_weight, inputs, 67) if name == chosen
            else _multiply_with(module, *bf16_weight, inputs, 67)
            for engine in engines
            for inputs in (x[:5].bfloat16(), x.bfloat16())
        ]
    module.select(chosen)
    for got, expected in zip(results[chosen], results["portable"], strict=True):
        error = float((got - expected).norm() / expected.norm())
        if not error <= 1e-5:
            raise RuntimeError(
                f"llmprune's {chosen} CPU kernels disagree with the portable ones on this CPU (relative "
                f"error {error:.2g}); set {ISA_VARIABLE}=portable and report the CPU"
            )


def native_problem() -> str | None:
    """Why the compiled kernels cannot run here (None: they can)."""
    if _native() is None:
        return (
            "llmprune's compiled CPU kernels (llmprune._sparse_cpu) are missing: reinstall llmprune where a "
            f"C compiler is available ({REINSTALL})"
        )
    return None


def isa() -> str:
    """The instruction set the kernels run with ('reference' when the compiled module is missing)."""
    native = _native()
    return "reference" if native is None else native.selected()


def thread_backend() -> str:
    """Where the kernels' threads come from: 'openmp' (torch's team), 'pool' (their own), or 'reference'
    when the compiled module is missing."""
    native = _native()
    return "reference" if native is None else native.selected_threads()


def reset_isa() -> None:
    """Choose the instruction set and thread backend again (after ``LLMPRUNE_CPU_KERNEL`` or
    ``LLMPRUNE_CPU_THREADS`` changed)."""
    global _LOADED
    _LOADED = False
