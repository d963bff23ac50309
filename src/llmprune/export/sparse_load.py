"""``llmprune.load(path, sparse_kernels="cpu")``: a pruned or compressed checkpoint loaded straight into
``SparseLinear`` modules (``inference/sparse_linear.py``), so the dense model is never in memory.

The model is built with every parameter on the meta device (buffers such as rotary frequencies are
computed as usual), then its linear weights are read one at a time: each sparse enough for the kernels
(``sparse_linear.too_dense``) becomes a ``SparseLinear`` on its parent module, the others and every other
tensor are loaded as they are. A compressed checkpoint's weight goes from its stored layout to the kernels'
without a dense matrix wherever the layouts run the same way (``packed_to_bitmask``): a bitmask whose rows
are whole 64-bit words is already the kernels' mask; N:M positions become the bits of their groups. Peak
memory is then the compressed size plus about one dense layer (a plain checkpoint's weight as read, or a
weight whose stored layout runs across the kernels' rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmprune.errors import UsageError
from llmprune.inference import cpu_kernels
from llmprune.inference.cpu_kernels import PAD, VALUE_DTYPES, BitmaskWeight, row_bytes
from llmprune.inference.kernels import LayerChoice, SparseKernelsReport, describe_choices
from llmprune.inference.sparse_linear import SparseLinear, too_dense
from llmprune.models.packed import CompressedCheckpoint
from llmprune.models.packing import (
    Packed,
    dtype_name,
    nonzero_bits,
    position_bits,
    unpack,
    unpack_bits,
    unpack_uints,
)
from llmprune.models.shards import CheckpointShards, tied_names
from llmprune.storage import trim_heap

BLOCK = 1 << 22
"""Weights converted at once (a block of whole rows): bounds the temporary bit matrices."""
LINEAR_TYPES = (nn.Linear, Conv1D)


# --- a weight in the kernels' layout, from its stored form ------------------------------------------------


class _Rows:
    """Fills a ``BitmaskWeight`` block of rows by block of rows (the row's bits and its kept values)."""

    def __init__(self, rows: int, cols: int, nnz: int, dtype: torch.dtype) -> None:
        self.rows, self.cols, self.nnz = rows, cols, nnz
        self.mask = torch.zeros(rows, row_bytes(cols), dtype=torch.uint8)
        self.offsets = torch.zeros(rows + 1, dtype=torch.int64)
        self.values = torch.zeros(nnz + PAD, dtype=dtype)
        self.done = 0

    def add(self, bits: torch.Tensor, values: torch.Tensor) -> None:
        """The next ``len(bits)`` rows: a bool ``[k, cols]`` matrix and the values it marks, in row order."""
        start, count = self.done, bits.shape[0]
        packed = np.packbits(bits.numpy(), axis=1, bitorder="little")
        self.mask[start : start + count, : packed.shape[1]] = torch.from_numpy(packed)
        first = int(self.offsets[start])
        torch.cumsum(bits.sum(dim=1, dtype=torch.int64), 0, out=self.offsets[start + 1 : start + count + 1])
        self.offsets[start + 1 : start + count + 1] += first
        if first + values.numel() > self.nnz:
            raise ValueError("the weight has more kept values than it said")
        self.values[first : first + values.numel()] = values
        self.done += count

    def finish(self) -> BitmaskWeight:
        if self.done != self.rows or int(self.offsets[-1]) != self.nnz:
            raise ValueError("the weight's bits and values do not match")
        return BitmaskWeight(self.rows, self.cols, self.values, self.mask, self.offsets)


def _row_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """``(first, end)`` blocks of about ``BLOCK`` weights, each starting at a multiple of 8 rows (so a
    block's bits start on a byte of a row-major bit stream)."""
    step = max(8, BLOCK // max(cols, 1) // 8 * 8)
    for first in range(0, rows, step):
        yield first, min(rows, first + step)


def _value_dtype(dtype: torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    dtype = stored if dtype is None else dtype
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"the kernels take float32 or bfloat16 values, not {dtype_name(dtype)}")
    return dtype


def dense_to_bitmask(
    tensor: torch.Tensor, transposed: bool = False, dtype: torch.dtype | None = None
) -> BitmaskWeight:
    """``cpu_kernels.from_dense`` of a weight (``transposed``: stored ``[in, out]``, as GPT-2's ``Conv1D``),
    its values cast to ``dtype`` (default: its own), a block of rows at a time: no transposed or cast
    copy of the whole matrix is made."""
    if tensor.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(tensor.shape)}")
    dtype = _value_dtype(dtype, tensor.dtype)
    if not transposed and dtype == tensor.dtype:  # nothing to transpose or cast: packed in C, in one pass
        return cpu_kernels.from_dense(tensor)
    weight = tensor.t() if transposed else tensor
    rows, cols = weight.shape
    out = _Rows(rows, cols, int(torch.count_nonzero(tensor)), dtype)
    for first, end in _row_blocks(rows, cols):
        block = weight[first:end].contiguous()
        bits = block != 0
        out.add(bits, block[bits])
    return out.finish()


def packed_to_bitmask(
    packed: Packed, transposed: bool = False, dtype: torch.dtype | None = None
) -> BitmaskWeight:
    """The kernels' layout of a weight stored as ``packed`` (``models/packing.py``; ``transposed``: stored
    ``[in, out]``, as GPT-2's ``Conv1D``, whose kernel rows are its columns), values cast to ``dtype``.

    A bitmask or N:M layout that runs along the kernel's rows is converted without a dense matrix: a
    bitmask whose rows are whole 64-bit words is already the kernels' mask, other bitmasks are re-cut into
    rows, N:M positions set their groups' bits (the explicit zeros that pad groups with fewer than N
    non-zeros are dropped). A layout that runs across them (a bitmask of a transposed weight, N:M groups
    along the other axis) is expanded and converted a block of rows at a time. Stored values whose bits are
    not all zero are kept (-0.0 included: it multiplies to zero)."""
    if len(packed.shape) != 2:
        raise ValueError(f"expected a matrix, got shape {packed.shape}")
    dtype = _value_dtype(dtype, packed.dtype)
    rows, cols = packed.shape[::-1] if transposed else packed.shape
    if packed.layout == "bitmask" and not transposed:
        return _from_bitmask(packed, rows, cols, dtype)
    if ":" in packed.layout:
        n, m = (int(part) for part in packed.layout.split(":"))
        if (packed.axis == 0) == transposed and cols % m == 0:
            return _from_n_m(packed, rows, cols, n, m, dtype)
    return dense_to_bitmask(unpack(packed), transposed, dtype)


def _from_bitmask(packed: Packed, rows: int, cols: int, dtype: torch.dtype) -> BitmaskWeight:
    stored, mask = packed.parts["values"], packed.parts["mask"]
    if mask.numel() != (rows * cols + 7) // 8:
        raise ValueError(f"a mask of {mask.numel()} bytes for {rows}×{cols} weights")
    nnz = stored.numel()
    if cols % 64 == 0:  # every row is whole 64-bit words: the stored mask is the kernels' mask
        # copied: a tensor read from a safetensors file maps the whole file, and would keep it resident
        mask = mask.reshape(rows, cols // 8).clone()
        counts = torch.from_numpy(np.bitwise_count(mask.numpy()).sum(axis=1, dtype=np.int64))
        offsets = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        if int(offsets[-1]) != nnz:
            raise ValueError(f"the mask marks {int(offsets[-1])} weights, {nnz} values are stored")
        values = torch.zeros(nnz + PAD, dtype=dtype)
        values[:nnz] = stored
        return BitmaskWeight(rows, cols, values, mask, offsets)
    out, taken = _Rows(rows, cols, nnz, dtype), 0
    for first, end in _row_blocks(rows, cols):
        span = slice(first * cols // 8, (end * cols + 7) // 8)
        bits = unpack_bits(mask[span].contiguous(), (end - first) * cols).view(end - first, cols)
        count = int(bits.sum())
        out.add(bits, stored[taken : taken + count])
        taken += count
    return out.finish()


def _from_n_m(packed: Packed, rows: int, cols: int, n: int, m: int, dtype: torch.dtype) -> BitmaskWeight:
    stored, positions, width = packed.parts["values"], packed.parts["positions"], position_bits(m)
    per_row = cols // m  # groups in a kernel row
    out = _Rows(rows, cols, int(torch.count_nonzero(nonzero_bits(stored))), dtype)
    for first, end in _row_blocks(rows, cols):
        groups = slice(first * per_row, end * per_row)
        count = (end - first) * per_row * n
        span = slice(groups.start * n * width // 8, (groups.stop * n * width + 7) // 8)
        where = unpack_uints(positions[span].contiguous(), count, width).view(-1, n)
        where, order = where.sort(dim=1)  # values go in column order
        values = stored[groups.start * n : groups.stop * n].view(-1, n).gather(1, order)
        kept = nonzero_bits(values)  # the zeros that pad a group to N values are dropped
        bits = torch.zeros(where.shape[0], m, dtype=torch.bool).scatter_(1, where, kept)
        out.add(bits.view(end - first, cols), values[kept])
    return out.finish()


def stored_nonzeros(packed: Packed) -> int:
    """How many of a stored weight's entries are non-zero (as the kernels keep them)."""
    if packed.layout == "dense":
        return int(torch.count_nonzero(packed.parts["dense"]))
    if packed.layout == "bitmask":
        return packed.parts["values"].numel()
    return int(torch.count_nonzero(nonzero_bits(packed.parts["values"])))


# --- the model ---------------------------------------------------------------------------------------------


class _Weights:
    """A checkpoint's tensors by name, read one at a time: plain safetensors shards or a compressed
    checkpoint (each tensor's checksum verified as it is read)."""

    def __init__(self, directory: Path, compressed: bool) -> None:
        self.directory = directory
        self.compressed = CompressedCheckpoint(directory) if compressed else None
        self.shards = None if compressed else CheckpointShards(directory)

    def names(self) -> list[str]:
        return self.compressed.names() if self.compressed is not None else list(self.shards.weight_map)

    def read_packed(self, name: str) -> Packed:
        if self.compressed is not None:
            return self.compressed.read_packed(name)
        tensor = self.shards.read(name)
        return Packed("dense", tuple(tensor.shape), tensor.dtype, {"dense": tensor})

    def read(self, name: str) -> torch.Tensor:
        return self.compressed.read(name) if self.compressed is not None else self.shards.read(name)


def load_sparse(directory: Path, compressed: bool, dtype: torch.dtype) -> nn.Module:
    """The causal LM of checkpoint ``directory`` in eval mode on the CPU, its linear layers sparse enough
    for the kernels as ``SparseLinear`` (``model.sparse_kernels_report``: those swapped, those left dense
    and why). The caller has checked that the kernels run here in ``dtype`` (``llmprune.load`` does, before
    anything is read). Raises a one-line UsageError, returning nothing, when the checkpoint is damaged or
    lacks a tensor of the model, or no layer is sparse enough."""
    weights = _Weights(directory, compressed)  # headers and sizes checked here, before any tensor is read
    model = _skeleton(directory, dtype)
    available = set(weights.names())
    tied = tied_names(model)
    report = SparseKernelsReport.for_cpu()
    handled = set(tied)
    for name, module in _linear_modules(model):
        key = f"{name}.weight"
        if key in tied:  # the LM head stays the embeddings' own tensor, for the lookup
            reason = (f"weight shared with {_tied_to(model, key)}",)
            report.skipped.append(LayerChoice(name, tuple(module.weight.shape), dtype_name(dtype), reason))
            continue
        if key not in available:
            raise UsageError(f"{directory}: checkpoint has no tensor {key}")
        choice, sparse = _convert(weights, model, name, module, dtype)
        handled.add(key)
        if sparse is None:
            report.skipped.append(choice)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, sparse)
        handled.add(f"{name}.bias")
        report.swapped.append(name)
        trim_heap()  # the dense temporaries of a layer, freed, would otherwise stay resident
    if not report.swapped:
        raise UsageError(
            f"no linear layer of {directory} can use the CPU sparse kernels ({len(report.skipped)} checked): "
            + describe_choices(report.skipped)
        )
    expected = _checkpoint_names(model)
    for name in weights.names():
        if name in expected and name not in handled:
            _set(model, name, weights.read(name), dtype)
    if tied:
        model.tie_weights()
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise UsageError(f"{directory}: checkpoint has no tensor {missing[0]}")
    _generation_config(model, directory)
    model.sparse_kernels_report = report
    return model.eval()


def _skeleton(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The model from its config, parameters on the meta device, buffers computed (rotary frequencies)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _generation_config(model: nn.Module, directory: Path) -> None:
    """The checkpoint's ``generation_config.json``, as ``from_pretrained`` reads it."""
    from transformers import GenerationConfig

    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)


def _tied_to(model: nn.Module, key: str) -> str:
    """The module whose weight ``key`` is tied to (``model.embed_tokens``), as the model declares it."""
    declared = getattr(model, "_tied_weights_keys", None)
    target = declared.get(key) if isinstance(declared, dict) else None
    return target.removesuffix(".weight") if isinstance(target, str) else "the input embeddings"


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]


def _checkpoint_names(model: nn.Module) -> set[str]:
    """Parameters and persistent buffers: the tensors a checkpoint holds."""
    return set(model.state_dict(keep_vars=True))


def _convert(
    weights: _Weights, model: nn.Module, name: str, module: nn.Module, dtype: torch.dtype
) -> tuple[LayerChoice, SparseLinear | None]:
    """Read one linear weight: a ``SparseLinear`` when it is sparse enough, else set on ``module``."""
    key = f"{name}.weight"
    packed = weights.read_packed(key)
    transposed = isinstance(module, Conv1D)
    if packed.shape != tuple(module.weight.shape):
        raise UsageError(
            f"{weights.directory}: tensor {key} has shape {list(packed.shape)}, the model's config gives "
            f"{list(module.weight.shape)}"
        )
    out, cols = (packed.shape[1], packed.shape[0]) if transposed else packed.shape
    sparsity = 1.0 - stored_nonzeros(packed) / max(1, out * cols)
    reason = too_dense(sparsity)
    choice = LayerChoice(name, (out, cols), dtype_name(dtype), () if reason is None else (reason,), sparsity)
    if reason is not None:
        _set(model, key, _decoded(weights, key, packed), dtype)
        return choice, None
    try:
        layout = packed_to_bitmask(packed, transposed, dtype)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # parts that do not fit their entry
        raise UsageError(f"{weights.directory}: cannot decode tensor {key} ({exc})") from None
    del packed
    bias = None
    if getattr(module, "bias", None) is not None:
        bias = weights.read(f"{name}.bias").to(dtype)
        if bias.shape != (out,):
            raise UsageError(
                f"{weights.directory}: tensor {name}.bias has shape {list(bias.shape)}, not [{out}]"
            )
    return choice, SparseLinear(layout, bias)


def _decoded(weights: _Weights, key: str, packed: Packed) -> torch.Tensor:
    try:
        return unpack(packed)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{weights.directory}: cannot decode tensor {key} ({exc})") from None


def _set(model: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    """Put a checkpoint tensor in place of the meta one (floating-point ones cast to ``dtype``)."""
    from accelerate.utils import set_module_tensor_to_device

    try:
        set_module_tensor_to_device(
            model, name, "cpu", value=value, dtype=dtype if value.is_floating_point() else None
        )
    except ValueError as exc:  # a shape that differs from the config's
        raise UsageError(f"cannot load tensor {name}: {str(exc).splitlines()[0]}") from None
