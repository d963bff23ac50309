"""``llmprune.load``: the one loader for every checkpoint llmprune writes.

Plain checkpoints (unstructured or N:M sparsity, structured pruning with the same width in every layer)
load with ``transformers`` as they are; this function also opens the two layouts that need llmprune:
compact sparse checkpoints (``--save-format compressed``) and models whose decoder layers have
different widths (adaptive structured pruning). Which one a directory holds is recorded in ``llmprune.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmprune.errors import UsageError
from llmprune.export.save import METADATA_FILE


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The ``llmprune.json`` of a saved model, or ``{}`` for a checkpoint llmprune did not write."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise UsageError(f"{path} is damaged: not a JSON object")
    return metadata


def load(path: str | Path, dtype: str = "auto", device: str = "auto"):
    """Load a model saved by llmprune (or any causal LM checkpoint), in eval mode, on ``device``."""
    from llmprune.export.compressed import is_compressed, load_compressed
    from llmprune.models.loading import check_model_name, load_model
    from llmprune.structured.checkpoint import WIDTHS_KEY, load_with_widths

    check_model_name(str(path), tokenizer=False)  # a damaged or pickle checkpoint fails here, in one line
    if is_compressed(path):  # packed sparse weights (export/compressed.py)
        return load_compressed(path, dtype, device)
    metadata = read_metadata(path)
    if WIDTHS_KEY in metadata:  # adaptive structured pruning: each decoder layer has its own widths
        return load_with_widths(path, metadata[WIDTHS_KEY], dtype, device)
    return load_model(str(path), dtype, device)
