"""``llmprune.load``: the one loader, for every model llmprune reads or writes (the top of the loading
stack: it may import anything below).

- a hub id, a local checkpoint directory (plain, or pruned by llmprune: unstructured or N:M sparsity,
  structured pruning with the same width in every layer), a ``.gguf`` file, or ``smollm2`` (the embedded
  model): loaded with ``transformers`` (``models.loading.load_plain_model``);
- compact sparse checkpoints (``--save-format compressed``, ``models/packed.py``): every tensor decoded and
  verified, then the model built from them;
- models whose decoder layers have different widths (adaptive structured pruning,
  ``structured/checkpoint.py``).

Which of the last two a directory holds is recorded in its ``llmprune.json``. The deprecated names of
earlier releases (``llmprune.load_model``, ``llmprune.load_embedded_model``) warn in ``llmprune/__init__.py``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from llmprune.models.loading import EMBEDDED_ALIAS, check_model_name, load_plain_model, load_tokenizer
from llmprune.models.packed import CompressedCheckpoint, is_compressed
from llmprune.storage import read_metadata
from llmprune.structured.checkpoint import WIDTHS_KEY, load_with_widths


def load(name_or_path: str | Path = EMBEDDED_ALIAS, dtype: str = "auto", device: str = "auto") -> nn.Module:
    """Load a causal LM in eval mode on ``device`` (``auto``: CUDA when there is a GPU): a hub id, a
    checkpoint directory (plain, pruned, compressed or of adaptive widths), a ``.gguf`` file or
    ``smollm2``. ``dtype`` ``auto``: bfloat16 on CUDA, else float32."""
    name = str(name_or_path)
    check_model_name(name, tokenizer=False)  # a damaged or pickle checkpoint fails here, in one line
    path = Path(name).expanduser()
    if is_compressed(path):  # packed sparse weights
        return _load_compressed(path, dtype, device)
    if path.is_dir():
        widths = read_metadata(path).get(WIDTHS_KEY)
        if widths is not None:  # adaptive structured pruning: each decoder layer has its own widths
            return load_with_widths(path, widths, dtype, device)
    return load_plain_model(name, dtype, device)


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
