"""Sparse kernels for inference, one entry point: ``use_sparse_kernels`` swaps a model's sparse linear
layers to the kernels of the device the model is on.

- On the CPU (``cpu_kernels``, ``SparseLinear``): every ``nn.Linear`` and GPT-2 ``Conv1D`` whose weight is
  float32 or bfloat16 and at least ``sparse_linear.BREAK_EVEN_SPARSITY`` zeros is replaced by a
  ``SparseLinear`` holding only the kept values and a bitmask (the dense weight is dropped). Any sparsity
  pattern works, unstructured or any N:M.
- On CUDA (``cuda_kernels``): 2:4 weights move to PyTorch's semi-structured sparse layout (cuSPARSELt or
  CUTLASS) in place.

Which layers are swapped, and why the others stay dense, is decided by ``classify`` and reported in a
``SparseKernelsReport``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmprune.errors import UsageError
from llmprune.inference import cpu_kernels
from llmprune.inference.cuda_kernels import (
    CUDA_BACKENDS,
    TOLERANCE,
    contiguous_input,
    cuda_problem,
    default_backend,
    ineligibility,
    semi_structured,
)
from llmprune.inference.sparse_linear import SparseLinear, too_dense
from llmprune.models.packing import dtype_name

BACKENDS = (*CUDA_BACKENDS, "cpu")
# A CPU layer must reproduce F.linear of its dense weight to this relative L2 error: float32 rounding of
# another summation order; with bfloat16 weights the output is rounded to bfloat16 (unit roundoff 2^-8).
CPU_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8}


@dataclass(frozen=True)
class LayerChoice:
    """One linear layer (``shape``: ``[out, in]``): swapped to the sparse kernels, or left dense and why."""

    name: str
    shape: tuple[int, int]
    dtype: str
    reasons: tuple[str, ...] = ()
    sparsity: float | None = None
    """Share of exact zeros in the weight (None where it was not measured)."""

    @property
    def eligible(self) -> bool:
        return not self.reasons


@dataclass
class SparseKernelsReport:
    """What ``use_sparse_kernels`` did: the backend (on the CPU with the instruction set and threads of its
    kernels), the layers swapped, those left dense and why."""

    backend: str
    swapped: list[str] = field(default_factory=list)
    skipped: list[LayerChoice] = field(default_factory=list)
    isa: str | None = None
    threads: int | None = None
    notes: list[str] = field(default_factory=list)
    """What may slow the kernels on this machine (``cpu_kernels.thread_contention``)."""
    thread_backend: str | None = None
    """Where the CPU kernels' threads come from: 'openmp' (torch's own team) or 'pool' (their own)."""

    @property
    def kernels(self) -> str:
        """'sparse kernels on cpu (avx2, 2 openmp threads)' or '2:4 sparse kernels (cutlass)'."""
        if self.backend == "cpu":
            if self.threads == 1:
                threads = "1 thread"
            else:
                threads = " ".join(filter(None, (str(self.threads), self.thread_backend, "threads")))
            return f"sparse kernels on cpu ({self.isa}, {threads})"
        return f"2:4 sparse kernels ({self.backend})"

    def summary(self, limit: int = 5) -> str:
        """One line: how many layers were swapped and which were left dense (the first ``limit``)."""
        text = f"{self.kernels}: {len(self.swapped)} linear layers swapped"
        if self.skipped:
            text += f", {len(self.skipped)} left dense: " + describe_choices(self.skipped, limit)
        return text

    @classmethod
    def for_cpu(cls) -> SparseKernelsReport:
        """An empty report for the CPU kernels: the instruction set and threads they run with, and what may
        slow them here."""
        note = cpu_kernels.thread_contention()
        return cls("cpu", isa=cpu_kernels.isa(), threads=cpu_kernels.threads(), notes=[note] if note else [],
                   thread_backend=cpu_kernels.thread_backend())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseKernelsReport:
        """The report back from ``dataclasses.asdict`` (as ``BenchReport.kernels`` holds it)."""
        skipped = [
            LayerChoice(**{**c, "shape": tuple(c["shape"]), "reasons": tuple(c["reasons"])})
            for c in data["skipped"]
        ]
        return cls(**{**data, "swapped": list(data["swapped"]), "skipped": skipped,
                      "notes": list(data.get("notes", []))})


def describe_choices(choices: list[LayerChoice], limit: int = 5) -> str:
    """'name (reason; reason), ... and K more'."""
    shown = ", ".join(f"{c.name} ({'; '.join(c.reasons)})" for c in choices[:limit])
    return shown + (f" and {len(choices) - limit} more" if len(choices) > limit else "")


def _sparsity(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / max(1, weight.numel())


def _cpu_reasons(weight: torch.Tensor, sparsity: float) -> list[str]:
    reasons = []
    if weight.dtype not in cpu_kernels.VALUE_DTYPES:
        reasons.append(f"dtype {dtype_name(weight.dtype)} (the CPU kernels take float32, bfloat16)")
    dense = too_dense(sparsity)
    if dense:
        reasons.append(dense)
    return reasons


def classify(model: nn.Module, backend: str) -> list[LayerChoice]:
    """Every linear layer of ``model`` (GPT-2 ``Conv1D`` included) for ``backend`` (one of ``BACKENDS``),
    eligible or not with the reasons."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    choices = []
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            shape = (module.out_features, module.in_features)
            dtype = dtype_name(module.values.dtype)
            choices.append(LayerChoice(name, shape, dtype, ("already swapped",), module.sparsity))
            continue
        if not isinstance(module, nn.Linear | Conv1D):
            continue
        weight = module.weight.detach()
        rows, cols = (int(n) for n in weight.shape)
        shape = (cols, rows) if isinstance(module, Conv1D) else (rows, cols)
        swapped = isinstance(weight, torch.sparse.SparseSemiStructuredTensor)
        sparsity = None if swapped else _sparsity(weight)
        if swapped:
            reasons = ["already swapped"]
        elif backend == "cpu":
            reasons = _cpu_reasons(weight, sparsity)
        elif isinstance(module, Conv1D):
            reasons = ["GPT-2 Conv1D (weight stored [in, out]) is not swapped"]
        else:
            reasons = ineligibility(weight, backend)
        # A tied weight (LM head = input embeddings) must stay a plain tensor for the embedding lookup.
        sharing = [other for other in owners[id(module.weight)] if other != name]
        if sharing:
            reasons.append(f"weight shared with {', '.join(sharing)}")
        choices.append(LayerChoice(name, shape, dtype_name(weight.dtype), tuple(reasons), sparsity))
    return choices


