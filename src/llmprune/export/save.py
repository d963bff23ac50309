"""Saving a pruned model: a plain Hugging Face checkpoint plus ``llmprune.json`` and a model card, written
atomically (into ``storage.staged_directory``, renamed into place only when complete).

``write_model_metadata`` is the one way a saved model's metadata is written: every save (this module's
``save_pruned``, the streamed save of ``llmprune prune --offload``, fine-tuning, compress and decompress)
goes through it, so every saved model has both ``llmprune.json`` and its ``README.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune.storage import staged_directory, write_metadata


def write_model_metadata(directory: Path, metadata: dict[str, Any], source: str | Path | None = None) -> None:
    """Write ``llmprune.json`` and the model card (``README.md``) of the model saved in ``directory`` (a
    staging directory). ``source``: what the model was made from, for the card's ``base_model`` (default:
    the model its recipe or fine-tuning names)."""
    from llmprune.export.card import base_model_of, write_card

    if source is None:
        source = ((metadata.get("finetune") or metadata.get("recipe")) or {}).get("model")
    write_metadata(directory, metadata)
    write_card(directory, metadata, base_model_of(source))


def save_pruned(
    model,
    tokenizer,
    output: str | Path,
    metadata: dict[str, Any],
    overwrite: bool = False,
    save_format: str = "dense",
) -> Path:
    """Write weights, tokenizer, ``llmprune.json`` and the model card to ``output`` atomically; returns the
    path. ``save_format="compressed"`` packs the sparse weights (``models/packed.py``); decoder layers of
    differing widths (adaptive structured pruning) are recorded in ``llmprune.json`` for ``llmprune.load``."""
    from llmprune.structured.checkpoint import WIDTHS_KEY, layer_widths

    widths = layer_widths(model)
    if widths is not None:
        metadata = {**metadata, WIDTHS_KEY: widths}
    with staged_directory(output, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if save_format == "compressed":
            from llmprune.models.packed import MANIFEST_KEY, compress_weights

            metadata[MANIFEST_KEY] = compress_weights(staging, staging)
        write_model_metadata(staging, metadata)
    return Path(output)
