"""The method × pattern × sparsity grid on the embedded model, public protocol (issue 6). Run by hand.

Runs (or resumes: finished cells are kept in the output) ``llmprune sweep`` over the full grid with the
default run options, which are the core benchmark's protocol (calibration 32 × 256 from the embedded text,
seed 0; perplexity on the first 16 × 512 evaluation windows), then copies the report's plots to docs/ and
prints the Markdown table for docs/benchmarks.md.

    python benchmarks/sweep.py                       # about 15 cells × (prune + 16×512 perplexity)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

COMMAND = [
    "sweep",
    "--methods",
    "wanda,sparsegpt,magnitude",
    "--sparsities",
    "0.3,0.5,0.6,0.7",
    "--patterns",
    "unstructured,2:4",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="benchmarks/out/sweep-smollm2")
    parser.add_argument("--docs", default="docs", help="where the plots are copied")
    args = parser.parse_args()
    command = [sys.executable, "-m", "llmprune", *COMMAND, "--output", args.output]
    print("$ llmprune " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)
    output, docs = Path(args.output), Path(args.docs)
    for name in ("perplexity.png", "layer_sparsity.png"):
        shutil.copy(output / name, docs / f"sweep_{name}")
    print((output / "results.md").read_text())


if __name__ == "__main__":
    main()
