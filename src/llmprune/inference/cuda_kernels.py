"""2:4 sparse tensor cores: which linear weights the CUDA kernels accept, and the conversion to them.

NVIDIA GPUs of compute capability 8.0 and newer (Ampere, Ada, Hopper, Blackwell) multiply a matrix with
at most 2 non-zeros in every group of 4 consecutive inputs at up to twice the dense speed. PyTorch exposes
this as ``SparseSemiStructuredTensor`` (``torch.sparse.to_sparse_semi_structured``), with two backends:
cuSPARSELt (when PyTorch was built with it) and CUTLASS. Each kernel accepts some dtypes and weight shapes
only (``_DTYPE_SHAPE_CONSTRAINTS`` in ``torch/sparse/semi_structured.py``); inputs of any token count are
padded by PyTorch itself. Eligibility is decided here by pure functions; ``kernels.use_sparse_kernels``
swaps the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmprune.methods.patterns import n_m_violations
from llmprune.models.packing import dtype_name

CUDA_BACKENDS = ("cusparselt", "cutlass")
# Float dtypes a transformers Linear runs in. The kernels also take int8 (and cuSPARSELt float8), but only
# with int8 activations, which a float model does not have.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
HARDWARE = "an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell)"
# A swapped layer must reproduce the dense-with-zeros layer to this relative L2 error (fp16/bf16 rounding
# of the accumulation order; a wrong metadata layout gives errors of order 1).
TOLERANCE = 1e-2


def shape_limits(backend: str, dtype: torch.dtype) -> tuple[int, int] | None:
    """(rows, columns) the weight's shape must be a multiple of for ``backend`` and ``dtype``, as PyTorch
    checks them; None where the backend has no kernel for the dtype."""
    sparse = torch.sparse
    classes = {
        "cusparselt": sparse.SparseSemiStructuredTensorCUSPARSELT,
        "cutlass": sparse.SparseSemiStructuredTensorCUTLASS,
    }
    config = classes[backend]._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    return None if config is None else (config.sparse_min_rows, config.sparse_min_cols)


def ineligibility(weight: torch.Tensor, backend: str) -> list[str]:
    """Why a Linear weight ``[out, in]`` cannot use the 2:4 kernels of ``backend`` (empty: it can).

    2:4 is checked group by group along the input dimension, as the kernels store it: every row, every
    4 consecutive inputs, at most 2 non-zeros.
    """
    reasons = []
    rows, cols = weight.shape
    if cols % 4:
        reasons.append(f"{cols} inputs are not a multiple of 4")
    else:
        bad = n_m_violations(weight, 2, 4)
        count = int(bad.sum())
        if count:
            row, group = (int(i) for i in bad.nonzero()[0])
            reasons.append(
                f"not 2:4: {count} of {bad.numel()} groups of 4 inputs hold more than 2 non-zeros "
                f"(first: row {row}, inputs {4 * group}-{4 * group + 3})"
            )
    if weight.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {dtype_name(weight.dtype)} (the kernels take float16, bfloat16)")
    else:
        limits = shape_limits(backend, weight.dtype)
        if limits is None:
            reasons.append(f"{backend} has no kernel for {weight.dtype}")
        elif rows % limits[0] or cols % limits[1]:
            reasons.append(
                f"shape {rows}×{cols}: {backend} needs rows a multiple of {limits[0]} "
                f"and inputs a multiple of {limits[1]}"
            )
    return reasons


def hardware_problem(device: torch.device) -> str | None:
    """Why the 2:4 kernels cannot run on ``device`` (None: they can)."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"PyTorch {torch.__version__} has no torch.sparse.to_sparse_semi_structured (needs 2.1+)"
    if device.type != "cuda":
        return f"2:4 sparse kernels need {HARDWARE}; this run is on {device.type}"
    if not torch.cuda.is_available():
        return f"2:4 sparse kernels need {HARDWARE}; no CUDA GPU is available"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        major, minor = capability
        return f"2:4 sparse kernels need {HARDWARE}; {name} has compute capability {major}.{minor}"
    return None


def cuda_problem(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why the 2:4 kernels cannot run on ``device`` in ``dtype`` (None: they can)."""
    problem = hardware_problem(device)
    if problem is None and dtype is not None and dtype not in KERNEL_DTYPES:
        problem = f"2:4 sparse kernels take float16 or bfloat16 weights, not {dtype_name(dtype)}"
    return problem


def default_backend() -> str:
    """cuSPARSELt where PyTorch was built with it (faster, fewer shape limits), else CUTLASS."""
    return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"


def semi_structured(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The conversion ``to_sparse_semi_structured`` performs, for a chosen backend (it picks cuSPARSELt
    unless ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set; the class is chosen here instead of
    flipping that global)."""
    sparse = torch.sparse
    if backend == "cutlass":
        return sparse.SparseSemiStructuredTensorCUTLASS.from_dense
    return sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense


def contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a swapped layer: the sparse linear flattens its input with ``.view()``, which
    needs a viewable (contiguous) tensor."""
    return (args[0].contiguous(), *args[1:])
