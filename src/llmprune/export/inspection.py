"""``llmprune inspect``: what a checkpoint on disk holds, read one tensor at a time (no model is built).

Works on plain checkpoints, on llmprune's (with their ``llmprune.json`` recipe and report) and on
compressed ones. Sparsity counts entries equal to zero (either sign); N:M compliance is checked group by
group along each linear weight's input dimension.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmprune.errors import UsageError
from llmprune.methods.patterns import max_per_group
from llmprune.models.packed import MANIFEST_KEY, CompressedCheckpoint
from llmprune.storage import read_metadata

GROUP_SIZES = (4, 8, 16)
"""The M of the N:M patterns checked."""
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    parameters: int
    nonzeros: int
    linear: bool
    """The weight of a linear layer (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    layer: int | None
    """Index of the decoder layer holding it (the first number in its name), if any."""
    max_per_group: dict[int, int | None] = field(default_factory=dict)
    """Linear weights: for each M, the most non-zeros in a group of M consecutive inputs."""
    layout: str | None = None
    """Compressed checkpoints: how the tensor is stored (dense, bitmask or N:M)."""

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzeros / self.parameters if self.parameters else 0.0

    @property
    def patterns(self) -> list[str]:
        """The N:M patterns (N <= M/2) every group satisfies, tightest N for each M."""
        return [f"{n}:{m}" for m, n in self.max_per_group.items() if n is not None and n <= m // 2]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sparsity": self.sparsity, "patterns": self.patterns}


def _linear_weights(directory: Path) -> tuple[set[str], set[str]] | None:
    """Names of linear weights, and of those stored ``[in, out]`` (``Conv1D``), from the model's modules on
    the meta device; None when transformers cannot build this model's skeleton."""
    from llmprune.models.architecture import PRUNABLE_TYPES
    from llmprune.models.loading import load_skeleton

    try:
        skeleton = load_skeleton(str(directory))
    except Exception:  # an architecture transformers does not know: fall back to names and shapes
        return None
    linear, transposed = set(), set()
    for name, module in skeleton.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            linear.add(f"{name}.weight")
            if not isinstance(module, torch.nn.Linear):
                transposed.add(f"{name}.weight")
    return linear, transposed


def tensor_info(
    name: str, tensor: torch.Tensor, linear: bool, transposed: bool, layout: str | None = None
) -> TensorInfo:
    """Counts for one tensor; N:M group maxima for linear weights (inputs along the last dimension of
    ``[out, in]``, or the first when ``transposed``)."""
    match = _LAYER_INDEX.search(name)
    info = TensorInfo(
        name=name,
        shape=list(tensor.shape),
        dtype=str(tensor.dtype).removeprefix("torch."),
        parameters=tensor.numel(),
        nonzeros=int(torch.count_nonzero(tensor)),
        linear=linear,
        layer=int(match.group(1)) if match else None,
        layout=layout,
    )
    if linear and tensor.dim() == 2:
        nonzero = tensor != 0
        info.max_per_group = {m: max_per_group(nonzero, m, 0 if transposed else 1) for m in GROUP_SIZES}
    return info


def check_checkpoint(directory: str | Path) -> Path:
    """Fail in one line unless ``directory`` is a checkpoint directory with whole safetensors weights (plain
    or compressed); its architecture may be one transformers does not know (tensors are then classified by
    name and shape) and it needs no tokenizer."""
    from llmprune.models.loading import check_checkpoint_dir

    path = Path(directory)
    if not path.exists():
        raise UsageError(f"checkpoint directory not found: {directory}")
    if not path.is_dir():
        raise UsageError(f"{directory} is a file, not a checkpoint directory")
    check_checkpoint_dir(path, architecture=False, tokenizer=False)
    return path


def inspect_checkpoint(directory: str | Path, progress=None) -> dict[str, Any]:
    """Everything ``llmprune inspect`` shows, as JSON-ready data: files and sizes, every tensor's counts,
    per decoder layer sparsity and N:M patterns, totals, and the recorded recipe and report."""
    from llmprune.models.shards import CheckpointShards

    path = check_checkpoint(directory)
    metadata = read_metadata(path)
    compressed = MANIFEST_KEY in metadata
    source = CompressedCheckpoint(path) if compressed else CheckpointShards(path)
    known = _linear_weights(path)
    tensors = []
    names = source.names()
    for done, name in enumerate(names, start=1):
        tensor = source.read(name)
        if known is None:
            linear, transposed = tensor.dim() == 2 and _LAYER_INDEX.search(name) is not None, False
        else:
            linear, transposed = name in known[0], name in known[1]
        layout = source.entries[name]["layout"] if compressed else None
        tensors.append(tensor_info(name, tensor, linear, transposed, layout))
        del tensor
        if progress is not None:
            progress(done, len(names))
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    weights = {name: size for name, size in files.items() if name.endswith(".safetensors")}
    linear = [t for t in tensors if t.linear and t.layer is not None]  # what pruning touches
    return {
        "path": str(path),
        "kind": "compressed" if compressed else "llmprune" if metadata else "plain",
        "files": files,
        "disk_bytes": sum(files.values()),
        "weights_bytes": sum(weights.values()),
        "parameters": sum(t.parameters for t in tensors),
        "nonzeros": sum(t.nonzeros for t in tensors),
        "linear": _summary(linear),
        "layers": [_summary(group, layer) for layer, group in sorted(_by_layer(linear).items())],
        "tensors": [t.to_dict() for t in tensors],
        "recipe": metadata.get("recipe"),
        "report": metadata.get("report"),
        "perplexity": metadata.get("perplexity"),
        "compressed": metadata.get(MANIFEST_KEY),
    }


def _by_layer(tensors: list[TensorInfo]) -> dict[int | None, list[TensorInfo]]:
    groups: dict[int | None, list[TensorInfo]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.layer, []).append(tensor)
    return groups


def _summary(tensors: list[TensorInfo], layer: int | None = None) -> dict[str, Any]:
    """Parameters, non-zeros, sparsity, the N:M patterns all of ``tensors`` satisfy and their layouts."""
    parameters = sum(t.parameters for t in tensors)
    nonzeros = sum(t.nonzeros for t in tensors)
    shared = set.intersection(*(set(t.patterns) for t in tensors)) if tensors else set()
    layouts: dict[str, int] = {}
    for tensor in tensors:
        if tensor.layout is not None:
            layouts[tensor.layout] = layouts.get(tensor.layout, 0) + 1
    return {
        "layer": layer,
        "parameters": parameters,
        "nonzeros": nonzeros,
        "sparsity": 1 - nonzeros / parameters if parameters else 0.0,
        "patterns": sorted(shared, key=lambda p: (int(p.split(":")[1]), int(p.split(":")[0]))),
        "layouts": layouts,
    }
