"""Peak memory of ``llmprune.load(path, sparse_kernels="cpu")`` (issue 16), against its bound. By hand.

The embedded SmolLM2-135M is pruned with the command line (magnitude, 50 % unstructured saved plain and
compressed, and 2:4 compressed; ``--eval-nsamples 0``), in float32. Each checkpoint is then loaded in a
fresh Python process, whose peak resident memory (``VmHWM`` of ``/proc/self/status``: anonymous and
file-backed pages, so the checkpoint's memory-mapped pages count) is read after the load:

- ``baseline``: the same process up to the load (torch, transformers and llmprune imported, the model
  built on the meta device), the overhead any load pays;
- ``sparse``: ``llmprune.load(path, sparse_kernels="cpu")``;
- ``dense``: ``llmprune.load(path)``, for comparison.

Then one forward pass of 8 tokens, and the resident memory again: ``transformers`` (and the tensors stored
dense) keep weights memory-mapped, read in from the file only when first used. With ``--reference`` (no
compiled kernels) the sparse layers run the kernels' torch reference, which expands each weight.

The bound is ``baseline + model bytes + largest tensor``: the loaded model's bytes (``SparseLinear``
buffers plus the dense tensors: what the compressed form takes in memory; the weight files' sizes are
given too), plus one dense tensor in float32 as read (the tied embedding, the largest: it is stored dense).

    python benchmarks/sparse_load_memory.py --out benchmarks/out/sparse_load_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKPOINTS = {
    "magnitude 50 % plain": ["--sparsity", "0.5"],
    "magnitude 50 % compressed": ["--sparsity", "0.5", "--save-format", "compressed"],
    "magnitude 2:4 compressed": ["--pattern", "2:4", "--save-format", "compressed"],
}


def peak_rss() -> dict[str, int]:
    """Peak and current resident bytes of this process."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def child(mode: str, path: str, reference: bool) -> None:
    """One measurement, in this fresh process: prints JSON. ``reference``: load even without the compiled
    kernels (their torch reference is then set up; the memory of loading does not depend on them)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    import llmprune
    import llmprune.export.sparse_load  # what the sparse load imports: part of its baseline
    from llmprune.inference import cpu_kernels
    from llmprune.inference.kernels import model_bytes

    if reference:
        cpu_kernels.native_problem = lambda: None

    with init_empty_weights(include_buffers=False):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    result: dict = {"mode": mode, "kernels": cpu_kernels.isa()}
    if mode != "baseline":
        options = {"sparse_kernels": "cpu"} if mode == "sparse" else {}
        model = llmprune.load(path, dtype="float32", device="cpu", **options)
        result["model_bytes"] = model_bytes(model)
        if mode == "sparse":
            report = model.sparse_kernels_report
            result["swapped"] = len(report.swapped)
            result["skipped"] = [(c.name, list(c.reasons)) for c in report.skipped]
    result.update(peak_rss())
    if mode != "baseline":  # resident once used: memory-mapped weights are read in on first use
        with torch.no_grad():
            model(torch.arange(8).unsqueeze(0))
        result["after_forward"] = peak_rss()
    print(json.dumps(result))


def measure(mode: str, path: Path, reference: bool) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(path), *(["--reference"] if reference else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_tensor_bytes(path: Path) -> tuple[str, int]:
    """The checkpoint's largest tensor, dense in float32 (name, bytes), read from file headers."""
    import math

    from safetensors import safe_open

    from llmprune.models.packed import CompressedCheckpoint, is_compressed

    if is_compressed(path):
        entries = CompressedCheckpoint(path).entries
        shapes = {name: entry["shape"] for name, entry in entries.items()}
    else:
        shapes = {}
        for file in path.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                shapes.update({name: handle.get_slice(name).get_shape() for name in handle.keys()})  # noqa: SIM118
    name = max(shapes, key=lambda n: math.prod(shapes[n]))
    return name, 4 * math.prod(shapes[name])


def largest_linear_bytes(path: Path) -> int:
    """Bytes of the largest decoder linear weight in float32 (what a dense layer of the kernels is)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return 4 * config.hidden_size * config.intermediate_size if hasattr(config, "intermediate_size") else 0


def prune(root: Path, name: str, flags: list[str]) -> Path:
    output = root / name.replace(" ", "-").replace("%", "pct").replace(":", "of")
    command = [sys.executable, "-m", "llmprune", "prune", "--method", "magnitude", "--dtype", "float32"]
    command += ["--eval-nsamples", "0", *flags, "--output", str(output)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/sparse_load_memory.json"))
    parser.add_argument(
        "--reference", action="store_true", help="load without the compiled kernels (their torch reference)"
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.reference)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="llmprune-sparse-load-") as tmp:
        for name, flags in CHECKPOINTS.items():
            path = prune(Path(tmp), name, flags)
            modes = ("baseline", "sparse", "dense")
            baseline, sparse, dense = (measure(mode, path, args.reference) for mode in modes)
            tensor, tensor_bytes = largest_tensor_bytes(path)
            bound = baseline["VmHWM"] + sparse["model_bytes"] + tensor_bytes
            row = {
                "checkpoint": name,
                "kernels": sparse["kernels"],
                "weight_file_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
                "baseline_peak_bytes": baseline["VmHWM"],
                "sparse_model_bytes": sparse["model_bytes"],
                "largest_tensor": tensor,
                "largest_tensor_bytes": tensor_bytes,
                "largest_linear_bytes": largest_linear_bytes(path),
                "bound_bytes": bound,
                "sparse_peak_bytes": sparse["VmHWM"],
                "sparse_resident_bytes": sparse["VmRSS"],
                "sparse_peak_over_bound": sparse["VmHWM"] / bound,
                "sparse_layers": sparse["swapped"],
                "left_dense": sparse["skipped"],
                "dense_model_bytes": dense["model_bytes"],
                "dense_peak_bytes": dense["VmHWM"],
                "dense_resident_bytes": dense["VmRSS"],
                "sparse_resident_after_forward_bytes": sparse["after_forward"]["VmRSS"],
                "dense_resident_after_forward_bytes": dense["after_forward"]["VmRSS"],
            }
            results.append(row)
            mib = {k: f"{v / 2**20:.1f} MiB" for k, v in row.items() if k.endswith("bytes")}
            print(name, json.dumps(mib), f"peak/bound {row['sparse_peak_over_bound']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    machine["threads"] = os.environ.get("OMP_NUM_THREADS")
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
