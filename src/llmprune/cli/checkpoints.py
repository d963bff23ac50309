"""Commands on saved checkpoints: ``compress``, ``decompress`` and ``inspect``."""

from __future__ import annotations

import json
from typing import Any

import click
from pydantic import Field

from llmprune.config import StrictModel, build

from .console import console, out
from .options import config_options, given
from .render import counted_progress


class CopyOptions(StrictModel):
    """``llmprune compress`` / ``decompress``: where the converted checkpoint goes."""

    output: str = Field(description="output directory (required)")
    overwrite: bool = Field(False, description="replace --output if it is an llmprune output (or empty)")
    quiet: bool = Field(False, description="no progress bar")


def _size(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def _print_sizes(manifest: dict[str, Any]) -> None:
    for layout, counts in manifest["layouts"].items():
        out.print(
            f"{layout}: {counts['tensors']} tensors, {_size(counts['dense_bytes'])} dense → "
            f"{_size(counts['stored_bytes'])} ({counts['stored_bytes'] / counts['dense_bytes']:.4f}×)",
            soft_wrap=True,
        )


@click.command()
@click.argument("directory", type=click.Path())
@config_options(CopyOptions)
def compress(directory: str, **flags: Any) -> None:
    """Store the checkpoint DIRECTORY with its sparse weights packed (non-zeros plus a bitmask or N:M
    positions); llmprune.load reads it, llmprune decompress restores the plain checkpoint."""
    from llmprune.export.compressed import compress
    from llmprune.models.packed import MANIFEST_KEY
    from llmprune.storage import read_metadata

    options = build(CopyOptions, given(flags))
    with counted_progress(console, "compressing tensors", options.quiet) as advance:
        saved = compress(directory, options.output, options.overwrite, advance)
    _print_sizes(read_metadata(saved)[MANIFEST_KEY])
    out.print(f"saved to {saved}", soft_wrap=True)


@click.command()
@click.argument("directory", type=click.Path())
@config_options(CopyOptions)
def decompress(directory: str, **flags: Any) -> None:
    """Write the plain checkpoint (dense safetensors, loadable by transformers) that the compressed
    checkpoint DIRECTORY holds, every checksum verified."""
    from llmprune.export.compressed import decompress

    options = build(CopyOptions, given(flags))
    with counted_progress(console, "decompressing tensors", options.quiet) as advance:
        saved = decompress(directory, options.output, options.overwrite, advance)
    out.print(f"saved to {saved}", soft_wrap=True)


@click.command()
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print JSON (every tensor) instead of tables")
@click.option("--tensors", is_flag=True, help="one row per tensor instead of one per decoder layer")
def inspect(model_dir: str, as_json: bool, tensors: bool) -> None:
    """Per-layer sparsity, N:M compliance, parameter counts, file sizes and the recorded recipe of the
    checkpoint MODEL_DIR (plain, pruned or compressed), read one tensor at a time."""
    from llmprune.export.inspection import check_checkpoint, inspect_checkpoint

    check_checkpoint(model_dir)
    with counted_progress(console, "reading tensors", as_json) as advance:
        info = inspect_checkpoint(model_dir, advance)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    out.print(_tensor_table(info) if tensors else _layer_table(info))
    for line in _summary_lines(info):
        out.print(line, soft_wrap=True, markup=False, highlight=False)


def _layer_table(info: dict[str, Any]):
    from rich.table import Table

    compressed = info["kind"] == "compressed"
    table = Table(title="linear weights per decoder layer")
    for column in ("layer", "parameters", "non-zero", "sparsity", "N:M (every weight)"):
        table.add_column(column, justify="right" if column != "N:M (every weight)" else "left")
    if compressed:
        table.add_column("stored as")
    for row in info["layers"]:
        cells = [
            "-" if row["layer"] is None else str(row["layer"]),
            f"{row['parameters']:,}",
            f"{row['nonzeros']:,}",
            f"{row['sparsity']:.2%}",
            ", ".join(row["patterns"]) or "-",
        ]
        if compressed:
            cells.append(", ".join(f"{k}×{v}" for k, v in row["layouts"].items()))
        table.add_row(*cells)
    return table


def _tensor_table(info: dict[str, Any]):
    from rich.table import Table

    table = Table(title="tensors")
    for column in ("tensor", "shape", "dtype", "sparsity", "N:M", "stored as"):
        table.add_column(column)
    for row in info["tensors"]:
        table.add_row(
            row["name"],
            "×".join(map(str, row["shape"])),
            row["dtype"],
            f"{row['sparsity']:.2%}",
            ", ".join(row["patterns"]) or "-",
            row["layout"] or "",
        )
    return table


def _summary_lines(info: dict[str, Any]) -> list[str]:
    linear = info["linear"]
    weight_files = sum(name.endswith(".safetensors") for name in info["files"])
    lines = [
        f"{info['path']}: {info['kind']} checkpoint, {_size(info['disk_bytes'])} on disk "
        f"({_size(info['weights_bytes'])} of weights in {weight_files} file(s))",
        f"parameters {info['parameters']:,}, non-zero {info['nonzeros']:,} "
        f"({1 - info['nonzeros'] / max(info['parameters'], 1):.2%} zeros)",
        f"linear weights {linear['parameters']:,}, sparsity {linear['sparsity']:.2%}"
        + (f", every one {', '.join(linear['patterns'])}" if linear["patterns"] else ""),
    ]
    if info["compressed"]:
        for layout, counts in info["compressed"]["layouts"].items():
            lines.append(
                f"stored {layout}: {counts['tensors']} tensors, "
                f"{counts['stored_bytes'] / counts['dense_bytes']:.4f}× their dense bytes"
            )
    recipe = info["recipe"]
    if recipe:
        pattern = recipe.get("pattern")
        lines.append(
            f"recipe: {recipe.get('method')} {pattern}"
            + (f" sparsity {recipe.get('sparsity')}" if pattern == "unstructured" else "")
            + f" on {recipe.get('model')}; calibration {recipe.get('calibration')} "
            f"{recipe.get('nsamples')}×{recipe.get('seqlen')}"
        )
    report = info["report"]
    if report:
        lines.append(f"recorded achieved sparsity {report.get('achieved_sparsity', 0):.2%}")
    perplexity = info["perplexity"] or {}
    if perplexity.get("pruned") is not None:
        dense, pruned = perplexity["dense"], perplexity["pruned"]
        lines.append(f"recorded perplexity: dense {dense:.2f} → pruned {pruned:.2f}")
    return lines
