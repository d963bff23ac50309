"""A sweep's results: ``results.csv`` / ``results.json`` / ``results.md``, per-layer sparsity, PNG plots and a
self-contained ``report.html`` (plots embedded as data URIs). Every file is written atomically."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import yaml

from llmprune.storage import write_atomically

TABLE_COLUMNS = (
    "key",
    "method",
    "pattern",
    "target_sparsity",
    "achieved_sparsity",
    "perplexity",
    "prune_seconds",
    "eval_seconds",
    "finished_at",
)
STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1100px; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:nth-child(-n+3) { text-align: left; }
img { max-width: 100%; }
pre { background: #f5f5f5; padding: 6px; }
"""
MARKERS = {"unstructured": "o"}
NM_MARKERS = ("*", "s", "^", "D", "v", "P")


def block_sparsity(record: dict[str, Any]) -> dict[int, float]:
    """Sparsity of each decoder layer: zeros over weights of its pruned linear layers."""
    totals: dict[int, list[float]] = {}
    for row in record["layers"]:
        weight = row["weights"]
        zeros, count = totals.setdefault(row["layer"], [0.0, 0.0])
        totals[row["layer"]] = [zeros + row["sparsity"] * weight, count + weight]
    return {block: zeros / count for block, (zeros, count) in sorted(totals.items())}


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def results_table(records: list[dict[str, Any]]) -> str:
    """``results.csv``: one row per cell, the recipe as a JSON column."""
    rows = [[*TABLE_COLUMNS, "recipe"]]
    rows += [[r[c] for c in TABLE_COLUMNS] + [json.dumps(r["recipe"], sort_keys=True)] for r in records]
    return _csv(rows)


def layer_table(records: list[dict[str, Any]]) -> str:
    """``layer_sparsity.csv``: one row per cell, one column per decoder layer."""
    per_cell = [block_sparsity(r) for r in records]
    blocks = sorted({b for cell in per_cell for b in cell})
    rows = [["key", *(f"layer_{b}" for b in blocks)]]
    rows += [
        [r["key"], *(cell.get(b, "") for b in blocks)] for r, cell in zip(records, per_cell, strict=True)
    ]
    return _csv(rows)


def _column(record: dict[str, Any]) -> str:
    return f"{record['target_sparsity']:.0%}" if record["pattern"] == "unstructured" else record["pattern"]


def markdown_table(records: list[dict[str, Any]], dense: float | None) -> str:
    """``results.md``: perplexity with a row per method and a column per sparsity or N:M pattern."""
    ordered = sorted(
        records, key=lambda r: (r["pattern"] != "unstructured", r["target_sparsity"], r["pattern"])
    )
    columns = list(dict.fromkeys(_column(r) for r in ordered))
    methods = list(dict.fromkeys(r["method"] for r in records))
    values = {(r["method"], _column(r)): f"{r['perplexity']:.2f}" for r in records}
    lines = [
        "| perplexity | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
        f"| dense | {'' if dense is None else f'{dense:.2f}'} |" + " |" * (len(columns) - 1),
    ]
    lines += [f"| {m} | " + " | ".join(values.get((m, c), "–") for c in columns) + " |" for m in methods]
    return "\n".join(lines) + "\n"


