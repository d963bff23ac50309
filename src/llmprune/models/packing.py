"""Compact, lossless layouts of sparse weights: pure functions from a tensor to its parts and back.

Three layouts, chosen per tensor by ``choose_layout``:

- ``dense``: the tensor as it is (vectors, embeddings, anything not sparse enough to pay off);
- ``bitmask``: one bit per entry (packed, 8 per byte) marking the non-zeros, then the non-zeros in
  row-major order: ``nnz * itemsize + numel / 8`` bytes (fp16 at 50 %: 0.5625 of dense);
- ``N:M``: in every group of M consecutive entries of a row, N values and their N positions within the
  group in ``ceil(log2 M)`` bits each (2:4 fp16: 2 values + 2 x 2 bits per 4 weights, 0.5625 of dense).
  Groups run along the last dimension (``axis`` 1) or, for weights stored ``[in, out]`` such as GPT-2's
  ``Conv1D``, along the first (``axis`` 0).

"Zero" means all bits zero (+0.0): -0.0 and NaN are stored as values, so every round trip is bit-exact
whatever the tensor holds (pruning writes +0.0).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmprune.methods.patterns import max_per_group

GROUP_SIZES = (2, 4, 8, 16)
"""The M of the N:M layouts tried (N at most M/2: a layout for at least half-sparse groups)."""

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Packed:
    """One tensor in a layout: its parts (1-D tensors) and what is needed to rebuild it."""

    layout: str
    """``dense``, ``bitmask`` or ``N:M`` such as ``2:4``."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: dict[str, torch.Tensor]
    axis: int = 1
    """N:M: the dimension the groups run along (1: rows of ``[out, in]``; 0: columns of ``[in, out]``)."""

    @property
    def nbytes(self) -> int:
        return sum(part.numel() * part.element_size() for part in self.parts.values())

    def entry(self) -> dict[str, Any]:
        """What a file records about this tensor besides its parts (JSON-serialisable), with a checksum."""
        entry = {"layout": self.layout, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}
        if ":" in self.layout:
            entry["axis"] = self.axis
        entry["sha256"] = checksum(entry, self.parts)
        return entry


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nonzero_bits(tensor: torch.Tensor) -> torch.Tensor:
    """True where an entry has any bit set (so -0.0 counts as non-zero: see the module docstring)."""
    if tensor.dtype == torch.bool:
        return tensor
    return tensor.contiguous().view(_SAME_SIZE_INT[tensor.element_size()]) != 0


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries a byte (little-endian bit order), padded with zeros."""
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy(), bitorder="little"))


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of ``pack_bits`` output, as a bool tensor."""
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)


def pack_uints(values: torch.Tensor, width: int) -> torch.Tensor:
    """Small unsigned integers (< 2**width) in ``width`` bits each, packed as uint8."""
    shifts = torch.arange(width, dtype=torch.uint8)
    bits = (values.reshape(-1, 1).to(torch.uint8) >> shifts) & 1
    return pack_bits(bits.view(torch.bool))


