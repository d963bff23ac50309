"""Saving a pruned model: a plain Hugging Face checkpoint plus ``llmprune.json``, written atomically.

Everything goes to a temporary sibling directory that is renamed into place only when complete, so a
crash or Ctrl-C never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmprune.errors import UsageError

METADATA_FILE = "llmprune.json"


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output (before any work) unless overwriting."""
    if output.exists() and not overwrite:
        raise UsageError(f"output {output} exists; pass --overwrite or choose another --output")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory")


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    from llmprune import __version__

    return {
        "llmprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def staged_directory(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``output`` to write into; renamed to ``output`` (fsynced) only if the block
    completes, and removed on any failure, so ``output`` is never half-written."""
    output = Path(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    retired = output.with_name(f".{output.name}.old-{os.getpid()}")
    for stale in output.parent.glob(f".{output.name}.tmp-*"):  # left by a killed run
        if not _running(stale.name.rpartition("-")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if output.exists():
            os.replace(output, retired)
        try:
            os.replace(staging, output)
        except BaseException:
            if retired.exists() and not output.exists():
                os.replace(retired, output)  # put the previous output back
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def _running(pid: str) -> bool:
    """Whether a process with this id exists (a staging directory's owner may still be writing)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)``, fsync it, rename it to ``path`` and fsync the directory."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")


def save_pruned(
    model,
    tokenizer,
    output: str | Path,
    metadata: dict[str, Any],
    overwrite: bool = False,
    save_format: str = "dense",
) -> Path:
    """Write weights, tokenizer and ``llmprune.json`` to ``output`` atomically; returns the path.
    ``save_format="compressed"`` packs the sparse weights (``export/compressed.py``); decoder layers of
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
            from llmprune.export.compressed import MANIFEST_KEY, compress_weights

            metadata[MANIFEST_KEY] = compress_weights(staging, staging)
        write_metadata(staging, metadata)
    return Path(output)
