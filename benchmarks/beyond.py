"""Beyond SparseGPT (issue 17): OWL, re-solve, swaps, block reconstruction and the preset, on the embedded
model with the public protocol of the core benchmark. Run by hand; writes JSON as each cell finishes.

Protocol: calibration = 32 windows x 256 tokens drawn with seed 0 from the first 70 % of the embedded
text; evaluation = the first 16 non-overlapping 512-token windows of its last 20 %. Hyperparameters are
chosen on held-out windows: 8 non-overlapping 512-token windows of the first 70 % that share no token with
the calibration windows (``llmprune.heldout_data``). ``tune`` measures the held-out perplexity only and
never touches the evaluation windows; ``run`` measures both.

Every cell starts from the same dense weights in one process, so prune times are ratios to the plain
SparseGPT cell of the same pattern measured in the same invocation.

    python benchmarks/beyond.py tune --grid owl --out benchmarks/out/beyond_tune_owl.json
    python benchmarks/beyond.py run --grid targets --out benchmarks/out/beyond_targets.json
    python benchmarks/beyond.py run --grid ablation --out benchmarks/out/beyond_ablation.json
    python benchmarks/beyond.py plot benchmarks/out/beyond_*.json --out docs/beyond_perplexity.png
    python benchmarks/beyond.py table benchmarks/out/beyond_ablation*.json

``plot`` draws the evaluation perplexities of finished runs against sparsity (the sweep's figure); ``table``
prints them as Markdown with the held-out perplexities and prune-time ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import llmprune
from llmprune.config import PRESETS
from llmprune.methods.patterns import Pattern

NSAMPLES, SEQLEN, SEED, EVAL_WINDOWS, EVAL_SEQLEN = 32, 256, 0, 16, 512

PATTERNS = {"50%": {"sparsity": 0.5}, "60%": {"sparsity": 0.6}, "70%": {"sparsity": 0.7}}
PATTERNS |= {"2:4": {"pattern": "2:4"}, "4:8": {"pattern": "4:8"}}


def _grid(name: str, patterns: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(pattern, setting, options) cells of a named grid."""
    settings: dict[str, dict[str, Any]]
    if name == "owl":  # λ (and M) on top of SparseGPT (unstructured only)
        settings = {"sparsegpt": {"method": "sparsegpt"}}
        for lam, m in ((0.04, 5.0), (0.08, 5.0), (0.12, 5.0), (0.08, 3.0), (0.08, 7.0)):
            settings[f"sparsegpt owl λ={lam} M={m:g}"] = {
                "method": "sparsegpt", "schedule": "owl", "owl_lambda": lam, "owl_threshold": m
            }
    elif name == "refine":
        settings = {"sparsegpt": {"method": "sparsegpt"}}
        for it in (20, 50, 100):
            options = {"method": "sparsegpt", "refine": "resolve", "refine_iterations": it}
            settings[f"sparsegpt resolve {it}"] = options
        settings["sparsegpt swaps,resolve"] = {"method": "sparsegpt", "refine": "swaps,resolve"}
        settings["wanda swaps,resolve"] = {"method": "wanda", "refine": "swaps,resolve"}
    elif name == "reconstruct":
        settings = {"sparsegpt": {"method": "sparsegpt"}}
        modes = (("layer", 1e-3), ("dense", 1e-3), ("sublayer", 1e-3), ("layer", 3e-4), ("layer", 3e-3))
        for mode, lr in modes:
            settings[f"sparsegpt {mode} lr={lr:g}"] = {
                "method": "sparsegpt", "reconstruct": mode, "reconstruct_lr": lr,
            }
    elif name == "combine":  # re-solve with block reconstruction, steps and learning rate
        settings = {"sparsegpt": {"method": "sparsegpt"}}
        base = {"method": "sparsegpt", "refine": "resolve", "refine_iterations": 20, "reconstruct": "dense"}
        for steps, lr in ((8, 1e-3), (8, 3e-3), (16, 1e-3)):
            settings[f"sparsegpt resolve 20 dense steps={steps} lr={lr:g}"] = {
                **base, "reconstruct_steps": steps, "reconstruct_lr": lr
            }
    elif name == "swaps":  # swaps are costly: few rounds, with and without
        settings = {"sparsegpt": {"method": "sparsegpt"}}
        for method in ("sparsegpt", "wanda"):
            resolve = {"method": method, "refine": "resolve", "refine_iterations": 20}
            settings[f"{method} resolve 20"] = resolve
            swaps = {**resolve, "refine": "swaps,resolve", "swap_rounds": 10}
            settings[f"{method} swaps 10 resolve 20"] = swaps
    elif name == "ablation":  # each component alone, and combined, with the preset's settings
        best = PRESETS["best"]
        resolve = {"refine": "resolve", "refine_iterations": best["refine_iterations"]}
        reconstruct = {k: best[k] for k in ("reconstruct", "reconstruct_steps", "reconstruct_lr")}
        settings = {}
        for method in ("wanda", "sparsegpt"):
            plain = {"method": method}
            settings[method] = plain
            settings[f"{method} + resolve"] = {**plain, **resolve}
            settings[f"{method} + reconstruct"] = {**plain, **reconstruct}
            settings[f"{method} + owl"] = {**plain, "schedule": "owl"}
        settings["wanda + resolve + reconstruct"] = {"method": "wanda", **resolve, **reconstruct}
        settings["best"] = {"preset": "best"}  # everything combined
        settings = {"sparsegpt": settings.pop("sparsegpt"), **settings}  # the baseline first
    elif name == "targets":
        settings = {"sparsegpt": {"method": "sparsegpt"}, "best": {"preset": "best"}}
    else:
        raise SystemExit(f"unknown grid {name!r}")
    cells = []
    for pattern in patterns:
        for setting, options in settings.items():
            if "schedule" in options and pattern in ("2:4", "4:8"):
                continue  # OWL gives each layer its own sparsity: not for N:M
            cells.append((pattern, setting, {**PATTERNS[pattern], **options}))
    return cells


