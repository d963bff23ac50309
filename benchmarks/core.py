"""Core benchmark on the embedded model, public protocol (issue 2). Run by hand; writes JSON and Markdown.

Protocol: the embedded text tokenized whole; calibration = 32 windows x 256 tokens drawn with seed 0 from
the first 70 % of the tokens; evaluation = the first 16 non-overlapping 512-token windows of the last 20 %.

Every cell runs in its own process so that its peak RSS is its own. The speed floor (two passes of the
decoder layers over the calibration tokens at batch 1) is measured in the same invocation.

    python benchmarks/core.py --out benchmarks/out/core.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from speed import floor_seconds  # benchmarks/speed.py, next to this script

import llmprune

NSAMPLES, SEQLEN, SEED, EVAL_WINDOWS, EVAL_SEQLEN = 32, 256, 0, 16, 512
GRID = [
    (method, pattern, ts)
    for method in ("magnitude", "wanda", "sparsegpt")
    for pattern in ("unstructured", "2:4", "4:8")
    for ts in (False,)
] + [(method, pattern, True) for method in ("wanda", "sparsegpt") for pattern in ("unstructured", "2:4")]


def _data():
    model, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
    calibration = llmprune.calibration_data(tokenizer, "embedded", NSAMPLES, SEQLEN, SEED)
    evaluation = llmprune.evaluation_data(tokenizer, "embedded", EVAL_SEQLEN, EVAL_WINDOWS)
    return model, calibration, evaluation


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def floor() -> dict:
    """Two passes of each decoder layer over the calibration tokens at batch 1: no statistics, no pruning."""
    model, calibration, _ = _data()
    return {"floor_seconds": floor_seconds(model, calibration)}


def cell(method: str, pattern: str, true_sequential: bool) -> dict:
    model, calibration, evaluation = _data()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer = NSAMPLES * SEQLEN * model.config.hidden_size * 4
    before = _peak_rss()
    report = llmprune.prune(
        model, calibration, method=method, pattern=pattern, true_sequential=true_sequential
    )
    return {
        "method": method,
        "pattern": pattern,
        "true_sequential": true_sequential,
        "seconds": report.seconds,
        "perplexity": llmprune.perplexity(model, evaluation),
        "achieved_sparsity": report.achieved_sparsity,
        "damping_raised": report.damping_raised,
        "peak_rss_during_prune": report.peak_rss_bytes,
        "peak_rss_before_prune": before,
        "weights_bytes": weights,
        "activation_buffer_bytes": buffer,
    }


def dense() -> dict:
    model, _, evaluation = _data()
    return {"perplexity": llmprune.perplexity(model, evaluation)}


def _child(*args: str) -> dict:
    command = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out/core.json")
    parser.add_argument("--child", nargs="*")
    parser.add_argument(
        "--only-true-sequential", action="store_true", help="run only the true-sequential cells"
    )
    parser.add_argument("--method", help="run only this method's cells")
    args = parser.parse_args()
    if args.child is not None:
        kind, *rest = args.child
        if kind == "floor":
            result = floor()
        elif kind == "dense":
            result = dense()
        else:
            result = cell(rest[0], rest[1], rest[2] == "1")
        print(json.dumps(result))
        return

    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.platform()}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "floor_before": _child("floor")["floor_seconds"],
        "dense": _child("dense"),
        "cells": [],
    }
    print(
        f"floor {results['floor_before']:.1f} s, dense ppl {results['dense']['perplexity']:.2f}", flush=True
    )
    grid = [cell for cell in GRID if cell[2]] if args.only_true_sequential else GRID
    grid = [cell for cell in grid if args.method in (None, cell[0])]
    for method, pattern, ts in grid:
        row = _child("cell", method, pattern, "1" if ts else "0")
        results["cells"].append(row)
        print(
            f"{method:10s} {pattern:12s} ts={ts!s:5s} ppl {row['perplexity']:8.2f}  {row['seconds']:6.1f} s  "
            f"peak RSS {row['peak_rss_during_prune'] / 2**30:.2f} GiB",
            flush=True,
        )
    # The floor again at the end: the machine's speed drifts; ratios use the mean of both.
    results["floor_after"] = _child("floor")["floor_seconds"]
    results["floor"] = (results["floor_before"] + results["floor_after"]) / 2
    print(f"floor after {results['floor_after']:.1f} s; mean {results['floor']:.1f} s")
    for row in results["cells"]:
        row["time_over_floor"] = row["seconds"] / results["floor"]
        print(
            f"{row['method']:10s} {row['pattern']:12s} ts={row['true_sequential']!s:5s} "
            f"{row['time_over_floor']:.2f}x floor"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
