"""``llmprune.load``: the one loader, for every model llmprune reads or writes (the top of the loading
stack: it may import anything below).

- a hub id, a local checkpoint directory (plain, or pruned by llmprune: unstructured or N:M sparsity,
  structured pruning with the same width in every layer), a ``.gguf`` file, or ``smollm2`` (the embedded
  model): loaded with ``transformers`` (``models.loading.load_plain_model``);
- compact sparse checkpoints (``--save-format compressed``, ``models/packed.py``): every tensor decoded and
  verified, then the model built from them;
- models whose decoder layers have different widths (adaptive structured pruning,
  ``structured/checkpoint.py``).

Which of the last two a directory holds is recorded in its ``llmprune.json``. With ``sparse_kernels="cpu"``
pruned and compressed checkpoints are loaded straight into the CPU kernels' ``SparseLinear`` modules
(``export/sparse_load.py``). The deprecated names of earlier releases (``llmprune.load_model``,
``llmprune.load_embedded_model``) warn in ``llmprune/__init__.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.models.loading import EMBEDDED_ALIAS, check_model_name, load_plain_model, load_tokenizer
from llmprune.models.packed import CompressedCheckpoint, is_compressed
from llmprune.storage import read_metadata
from llmprune.structured.checkpoint import WIDTHS_KEY, load_with_widths

SPARSE_KERNELS = ("cpu",)
"""Values of ``load``'s ``sparse_kernels`` (None: the dense model)."""


def load(
    name_or_path: str | Path = EMBEDDED_ALIAS,
    dtype: str = "auto",
    device: str = "auto",
    *,
    sparse_kernels: str | None = None,
) -> nn.Module:
    """Load a causal LM in eval mode on ``device`` (``auto``: CUDA when there is a GPU): a hub id, a
    checkpoint directory (plain, pruned, compressed or of adaptive widths), a ``.gguf`` file or
    ``smollm2``. ``dtype`` ``auto``: bfloat16 on CUDA, else float32.

    ``sparse_kernels="cpu"``: the linear layers sparse enough for the CPU kernels are loaded straight into
    ``SparseLinear`` modules, without the dense weights of the whole model in memory
    (``export/sparse_load.py``); ``model.sparse_kernels_report`` lists those left dense and why."""
    name = str(name_or_path)
    torch_dtype = None
    if sparse_kernels is not None:
        torch_dtype = _check_sparse_kernels(sparse_kernels, dtype, device)
    check_model_name(name, tokenizer=False)  # a damaged or pickle checkpoint fails here, in one line
    path = Path(name).expanduser()
    if is_compressed(path):  # packed sparse weights
        if torch_dtype is not None:
            return _sparse_load(path, compressed=True, dtype=torch_dtype)
        return _load_compressed(path, dtype, device)
    if path.is_dir():
        widths = read_metadata(path).get(WIDTHS_KEY)
        if widths is not None:  # adaptive structured pruning: each decoder layer has its own widths
            if torch_dtype is not None:
                raise UsageError(
                    f"{path} has per-layer widths (adaptive structured pruning): sparse_kernels loads "
                    "unstructured and N:M checkpoints only"
                )
            return load_with_widths(path, widths, dtype, device)
    if torch_dtype is not None:
        from llmprune.models.loading import local_checkpoint

        return _sparse_load(local_checkpoint(name), compressed=False, dtype=torch_dtype)
    return load_plain_model(name, dtype, device)


def _check_sparse_kernels(sparse_kernels: object, dtype: str, device: str) -> torch.dtype:
    """The dtype to load with ``sparse_kernels``, or a one-line UsageError before anything is read (an
    unknown value, a device other than the CPU, a dtype or a machine the kernels do not take)."""
    from llmprune.inference.kernels import require_sparse_kernels
    from llmprune.models.loading import resolve_dtype

    if sparse_kernels not in SPARSE_KERNELS:
        raise UsageError(f"sparse_kernels must be None or 'cpu', got {sparse_kernels!r}")
    if device not in ("auto", "cpu"):
        raise UsageError(f"sparse_kernels='cpu' runs on the CPU: pass device='cpu' or 'auto', not {device!r}")
    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    require_sparse_kernels(torch.device("cpu"), torch_dtype, backend="cpu")
    return torch_dtype


def _sparse_load(directory: Path, compressed: bool, dtype: torch.dtype) -> nn.Module:
    from llmprune.export.sparse_load import load_sparse

    return load_sparse(directory, compressed, dtype)


def _load_compressed(directory: Path, dtype: str, device: str) -> nn.Module:
    """The model of a compressed checkpoint, in eval mode: every tensor is decoded and verified first,
    then ``transformers`` builds the model from its config and those tensors."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    from llmprune.models.loading import resolve_device, resolve_dtype

    state = CompressedCheckpoint(directory).state_dict()
    target = resolve_device(device)
    config = AutoConfig.from_pretrained(directory)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the Auto class wants a path, not tensors
    model = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=resolve_dtype(dtype, target), use_safetensors=True
    )
    return model.to(target).eval()


def load_embedded_model(dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, object]:
    """The embedded SmolLM2-135M-Instruct with its tokenizer: what the deprecated
    ``llmprune.load_embedded_model`` returns (``llmprune/__init__.py`` warns when the name is touched)."""
    return load(EMBEDDED_ALIAS, dtype, device), load_tokenizer(EMBEDDED_ALIAS)
