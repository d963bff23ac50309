"""Streaming (``--offload``) on synthetic Llama models far larger than one layer (issue 3). Run by hand.

Builds random-weight Llama checkpoints in fp32 (hidden 2048, intermediate 5632, 32 heads / 4 key-value
heads, the embedded model's 49,152-token vocabulary, untied head) at several depths, written shard by
shard so that building them never holds a whole model either, then prunes each with Wanda and SparseGPT in
streaming mode, every cell in a fresh process, and records wall time and the process's peak RSS against
the checkpoint's size. The calibration is the embedded text (8 x 256 tokens by default); perplexity is
skipped (random weights).

    python benchmarks/streaming.py --root /tmp/llmprune-streaming --out benchmarks/out/streaming.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import llmprune
from llmprune.models.shards import ShardWriter

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 2048, 5632, 32, 4


def build_checkpoint(directory: Path, layers: int, seed: int = 0) -> int:
    """A random Llama checkpoint of ``layers`` decoder layers, one shard per layer; returns its bytes."""
    tokenizer = llmprune.load_tokenizer("smollm2")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)

    def random_like(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(tensor.shape)
        return torch.randn(tensor.shape, generator=generator) * 0.02

    shapes = skeleton.state_dict()
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    writer = ShardWriter(staging, layers + 1)
    outside = {name: t for name, t in shapes.items() if not name.startswith("model.layers.")}
    writer.write(1, {name: random_like(name, t) for name, t in outside.items()})
    for index in range(layers):
        prefix = f"model.layers.{index}."
        inside = {name: t for name, t in shapes.items() if name.startswith(prefix)}
        writer.write(index + 2, {name: random_like(name, t) for name, t in inside.items()})
    writer.finish()
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)
    return writer.total_size


def cell(model: str, method: str, offload: bool, nsamples: int, seqlen: int, output: str) -> dict:
    """One pruning run in this process (called in a fresh subprocess): time and peak RSS."""
    start = time.perf_counter()
    result = llmprune.run(
        llmprune.RunConfig(
            model=model,
            method=method,
            offload=offload,
            nsamples=nsamples,
            seqlen=seqlen,
            eval_nsamples=0,
            output=output,
            overwrite=True,
        )
    )
    return {
        "seconds": time.perf_counter() - start,
        "prune_seconds": result.report.seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "streamed": result.streamed,
        "achieved_sparsity": result.report.achieved_sparsity,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path("/tmp/llmprune-streaming"))
    parser.add_argument("--layers", default="8,16,30")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--in-memory", action="store_true", help="also run the smallest size in memory")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/streaming.json"))
    parser.add_argument("--cell", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        model, method, offload, nsamples, seqlen, output = args.cell
        print(json.dumps(cell(model, method, offload == "1", int(nsamples), int(seqlen), output)))
        return

    rows = []
    sizes = [int(n) for n in args.layers.split(",")]
    for layers in sizes:
        directory = args.root / f"llama-{layers}-layers"
        if not (directory / "config.json").is_file():
            started = time.perf_counter()
            build_checkpoint(directory, layers)
            print(f"built {directory} in {time.perf_counter() - started:.0f} s", flush=True)
        checkpoint_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        parameters = checkpoint_bytes // 4
        runs = [(method, True) for method in args.methods.split(",")]
        if args.in_memory and layers == min(sizes):
            runs.append(("wanda", False))
        for method, offload in runs:
            output = args.root / "pruned"
            command = [sys.executable, __file__, "--cell", str(directory), method, str(int(offload))]
            command += [str(args.nsamples), str(args.seqlen), str(output)]
            measured = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            shutil.rmtree(output, ignore_errors=True)
            row = {
                "layers": layers,
                "parameters": parameters,
                "checkpoint_bytes": checkpoint_bytes,
                "method": method,
                "offload": offload,
                **measured,
                "rss_over_checkpoint": measured["peak_rss_bytes"] / checkpoint_bytes,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = {"platform": platform.platform(), "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print("| layers | parameters | checkpoint | method | mode | time | peak RSS | RSS / checkpoint |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = "streamed" if r["offload"] else "in memory"
        print(
            f"| {r['layers']} | {r['parameters'] / 1e9:.2f} B | {r['checkpoint_bytes'] / 2**30:.2f} GiB "
            f"| {r['method']} | {mode} | {r['seconds']:.0f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"| {r['rss_over_checkpoint']:.2f} |"
        )


if __name__ == "__main__":
    main()
