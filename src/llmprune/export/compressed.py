"""Compressing and decompressing a checkpoint directory: ``llmprune compress`` and ``llmprune decompress``.

The format (the weight files, the manifest in ``llmprune.json``, reading it back) is
``models/packed.py``; this module copies a whole checkpoint to and from it, atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from llmprune.errors import UsageError
from llmprune.export.card import base_model_of, write_card
from llmprune.export.save import write_model_metadata
from llmprune.models.packed import (
    MANIFEST_KEY,
    CompressedCheckpoint,
    Progress,
    compress_weights,
    is_compressed,
)
from llmprune.models.shards import INDEX_FILE, CheckpointShards, write_index
from llmprune.storage import METADATA_FILE, read_metadata, staged_directory


def _copy_other_files(source: Path, target: Path, weights: set[str]) -> None:
    """Config, tokenizer, generation config... everything but the weights and ``llmprune.json``."""
    for path in source.iterdir():
        if path.name in weights or path.name == METADATA_FILE or path.name.startswith("."):
            continue
        if path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)


def compress(
    directory: str | Path, output: str | Path, overwrite: bool = False, progress: Progress | None = None
) -> Path:
    """Write a compressed copy of the checkpoint ``directory`` to ``output``; returns ``output``.
    ``progress(done, total)`` is called after each tensor."""
    from llmprune.models.loading import check_model_name

    directory = Path(directory)
    if is_compressed(directory):
        raise UsageError(f"{directory} is compressed already")
    if not directory.is_dir():
        raise UsageError(f"checkpoint directory not found: {directory}")
    check_model_name(str(directory), tokenizer=False)
    shards = CheckpointShards(directory)
    metadata = read_metadata(directory)
    with staged_directory(output, overwrite) as staging:
        _copy_other_files(directory, staging, set(shards.weight_map.values()) | {INDEX_FILE})
        metadata[MANIFEST_KEY] = compress_weights(directory, staging, progress)
        write_model_metadata(staging, metadata, source=directory)
    return Path(output)


def decompress(
    directory: str | Path, output: str | Path, overwrite: bool = False, progress: Progress | None = None
) -> Path:
    """Write the plain (dense safetensors) checkpoint a compressed one holds to ``output``: the one
    that was compressed, tensor for tensor, which ``transformers`` loads as usual. ``progress(done, total)``
    is called after each tensor."""
    checkpoint = CompressedCheckpoint(directory)
    files: dict[str, list[str]] = {}
    for name in checkpoint.names():
        files.setdefault(checkpoint.dense_name(name), []).append(name)
    metadata = read_metadata(directory)
    del metadata[MANIFEST_KEY]
    with staged_directory(output, overwrite) as staging:
        _copy_other_files(checkpoint.directory, staging, set(checkpoint.manifest["files"]))
        weight_map, total = {}, 0
        for file, names in files.items():
            tensors = {}
            for name in names:
                tensors[name] = checkpoint.read(name)
                if progress is not None:
                    progress(len(weight_map) + len(tensors), len(checkpoint.entries))
            save_file(tensors, str(staging / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        if len(files) > 1:
            write_index(staging, weight_map, total)
        if metadata:
            write_model_metadata(staging, metadata, source=directory)
        else:  # not made by llmprune before it was compressed: no llmprune.json, the card replaced still
            write_card(staging, metadata, base_model_of(directory))
    return Path(output)