def _perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    return llmprune.perplexity(model, windows, seqlen=windows.shape[1])


def _finished(paths: list[Path], settings: list[str]) -> tuple[dict[tuple[str, str], dict[str, Any]], Any]:
    """Every (pattern, setting) cell with an evaluation perplexity in ``paths`` (a later file's cell replaces
    an earlier one's), and the dense evaluation perplexity."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    dense = None
    for path in paths:
        results = json.loads(path.read_text())
        dense = results["dense"].get("evaluation", dense)
        for cell in results["cells"]:
            if "evaluation" in cell and (not settings or cell["setting"] in settings):
                cells[cell["pattern"], cell["setting"]] = cell
    if not cells:
        raise SystemExit("no cell with an evaluation perplexity in these files")
    return cells, dense


def _plot(paths: list[Path], settings: list[str], out: Path) -> None:
    """The cells' evaluation perplexities as the sweep draws them: a line per setting over sparsity, a
    marker per N:M pattern."""
    from llmprune.sweeps.report import perplexity_figure

    cells, dense = _finished(paths, settings)
    records = []
    for (pattern, setting), cell in cells.items():
        options = PATTERNS[pattern]  # what the run pruned to: a sparsity or an N:M pattern
        nm = options.get("pattern")
        sparsity = options["sparsity"] if nm is None else Pattern.parse(nm).implied_sparsity
        records.append({"method": setting, "pattern": nm or "unstructured", "target_sparsity": sparsity,
                        "perplexity": cell["evaluation"]})
    order = {setting: i for i, setting in enumerate(settings)}
    records.sort(key=lambda r: order.get(r["method"], len(order)))
    figure = perplexity_figure(records, dense)
    figure.axes[0].set_title("Perplexity against sparsity: reference methods and what goes beyond them")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"{len(records)} cells -> {out}")


def _table(paths: list[Path], settings: list[str]) -> None:
    """A Markdown table: a row per setting, per pattern the evaluation perplexity, held-out perplexity and
    prune time ÷ the same run's SparseGPT."""
    cells, _ = _finished(paths, settings)
    patterns = list(dict.fromkeys(pattern for pattern, _ in cells))
    rows = settings or list(dict.fromkeys(setting for _, setting in cells))
    print("| setting | " + " | ".join(patterns) + " |")
    print("|---|" + "---|" * len(patterns))
    for setting in rows:
        values = []
        for pattern in patterns:
            cell = cells.get((pattern, setting))
            if cell is None:
                values.append("")
            else:
                values.append(f"{cell['evaluation']:.2f} / {cell['heldout']:.2f} / {cell['time_ratio']:.2f}×")
        print(f"| {setting} | " + " | ".join(values) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    pruning = argparse.ArgumentParser(add_help=False)
    grids = "owl, refine, reconstruct, combine, swaps, ablation or targets"
    pruning.add_argument("--grid", required=True, help=grids)
    names = ", ".join(PATTERNS).replace("%", "%%")  # argparse formats help text with %
    pruning.add_argument("--patterns", default="50%,70%,2:4", help=f"comma-separated: {names}")
    only = "run only settings whose name contains one of these comma-separated strings (and the baseline)"
    pruning.add_argument("--only", default="", help=only)
    pruning.add_argument("--out", type=Path, required=True, help="the JSON to write, cell by cell")
    modes.add_parser("tune", parents=[pruning], help="held-out windows only")
    modes.add_parser("run", parents=[pruning], help="held-out and evaluation windows")
    finished = argparse.ArgumentParser(add_help=False)
    finished.add_argument("inputs", type=Path, nargs="+", help="JSON files written by run")
    finished.add_argument("--settings", default="", help="comma-separated settings, in order (default: all)")
    plot = modes.add_parser("plot", parents=[finished], help="evaluation perplexity against sparsity")
    plot.add_argument("--out", type=Path, required=True, help="the PNG to write")
    modes.add_parser("table", parents=[finished], help="a Markdown table of finished cells")
    args = parser.parse_args()
    if args.mode in ("plot", "table"):
        settings = [part for part in args.settings.split(",") if part]
        if args.mode == "plot":
            _plot(args.inputs, settings, args.out)
        else:
            _table(args.inputs, settings)
        return
    wanted = [part for part in args.only.split(",") if part]
    torch.manual_seed(0)
    model, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
    calibration = llmprune.calibration_data(tokenizer, "embedded", NSAMPLES, SEQLEN, SEED)
    heldout = llmprune.heldout_data(tokenizer, "embedded", NSAMPLES, SEQLEN, SEED, EVAL_SEQLEN, 8)
    evaluation = llmprune.evaluation_data(tokenizer, "embedded", EVAL_SEQLEN, EVAL_WINDOWS)
    dense_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    results: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "dense": {"heldout": _perplexity(model, heldout)},
        "cells": [],
    }
    if args.mode == "run":
        results["dense"]["evaluation"] = _perplexity(model, evaluation)
    print(json.dumps(results["dense"]), flush=True)
    baseline: dict[str, float] = {}
    for pattern, setting, options in _grid(args.grid, args.patterns.split(",")):
        if wanted and setting != "sparsegpt" and not any(part in setting for part in wanted):
            continue
        model.load_state_dict(dense_state)
        start = time.perf_counter()
        report = llmprune.prune(model, calibration, **options)
        seconds = time.perf_counter() - start
        if setting == "sparsegpt":
            baseline[pattern] = seconds
        row: dict[str, Any] = {
            "pattern": pattern,
            "setting": setting,
            "options": options,
            "seconds": seconds,
            "time_ratio": seconds / baseline[pattern] if pattern in baseline else None,
            "achieved_sparsity": report.achieved_sparsity,
            "heldout": _perplexity(model, heldout),
            "layer_sparsities": report.layer_sparsities,
            "damping_raised": report.damping_raised,
        }
        if args.mode == "run":
            row["evaluation"] = _perplexity(model, evaluation)
        results["cells"].append(row)
        shown = {k: v for k, v in row.items() if k not in ("options", "layer_sparsities")}
        print(json.dumps(shown), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
