"""2:4 sparse tensor cores: which linear layers can use them, and swapping their weights to the kernels.

NVIDIA GPUs of compute capability 8.0 and newer (Ampere, Ada, Hopper, Blackwell) multiply a matrix with
at most 2 non-zeros in every group of 4 consecutive inputs at up to twice the dense speed. PyTorch exposes
this as ``SparseSemiStructuredTensor`` (``torch.sparse.to_sparse_semi_structured``), with two backends:
cuSPARSELt (when PyTorch was built with it) and CUTLASS. Each kernel accepts some dtypes and weight shapes
only (``_DTYPE_SHAPE_CONSTRAINTS`` in ``torch/sparse/semi_structured.py``); inputs of any token count are
padded by PyTorch itself. Eligibility is decided here by pure functions; ``use_sparse_kernels`` swaps the
weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmprune.errors import UsageError
from llmprune.methods.patterns import n_m_violations

BACKENDS = ("cusparselt", "cutlass")
# Float dtypes a transformers Linear runs in. The kernels also take int8 (and cuSPARSELt float8), but only
# with int8 activations, which a float model does not have.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
HARDWARE = "an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell)"
# A swapped layer must reproduce the dense-with-zeros layer to this relative L2 error (fp16/bf16 rounding
# of the accumulation order; a wrong metadata layout gives errors of order 1).
TOLERANCE = 1e-2


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        reasons.append(f"dtype {_short(weight.dtype)} (the kernels take float16, bfloat16)")
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


def require_sparse_kernels(device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Raise a one-line UsageError unless the 2:4 kernels can run on ``device`` in ``dtype``."""
    problem = hardware_problem(device)
    if problem is None and dtype is not None and dtype not in KERNEL_DTYPES:
        problem = f"2:4 sparse kernels take float16 or bfloat16 weights, not {_short(dtype)}"
    if problem:
        raise UsageError(problem)


def default_backend() -> str:
    """cuSPARSELt where PyTorch was built with it (faster, fewer shape limits), else CUTLASS."""
    return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"


@dataclass(frozen=True)
class LayerChoice:
    """One linear layer: swapped to the sparse kernels, or left dense and why."""

    name: str
    shape: tuple[int, int]
    dtype: str
    reasons: tuple[str, ...] = ()

    @property
    def eligible(self) -> bool:
        return not self.reasons


@dataclass
class SparseKernelsReport:
    """What ``use_sparse_kernels`` did: the backend, the layers swapped, those left dense and why."""

    backend: str
    swapped: list[str] = field(default_factory=list)
    skipped: list[LayerChoice] = field(default_factory=list)

    def summary(self, limit: int = 5) -> str:
        """One line: how many layers were swapped and which were left dense (the first ``limit``)."""
        text = f"2:4 sparse kernels ({self.backend}): {len(self.swapped)} linear layers swapped"
        if self.skipped:
            text += f", {len(self.skipped)} left dense: " + describe_choices(self.skipped, limit)
        return text


def describe_choices(choices: list[LayerChoice], limit: int = 5) -> str:
    """'name (reason; reason), ... and K more'."""
    shown = ", ".join(f"{c.name} ({'; '.join(c.reasons)})" for c in choices[:limit])
    return shown + (f" and {len(choices) - limit} more" if len(choices) > limit else "")


def classify(model: nn.Module, backend: str) -> list[LayerChoice]:
    """Every linear layer of ``model`` (GPT-2 ``Conv1D`` included), eligible or not with the reasons."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    choices = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | Conv1D):
            continue
        weight = module.weight.detach()
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        dtype = _short(weight.dtype)
        if isinstance(module, Conv1D):
            reasons = ["GPT-2 Conv1D (weight stored [in, out]) is not swapped"]
        elif isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            reasons = ["already swapped"]
        else:
            reasons = ineligibility(weight, backend)
        # A tied weight (LM head = input embeddings) must stay a plain tensor for the embedding lookup.
        sharing = [other for other in owners[id(module.weight)] if other != name]
        if sharing:
            reasons.append(f"weight shared with {', '.join(sharing)}")
        choices.append(LayerChoice(name, shape, dtype, tuple(reasons)))
    return choices


def semi_structured(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The conversion ``to_sparse_semi_structured`` performs, for a chosen backend (it picks cuSPARSELt
    unless ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set; the class is chosen here instead of
    flipping that global)."""
    sparse = torch.sparse
    if backend == "cutlass":
        return sparse.SparseSemiStructuredTensorCUTLASS.from_dense
    return sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    # The sparse linear flattens its input with .view(), which needs a viewable (contiguous) tensor.
    return (args[0].contiguous(), *args[1:])


@torch.no_grad()
def _matches(module: nn.Linear, dense: torch.Tensor, tokens: int = 16) -> str | None:
    """Compare the swapped layer with its dense weight on random inputs; the relative error if too large."""
    generator = torch.Generator(device=dense.device).manual_seed(0)
    x = torch.randn(tokens, dense.shape[1], device=dense.device, dtype=dense.dtype, generator=generator)
    expected = F.linear(x.float(), dense.float(), None if module.bias is None else module.bias.float())
    got = module(x).float()
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
    return None if error <= TOLERANCE else f"the {error:.2g} relative error of the sparse kernel is too large"


def use_sparse_kernels(
    model: nn.Module,
    *,
    backend: str = "auto",
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
    verify: bool = True,
) -> SparseKernelsReport:
    """Swap every 2:4-sparse linear weight of ``model`` to PyTorch's semi-structured sparse layout, in place.

    Layers that are not 2:4, or whose dtype or shape the kernels refuse, stay dense and are reported with
    the reason. Raises a one-line UsageError without a supported GPU, or when no layer is eligible (naming
    the layers and why). With ``verify`` each swapped layer is checked against its dense weight on random
    inputs and put back if the outputs differ beyond fp16/bf16 tolerance. ``convert`` replaces the
    conversion (for tests without a GPU); the hardware check is then skipped.
    """
    if backend not in ("auto", *BACKENDS):
        raise UsageError(f"backend must be auto, {' or '.join(BACKENDS)}, got {backend!r}")
    if convert is None:
        parameter = next(model.parameters())
        require_sparse_kernels(parameter.device)
    backend = default_backend() if backend == "auto" else backend
    convert = convert or semi_structured(backend)
    choices = classify(model, backend)
    report = SparseKernelsReport(backend, skipped=[c for c in choices if not c.eligible])
    eligible = [c for c in choices if c.eligible]
    if not eligible:
        raise UsageError(
            f"no linear layer can use the 2:4 sparse kernels ({len(choices)} checked): "
            + describe_choices(report.skipped)
        )
    for choice in eligible:
        module = model.get_submodule(choice.name)
        dense = module.weight.detach()
        try:
            module.weight = nn.Parameter(convert(dense), requires_grad=False)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            report.skipped.append(_refused(choice, f"the kernel refused it: {str(exc).splitlines()[0]}"))
            continue
        hook = module.register_forward_pre_hook(_contiguous_input)
        problem = _matches(module, dense) if verify else None
        if problem:
            hook.remove()
            module.weight = nn.Parameter(dense, requires_grad=False)
            report.skipped.append(_refused(choice, problem))
            continue
        report.swapped.append(choice.name)
    return report


def _refused(choice: LayerChoice, reason: str) -> LayerChoice:
    return LayerChoice(choice.name, choice.shape, choice.dtype, (reason,))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass (the sparse layout), the sum of its inner tensors."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` as stored (shared tensors once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total
