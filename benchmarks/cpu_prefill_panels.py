"""Prefill on the CPU sparse kernels: the weight expanded a panel of rows at a time against expanded whole,
against the dense-with-zeros model, alternated in one process (issue 16). By hand.

The synthetic Llama of ``cpu_end_to_end.py`` (``--layers`` decoder layers), pruned by magnitude to
``--sparsity``, one prompt of ``--prompt-len`` tokens through the model (no generation): the dense model,
then the swapped copy with ``sparse_linear.PANEL_BYTES`` unbounded (every weight expanded whole), then the
same copy with the default panels; median of ``--repeats`` rounds after the first.

    python benchmarks/cpu_prefill_panels.py --layers 30 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from cpu_end_to_end import prune_by_magnitude, synthetic_llama  # next to this script
from cpu_kernels import machine_info, print_machine

import llmprune
from llmprune.inference import sparse_linear

UNBOUNDED = 1 << 62


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(machine_info())
    dense = synthetic_llama(args.layers)
    prune_by_magnitude(dense, args.sparsity)
    sparse = copy.deepcopy(dense)
    llmprune.use_sparse_kernels(sparse, backend="cpu")
    prompt = torch.randint(0, dense.config.vocab_size, (1, args.prompt_len))
    default_panel = sparse_linear.PANEL_BYTES
    variants = {"dense": (dense, default_panel), "expanded whole": (sparse, UNBOUNDED),
                "panels": (sparse, default_panel)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            for name, (model, panel) in variants.items():
                sparse_linear.PANEL_BYTES = panel
                started = time.perf_counter()
                model(prompt)
                seconds[name].append(time.perf_counter() - started)
    sparse_linear.PANEL_BYTES = default_panel
    median = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    print(f"\n{args.layers} layers, {args.sparsity:.0%}, prompt {args.prompt_len}, {args.threads} threads\n")
    print("| variant | prefill s | tokens/s | against dense |\n|---|---|---|---|")
    for name, value in median.items():
        ratio = median["dense"] / value
        print(f"| {name} | {value:.3f} | {args.prompt_len / value:.1f} | **{ratio:.2f}×** |")


if __name__ == "__main__":
    main()
