"""Compressed checkpoints of the embedded model (issue 6): sizes on disk and compress / load times. By hand.

The embedded SmolLM2-135M is pruned once per pattern in float32 (Wanda 50 % unstructured and Wanda 2:4;
calibration 32 x 256 tokens of the embedded text, seed 0), then saved in float16 and float32 as a plain
checkpoint and compressed (``llmprune.compress``). For each: the weight file's size, the bytes of the
decoder's linear weights dense and stored, the layouts chosen, the compress time, and the ``llmprune.load``
time of the plain and the compressed checkpoint (medians of ``--repeats``, taken in turn). Every compressed
checkpoint is checked bit for bit against its plain one.

    python benchmarks/compressed.py --out benchmarks/out/compressed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import llmprune
from llmprune.models.packed import MANIFEST_KEY, CompressedCheckpoint
from llmprune.storage import read_metadata

CELLS = {"dense": None, "wanda 50 %": ("unstructured", 0.5), "wanda 2:4": ("2:4", None)}


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def load_seconds(directory: Path, dtype: str) -> float:
    start = time.perf_counter()
    llmprune.load(directory, dtype=dtype, device="cpu")
    return time.perf_counter() - start


def measure(plain: Path, packed_dir: Path, dtype: str, repeats: int) -> dict:
    start = time.perf_counter()
    llmprune.compress(plain, packed_dir)
    compress_s = time.perf_counter() - start
    manifest = read_metadata(packed_dir)[MANIFEST_KEY]
    reference = load_file(plain / "model.safetensors")
    restored = CompressedCheckpoint(packed_dir).state_dict()
    assert all(torch.equal(restored[k].view(torch.uint8), reference[k].view(torch.uint8)) for k in reference)
    plain_times, packed_times = [], []
    for _ in range(repeats):  # in turn, so that load on the shared machine affects both alike
        plain_times.append(load_seconds(plain, dtype))
        packed_times.append(load_seconds(packed_dir, dtype))
    sparse = {k: v for k, v in manifest["layouts"].items() if k != "dense"}
    sparse_dense = sum(v["dense_bytes"] for v in sparse.values())
    return {
        "dense_file_bytes": weight_bytes(plain),
        "compressed_file_bytes": weight_bytes(packed_dir),
        "layouts": manifest["layouts"],
        "sparse_tensors_ratio": sum(v["stored_bytes"] for v in sparse.values()) / sparse_dense
        if sparse_dense
        else None,
        "compress_seconds": compress_s,
        "load_plain_seconds": statistics.median(plain_times),
        "load_compressed_seconds": statistics.median(packed_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/compressed.json"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = llmprune.load_tokenizer("smollm2")
    calibration = llmprune.calibration_data(tokenizer, "embedded", 32, 256, 0)
    results = []
    with tempfile.TemporaryDirectory(prefix="llmprune-compressed-") as tmp:
        root = Path(tmp)
        for cell, recipe in CELLS.items():
            model = llmprune.load("smollm2", "float32", "cpu")
            if recipe is not None:
                pattern, sparsity = recipe
                llmprune.prune(model, calibration, method="wanda", pattern=pattern, sparsity=sparsity)
            for dtype in ("float16", "float32"):
                name = f"{cell.replace(' ', '').replace('%', '').replace(':', 'of')}-{dtype}"
                plain = root / name
                model.to(getattr(torch, dtype)).save_pretrained(plain)
                row = {
                    "cell": cell,
                    "dtype": dtype,
                    **measure(plain, root / f"{name}-packed", dtype, args.repeats),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
            del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(
        "| checkpoint | dtype | plain file | compressed file | sparse tensors stored | compress "
        "| load plain | load compressed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio, packed = r["sparse_tensors_ratio"], r["compressed_file_bytes"]
        layouts = ", ".join(f"{k} × {v['tensors']}" for k, v in r["layouts"].items())
        print(
            f"| {r['cell']} | {r['dtype']} | {r['dense_file_bytes'] / 2**20:.1f} MiB | "
            f"{packed / 2**20:.1f} MiB ({packed / r['dense_file_bytes']:.3f}×) | "
            f"{'-' if ratio is None else f'{ratio:.4f}×'} ({layouts}) | {r['compress_seconds']:.1f} s | "
            f"{r['load_plain_seconds']:.2f} s | {r['load_compressed_seconds']:.2f} s |"
        )


if __name__ == "__main__":
    main()