def resolve_backend(backend: str, device: torch.device) -> str:
    """``backend`` checked; "auto" is "cpu" for a model on the CPU, else the default 2:4 backend."""
    if backend not in ("auto", *BACKENDS):
        raise UsageError(f"backend must be auto, {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    return "cpu" if device.type == "cpu" else default_backend()


def _cpu_problem(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if device.type != "cpu":
        return f"the CPU sparse kernels need the model on the CPU; this run is on {device}"
    problem = cpu_kernels.native_problem()
    if problem is None and dtype is not None and dtype not in cpu_kernels.VALUE_DTYPES:
        problem = f"the CPU sparse kernels take float32 or bfloat16 weights, not {dtype_name(dtype)}"
    return problem


def require_sparse_kernels(
    device: torch.device, dtype: torch.dtype | None = None, backend: str = "auto"
) -> str:
    """Raise a one-line UsageError unless sparse kernels can run on ``device`` in ``dtype`` (the CPU: the
    compiled kernels present, float32 or bfloat16; CUDA: a 2:4-capable GPU, float16 or bfloat16); the
    backend that will run."""
    backend = resolve_backend(backend, device)
    problem = _cpu_problem(device, dtype) if backend == "cpu" else cuda_problem(device, dtype)
    if problem:
        raise UsageError(problem)
    return backend


def _model_device(model: nn.Module) -> torch.device:
    """The CPU when every parameter is there, else the first other device a parameter is on."""
    devices = [p.device for p in model.parameters()]
    return next((d for d in devices if d.type != "cpu"), torch.device("cpu"))


def use_sparse_kernels(
    model: nn.Module,
    *,
    backend: str = "auto",
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
    verify: bool = True,
) -> SparseKernelsReport:
    """Swap the sparse linear layers of ``model`` to sparse kernels, in place: on the CPU
    (``backend="cpu"``, what "auto" picks for a model on the CPU) every float32/bfloat16 layer at least
    ``BREAK_EVEN_SPARSITY`` zeros becomes a ``SparseLinear`` (any pattern); on CUDA ("cusparselt",
    "cutlass"; "auto": cuSPARSELt where PyTorch has it) every 2:4 weight of a dtype and shape the kernels
    take moves to PyTorch's semi-structured sparse layout.

    The other layers stay dense and are reported with the reason. Raises a one-line UsageError when the
    kernels cannot run here (no compiled CPU kernels; no 2:4-capable GPU), or when no layer is eligible
    (naming the layers and why). With ``verify`` each swapped layer is checked against ``F.linear`` of its
    dense weight on random inputs and put back if the outputs differ beyond rounding. ``convert`` replaces
    the 2:4 conversion (for tests without a GPU; it implies a CUDA backend); the hardware check is then
    skipped.
    """
    if convert is not None:
        if backend == "cpu":
            raise UsageError("convert replaces the 2:4 conversion; it does not apply to backend cpu")
        backend = resolve_backend(backend, torch.device("cuda"))
    else:
        backend = require_sparse_kernels(_model_device(model), None, backend)
    choices = classify(model, backend)
    skipped = [c for c in choices if not c.eligible]
    eligible = [c for c in choices if c.eligible]
    report = SparseKernelsReport.for_cpu() if backend == "cpu" else SparseKernelsReport(backend)
    report.skipped = skipped
    if not eligible:
        kind = "CPU" if backend == "cpu" else "2:4"
        raise UsageError(
            f"no linear layer can use the {kind} sparse kernels ({len(choices)} checked): "
            + describe_choices(report.skipped)
        )
    if backend == "cpu":
        _swap_cpu(model, eligible, report, verify)
    else:
        _swap_two_four(model, eligible, report, convert or semi_structured(backend), verify)
    return report


@torch.no_grad()
def _mismatch(
    layer: nn.Module,
    dense: torch.Tensor,
    bias: torch.Tensor | None,
    tolerance: float,
    tokens: tuple[int, ...],
) -> str | None:
    """Compare ``layer`` with ``F.linear`` of its dense ``[out, in]`` weight on random inputs of each token
    count; the relative error if too large."""
    generator = torch.Generator(device=dense.device).manual_seed(0)
    error = 0.0
    for count in tokens:
        x = torch.randn(count, dense.shape[1], device=dense.device, dtype=dense.dtype, generator=generator)
        expected = F.linear(x.float(), dense.float(), None if bias is None else bias.float())
        got = layer(x).float()
        error = max(error, float((got - expected).norm() / expected.norm().clamp_min(1e-12)))
    return None if error <= tolerance else f"the {error:.2g} relative error of the sparse kernel is too large"


def _swap_two_four(
    model: nn.Module,
    eligible: list[LayerChoice],
    report: SparseKernelsReport,
    convert: Callable[[torch.Tensor], torch.Tensor],
    verify: bool,
) -> None:
    for choice in eligible:
        module = model.get_submodule(choice.name)
        dense = module.weight.detach()
        try:
            module.weight = nn.Parameter(convert(dense), requires_grad=False)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            report.skipped.append(_refused(choice, f"the kernel refused it: {str(exc).splitlines()[0]}"))
            continue
        hook = module.register_forward_pre_hook(contiguous_input)
        problem = _mismatch(module, dense, module.bias, TOLERANCE, (16,)) if verify else None
        if problem:
            hook.remove()
            module.weight = nn.Parameter(dense, requires_grad=False)
            report.skipped.append(_refused(choice, problem))
            continue
        report.swapped.append(choice.name)


def _places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute) holding each submodule, by the submodule's id."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attribute, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, attribute))
    return places


def _swap_cpu(
    model: nn.Module, eligible: list[LayerChoice], report: SparseKernelsReport, verify: bool
) -> None:
    places = _places(model)
    for choice in eligible:
        module = model.get_submodule(choice.name)
        weight = module.weight.detach()
        if isinstance(module, Conv1D):  # y = x W + b with W [in, out]
            weight = weight.t()
        bias = None if module.bias is None else module.bias.detach()
        try:
            sparse = SparseLinear.from_dense(weight, bias)
        except (RuntimeError, ValueError) as exc:
            report.skipped.append(_refused(choice, f"the kernel refused it: {str(exc).splitlines()[0]}"))
            continue
        tokens = sparse.probe_tokens()  # every path it takes: decoding's kernel, prefill's, bfloat16 panels'
        problem = _mismatch(sparse, weight, bias, CPU_TOLERANCE[weight.dtype], tokens) if verify else None
        if problem:
            report.skipped.append(_refused(choice, problem))
            continue
        for parent, attribute in places[id(module)]:  # the dense module (and its weight) is dropped
            setattr(parent, attribute, sparse)
        report.swapped.append(choice.name)


def _refused(choice: LayerChoice, reason: str) -> LayerChoice:
    return LayerChoice(choice.name, choice.shape, choice.dtype, (reason,), choice.sparsity)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass (the sparse layout), the sum of its inner tensors."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` as stored (shared tensors once): a
    ``SparseLinear``'s values, mask, offsets and bias are buffers."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total
