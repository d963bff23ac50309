"""2:4 sparse tensor cores against dense matmuls on an NVIDIA GPU (issue 7). By hand, on a GPU machine.

1. One linear layer, float16, weights [out, in] = 4096×4096 and 11008×4096 pruned 2:4 by magnitude, token
   batches 1, 16, 512 and 4096: dense ``F.linear`` against the same weight in PyTorch's semi-structured
   sparse layout, for every backend this PyTorch has (cuSPARSELt, CUTLASS). Medians of alternated timings,
   and the relative error of the sparse output against the dense one.
2. The embedded model end to end: pruned 2:4 with ``llmprune prune --pattern 2:4``, its logits with and
   without ``llmprune.use_sparse_kernels`` compared, then ``llmprune bench PRUNED --baseline PRUNED
   --sparse-kernels`` (the baseline runs the same weights dense).

Prints the GPU, its compute capability and the versions, and writes everything as JSON.

    python benchmarks/sparse_kernels_gpu.py --out benchmarks/out/sparse_kernels_gpu.json
    python benchmarks/sparse_kernels_gpu.py --check    # CPU: everything but the sparse kernels, small sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llmprune
from llmprune.inference.cuda_kernels import CUDA_BACKENDS, default_backend, hardware_problem, semi_structured
from llmprune.methods.patterns import n_m_mask
from llmprune.storage import library_versions

SHAPES = [(4096, 4096), (11008, 4096)]  # [out, in]: attention and MLP-up projections of a 7B Llama
TOKENS = [1, 16, 512, 4096]
CHECK_SHAPES, CHECK_TOKENS = [(256, 256), (688, 256)], [1, 16]


def environment(device: torch.device) -> dict:
    info = {**library_versions(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cuda"] = torch.version.cuda
        info["cusparselt"] = torch.backends.cusparselt.version()
    return info


def two_four(out_features: int, in_features: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A random weight pruned to 2:4 by magnitude (the two largest of every 4 inputs kept)."""
    weight = torch.randn(out_features, in_features, device=device, dtype=torch.float32)
    return weight.masked_fill(n_m_mask(weight.abs(), 2, 4), 0.0).to(dtype)


def per_call_seconds(device: torch.device, x: torch.Tensor, weight: torch.Tensor, calls: int) -> float:
    """Seconds per ``F.linear(x, weight)``, over ``calls`` calls between two synchronisations."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        F.linear(x, weight)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def linear_layers(device: torch.device, check: bool, repeats: int) -> list[dict]:
    """Dense against sparse timings of one linear layer per shape, token count and backend."""
    dtype = torch.float16
    shapes, token_counts = (CHECK_SHAPES, CHECK_TOKENS) if check else (SHAPES, TOKENS)
    backends = [b for b in CUDA_BACKENDS if b == "cutlass" or torch.backends.cusparselt.is_available()]
    if check:  # no sparse kernel on the CPU: a dense copy stands in for the conversion
        backends = ["stand_in"]
    rows = []
    for out_features, in_features in shapes:
        weight = two_four(out_features, in_features, device, dtype)
        variants = {"dense": weight}
        for backend in backends:
            variants[backend] = weight.clone() if check else semi_structured(backend)(weight)
        for tokens in token_counts:
            x = torch.randn(tokens, in_features, device=device, dtype=dtype)
            expected = F.linear(x.float(), weight.float())
            calls = 3 if check else max(5, min(200, 2_000_000 // (tokens * 64)))
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            for w in variants.values():  # warm-up (cuSPARSELt picks its algorithm on the first call)
                per_call_seconds(device, x, w, 2)
            for _ in range(repeats):  # alternated: dense, cuSPARSELt, CUTLASS, dense, ...
                for name, w in variants.items():
                    seconds[name].append(per_call_seconds(device, x, w, calls))
            row = {
                "out": out_features,
                "in": in_features,
                "tokens": tokens,
                "dense_us": statistics.median(seconds["dense"]) * 1e6,
            }
            for backend in backends:
                got = F.linear(x, variants[backend]).float()
                row[f"{backend}_us"] = statistics.median(seconds[backend]) * 1e6
                row[f"{backend}_speedup"] = row["dense_us"] / row[f"{backend}_us"]
                row[f"{backend}_relative_error"] = float((got - expected).norm() / expected.norm())
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def llmprune_cli(*args: str) -> str:
    command = [sys.executable, "-m", "llmprune", *args]
    print("$ llmprune " + " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"llmprune {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def logits_match(pruned: Path, device: torch.device, check: bool) -> dict:
    """Logits of the pruned model with and without the sparse kernels, on one embedded-text window."""
    model = llmprune.load(pruned, dtype="float16", device=str(device))
    tokenizer = llmprune.load_tokenizer(str(pruned))
    window = llmprune.evaluation_data(tokenizer, "embedded", 128, 1).to(device)
    with torch.no_grad():
        dense = model(window).logits.float()
    convert = (lambda w: w.clone()) if check else None  # --check: stand-in conversion on the CPU
    report = llmprune.use_sparse_kernels(model, convert=convert)
    with torch.no_grad():
        sparse = model(window).logits.float()
    error = float((sparse - dense).norm() / dense.norm())
    agree = float((sparse.argmax(-1) == dense.argmax(-1)).float().mean())
    result = {
        "swapped": len(report.swapped),
        "skipped": [(c.name, list(c.reasons)) for c in report.skipped],
        "backend": report.backend,
        "logits_relative_error": error,
        "argmax_agreement": agree,
    }
    print(json.dumps(result), flush=True)
    return result


def end_to_end(device: torch.device, check: bool, work: Path) -> dict:
    pruned = work / "smollm2-2of4"
    samples = ["--nsamples", "2", "--seqlen", "64"] if check else ["--nsamples", "32", "--seqlen", "256"]
    llmprune_cli(
        "prune", "--pattern", "2:4", "--output", str(pruned), "--eval-nsamples", "0",
        "--device", device.type, *samples,
    )  # fmt: skip
    matched = logits_match(pruned, device, check)
    size = {"--prompt-len": 32, "--batch": 2, "--new-tokens": 4, "--repeats": 2, "--threads": 1}
    if not check:
        size = {"--prompt-len": 512, "--batch": 8, "--new-tokens": 64, "--repeats": 5}
    size = [str(part) for pair in size.items() for part in pair]
    kernels = [] if check else ["--sparse-kernels", "--dtype", "float16"]
    models = [str(pruned), "--baseline", str(pruned), "--prompt", "embedded", "--device", device.type]
    bench = json.loads(llmprune_cli("bench", *models, *size, *kernels, "--json"))
    print(json.dumps({"speedup": bench["speedup"]}), flush=True)
    return {"logits": matched, "bench": bench}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/sparse_kernels_gpu.json"))
    parser.add_argument(
        "--check", "--dry-run", action="store_true", help="CPU, small sizes, no sparse kernels"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-model", action="store_true", help="only the single-layer measurements")
    args = parser.parse_args()

    device = torch.device("cpu" if args.check else "cuda")
    if not args.check:
        problem = hardware_problem(device)
        if problem:
            raise SystemExit(f"{problem} (use --check to test this script on the CPU)")
    info = environment(device)
    info["backend_default"] = default_backend()
    print(json.dumps(info), flush=True)
    result = {"environment": info, "check": args.check}
    result["linear"] = linear_layers(device, args.check, 2 if args.check else args.repeats)
    if not args.skip_model:
        with tempfile.TemporaryDirectory(prefix="llmprune-sparse-") as work:
            result["model"] = end_to_end(device, args.check, Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