def unpack_uints(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """``count`` integers of ``width`` bits from ``pack_uints`` output, as int64."""
    bits = np.unpackbits(packed.numpy(), count=count * width, bitorder="little").reshape(count, width)
    values = bits[:, 0].copy()
    for bit in range(1, width):
        values |= bits[:, bit] << bit
    return torch.from_numpy(values).to(torch.int64)


def position_bits(m: int) -> int:
    """Bits to store a position within a group of ``m``."""
    return max(1, math.ceil(math.log2(m)))


def _nm_bytes(groups: int, n: int, m: int, itemsize: int) -> int:
    return groups * n * itemsize + math.ceil(groups * n * position_bits(m) / 8)


def choose_layout(tensor: torch.Tensor) -> tuple[str, int]:
    """The layout for ``tensor`` and, for N:M, its axis: the smallest N:M layout the tensor satisfies
    (N <= M/2, groups along either dimension of a matrix), else a bitmask, else dense if neither is
    smaller than the tensor itself."""
    dense = tensor.numel() * tensor.element_size()
    if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.numel() == 0:
        return "dense", 1
    count = int(torch.count_nonzero(tensor.view(_SAME_SIZE_INT[tensor.element_size()])))
    best: tuple[int, str, int] | None = None
    nonzero = nonzero_bits(tensor) if 2 * count <= tensor.numel() else None  # N <= M/2: half are zeros
    for axis in (1, 0) if nonzero is not None else ():
        for m in sorted(GROUP_SIZES, reverse=True):
            n = max_per_group(nonzero, m, axis)
            if n is None:
                continue
            if n > m // 2:  # then some half of a group exceeds M/4 too: no smaller M fits either
                break
            if n == 0:
                continue
            size = _nm_bytes(tensor.numel() // m, n, m, tensor.element_size())
            if best is None or size < best[0]:
                best = size, f"{n}:{m}", axis
    if best is not None and best[0] < dense:
        return best[1], best[2]
    bitmask = count * tensor.element_size() + math.ceil(tensor.numel() / 8)
    return ("bitmask", 1) if bitmask < dense else ("dense", 1)


def pack(tensor: torch.Tensor, layout: str | None = None, axis: int | None = None) -> Packed:
    """``tensor`` (on the CPU) in ``layout`` (default: ``choose_layout``'s choice)."""
    tensor = tensor.detach().contiguous()
    if layout is None:
        layout, axis = choose_layout(tensor)
    shape, dtype = tuple(tensor.shape), tensor.dtype
    if layout == "dense":
        return Packed(layout, shape, dtype, {"dense": tensor})
    if layout == "bitmask":
        nonzero = nonzero_bits(tensor).reshape(-1)
        values = torch.masked_select(tensor.reshape(-1), nonzero)
        return Packed(layout, shape, dtype, {"values": values, "mask": pack_bits(nonzero)})
    n, m = (int(part) for part in layout.split(":"))
    axis = 1 if axis is None else axis
    grouped = (tensor if axis == 1 else tensor.t()).reshape(-1, m)
    nonzero = nonzero_bits(grouped)
    if int(nonzero.sum(dim=1).max()) > n:
        raise ValueError(f"tensor is not {layout} sparse along axis {axis}")
    # The non-zeros of each group first, then (as padding up to N) its first zeros, in position order.
    order = torch.argsort((~nonzero).to(torch.uint8), dim=1, stable=True)[:, :n]
    positions = order.sort(dim=1).values
    values = grouped.gather(1, positions)
    parts = {"values": values.reshape(-1), "positions": pack_uints(positions, position_bits(m))}
    return Packed(layout, shape, dtype, parts, axis)


def unpack(packed: Packed) -> torch.Tensor:
    """The tensor ``pack`` was given, bit for bit."""
    shape, dtype, parts = packed.shape, packed.dtype, packed.parts
    if packed.layout == "dense":
        return parts["dense"].reshape(shape)
    numel = math.prod(shape)
    if packed.layout == "bitmask":
        nonzero = unpack_bits(parts["mask"], numel)
        return torch.zeros(numel, dtype=dtype).masked_scatter_(nonzero, parts["values"]).reshape(shape)
    n, m = (int(part) for part in packed.layout.split(":"))
    groups = numel // m
    positions = unpack_uints(parts["positions"], groups * n, position_bits(m)).view(groups, n)
    out = torch.zeros(groups, m, dtype=dtype)
    out.scatter_(1, positions, parts["values"].view(groups, n))
    if packed.axis == 1:
        return out.reshape(shape)
    return out.reshape(shape[1], shape[0]).t().contiguous()


def part_names(layout: str) -> tuple[str, ...]:
    """The parts a layout stores, in file order."""
    if layout == "dense":
        return ("dense",)
    return ("values", "mask") if layout == "bitmask" else ("values", "positions")


def checksum(entry: dict[str, Any], parts: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a tensor's description (layout, shape, dtype, axis) and the bytes of its parts, so that
    damage to either is caught."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in entry.items() if k != "sha256"}).encode())
    for name in part_names(entry["layout"]):
        part = parts[name].contiguous().reshape(-1)
        digest.update(part.view(torch.uint8).numpy() if part.numel() else b"")
    return digest.hexdigest()


def from_entry(entry: dict[str, Any], parts: dict[str, torch.Tensor]) -> Packed:
    """The ``Packed`` tensor a file describes with ``entry`` (see ``Packed.entry``)."""
    dtype = getattr(torch, str(entry["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {entry['dtype']!r}")
    return Packed(entry["layout"], tuple(entry["shape"]), dtype, parts, entry.get("axis", 1))