def perplexity_figure(records: list[dict[str, Any]], dense: float | None):
    """Perplexity against target sparsity, log scale: a line per method over its unstructured cells, a
    marker per N:M pattern, the dense model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    nm_patterns = sorted({r["pattern"] for r in records if r["pattern"] != "unstructured"})
    markers = {**MARKERS, **dict(zip(nm_patterns, NM_MARKERS, strict=False))}
    methods = list(dict.fromkeys(r["method"] for r in records))
    for number, method in enumerate(methods):
        color = colors[number % len(colors)]
        for pattern in dict.fromkeys(r["pattern"] for r in records):
            cells = sorted(
                (r for r in records if r["method"] == method and r["pattern"] == pattern),
                key=lambda r: r["target_sparsity"],
            )
            if not cells:
                continue
            x = [r["target_sparsity"] for r in cells]
            y = [r["perplexity"] for r in cells]
            style = "-" if pattern == "unstructured" else "none"
            size = 11 if pattern != "unstructured" else 6
            axes.plot(
                x,
                y,
                linestyle=style,
                marker=markers.get(pattern, "x"),
                markersize=size,
                color=color,
                label=f"{method}, {pattern}",
            )
    if dense is not None:
        axes.axhline(dense, color="gray", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    axes.set_yscale("log")
    axes.set_xlabel("sparsity (fraction of weights removed)")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title("Perplexity against sparsity")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def heatmap_figure(records: list[dict[str, Any]]):
    """Achieved sparsity per decoder layer (columns) for every cell (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    per_cell = [block_sparsity(r) for r in records]
    blocks = sorted({b for cell in per_cell for b in cell})
    grid = [[cell.get(b, float("nan")) for b in blocks] for cell in per_cell]
    figure, axes = plt.subplots(figsize=(max(6, 0.25 * len(blocks) + 3), max(3, 0.3 * len(records) + 1.5)))
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes.set_yticks(range(len(records)), [r["key"] for r in records], fontsize=7)
    step = max(1, len(blocks) // 15)
    axes.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=7)
    axes.set_xlabel("decoder layer")
    axes.set_title("Achieved sparsity per decoder layer")
    figure.colorbar(image, ax=axes, label="sparsity")
    figure.tight_layout()
    return figure


def _png(figure) -> bytes:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _number(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def html_report(summary: dict[str, Any], records: list[dict[str, Any]], images: dict[str, bytes]) -> str:
    """One HTML file with no outside references: the table, the plots as data URIs, every cell's recipe."""
    head = ["cell", "method", "pattern", "target", "achieved", "perplexity", "prune s", "eval s"]
    rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{cell}</td>"
            for cell in (
                html.escape(r["key"]),
                html.escape(r["method"]),
                html.escape(r["pattern"]),
                f"{r['target_sparsity']:.2%}",
                f"{r['achieved_sparsity']:.2%}",
                _number(r["perplexity"]),
                _number(r["prune_seconds"], 1),
                _number(r["eval_seconds"], 1),
            )
        )
        + "</tr>"
        for r in records
    )
    pictures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{_base64(data)}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, data in images.items()
    )
    recipes = "\n".join(
        f"<details><summary>{html.escape(r['key'])}</summary><pre>"
        f"{html.escape(yaml.safe_dump(r['recipe'], sort_keys=True))}</pre></details>"
        for r in records
    )
    settings = html.escape(json.dumps(summary["config"], indent=2))
    dense = summary.get("dense_perplexity")
    model = html.escape(summary["config"]["model"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>llmprune sweep: {model}</title>
<style>{STYLE}</style></head><body>
<h1>llmprune sweep</h1>
<p>Model <code>{model}</code>; dense perplexity
<b>{_number(dense)}</b> on {html.escape(str(summary["config"]["eval_data"]))}
({summary.get("eval_windows", "?")}×{summary["config"]["eval_seqlen"]} tokens);
calibration {html.escape(str(summary["config"]["calibration"]))}
{summary["config"]["nsamples"]}×{summary["config"]["seqlen"]} (seed {summary["config"]["seed"]}).</p>
<h2>Results</h2>
<table id="results"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>
<tbody>
{rows}
</tbody></table>
<h2>Plots</h2>
{pictures}
<h2>Recipes</h2>
<p>Every option of each cell, as a recipe for <code>llmprune prune --recipe</code>.</p>
{recipes}
<h2>Sweep options</h2>
<pre>{settings}</pre>
</body></html>
"""


def write_report(
    output: Path, config, state: dict[str, Any], records: list[dict[str, Any]]
) -> dict[str, Path]:
    """Write every result file into ``output``; returns them by name."""
    files = {
        name: output / name
        for name in (
            "results.csv",
            "results.json",
            "results.md",
            "layer_sparsity.csv",
            "perplexity.png",
            "layer_sparsity.png",
            "report.html",
        )
    }
    summary = {
        "config": config.identity(),
        "dense_perplexity": state.get("dense_perplexity"),
        "eval_windows": state.get("eval_windows"),
        "versions": state.get("versions"),
    }
    _write_text(
        files["results.json"], json.dumps({**summary, "cells": records}, indent=2, default=str) + "\n"
    )
    _write_text(files["results.csv"], results_table(records))
    _write_text(files["results.md"], markdown_table(records, summary["dense_perplexity"]))
    _write_text(files["layer_sparsity.csv"], layer_table(records))
    images = {
        "perplexity.png": _png(perplexity_figure(records, summary["dense_perplexity"])),
        "layer_sparsity.png": _png(heatmap_figure(records)),
    }
    for name, data in images.items():
        write_atomically(files[name], lambda tmp, data=data: tmp.write_bytes(data))
    _write_text(files["report.html"], html_report(summary, records, images))
    return files
