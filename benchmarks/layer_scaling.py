"""Time to prune one decoder layer against hidden size (synthetic Llama layers, random weights). By hand.

SparseGPT's solve grows with the cube of a layer's input width (Cholesky, and the OBS update over
``rows x cols^2``); Wanda's work grows like the forward pass. Writes JSON and a PNG plot.

    python benchmarks/layer_scaling.py --out benchmarks/out/layer_scaling.json --plot docs/layer_scaling.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import llmprune

HIDDEN_SIZES = (512, 1024, 2048, 3072)
NSAMPLES, SEQLEN, VOCAB = 8, 256, 1024


def one_layer_model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=1,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out/layer_scaling.json")
    parser.add_argument("--plot", default="docs/layer_scaling.png")
    args = parser.parse_args()
    calibration = torch.randint(0, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))
    rows = []
    for hidden in HIDDEN_SIZES:
        for method in ("wanda", "sparsegpt"):
            model = one_layer_model(hidden)
            started = time.perf_counter()
            llmprune.prune(model, calibration, method=method)
            seconds = time.perf_counter() - started
            rows.append(
                {
                    "hidden": hidden,
                    "intermediate": model.config.intermediate_size,
                    "method": method,
                    "seconds": seconds,
                }
            )
            print(f"hidden {hidden:5d}  {method:9s}  {seconds:7.2f} s per layer", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for method in ("wanda", "sparsegpt"):
        points = [(r["hidden"], r["seconds"]) for r in rows if r["method"] == method]
        axes.loglog(*zip(*points, strict=True), marker="o", label=method)
    axes.set_xlabel("hidden size (intermediate = 8/3 x hidden)")
    axes.set_ylabel(f"seconds per decoder layer ({NSAMPLES}x{SEQLEN} tokens)")
    axes.set_title("Pruning time per layer, 2-vCPU CPU")
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
