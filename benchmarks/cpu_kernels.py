"""Sparse CPU kernels against dense ``F.linear``, one linear layer at a time (issue 16). By hand.

Each case is a random ``[out, in]`` weight pruned by magnitude (unstructured per row, or 2:4), converted
with ``cpu_kernels.from_dense`` into a ``SparseLinear``. Dense ``F.linear(x, W)`` (torch's own kernels,
the same dtype and thread count) and the ``SparseLinear`` forward (``SparseLinear.path``: the sparse kernel
up to ``SPARSE_TOKENS`` tokens; above it the many-token kernel or expand + dense matmul; bfloat16 on AMX
CPUs the AMX kernel for ``AMX_TOKENS``, on AVX-512 BF16 ones the AVX-512 BF16 kernel for
``DPBF16_TOKENS``) are
timed alternately in this one process (dense, sparse, dense, sparse, ...) after a warm-up; each sample
runs enough calls to last ``--sample-ms``; the figures are medians and the speedup is median dense over
median sparse. Each call reads the next of several copies of its weight (``--cold-mb``), so that no cache
holds it, as in a model. The bytes limit is the dense weight's bytes over the sparse layout's (values +
mask + offsets): the most a memory-bound product gains. Progress goes to stderr as one JSON line per case.

Then, for one large shape (4096×4096, float32, 1 token): a sweep of sparsity 30..90 % plotted against the
limit 4 / (4·(1 - s) + 1/8), giving the break-even sparsity (``BREAK_EVEN_SPARSITY``), and at 50 % the
token counts 1..64 through ``cpu_kernels.matmul`` directly, giving where the kernel stops beating dense
(``SPARSE_TOKENS``). Prints markdown tables and the machine; ``--json`` writes everything.

    python benchmarks/cpu_kernels.py --threads 1,2 --json benchmarks/out/cpu_kernels.json \
        --plot docs/cpu_kernels_speedup.png
    python benchmarks/cpu_kernels.py --isa avx2 --shapes 4096x4096 # one forced code path, one shape
    python benchmarks/cpu_kernels.py --quick                         # a few small cases: checks the script
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

from llmprune.errors import UsageError
from llmprune.inference import cpu_kernels, sparse_linear
from llmprune.inference.sparse_linear import SparseLinear
from llmprune.methods.magnitude import magnitude_mask
from llmprune.methods.patterns import Pattern
from llmprune.storage import library_versions

LARGE = [(2048, 5632), (5632, 2048), (4096, 4096), (4096, 11008), (11008, 4096)]  # [out, in]
SMOLLM2 = [(576, 576), (1536, 576), (576, 1536)]
QUICK_SHAPES = [(576, 576)]


@dataclass(frozen=True)
class Variant:
    """One pruned weight, timed at several token counts; ``targets``: the issue's speedups (large shapes)."""

    name: str
    sparsity: float
    pattern: str
    dtype: torch.dtype
    targets: dict[int, float]
    token_counts: tuple[int, ...] | None = (1,)
    """Timed at these token counts (None: every ``--tokens`` count)."""


VARIANTS = [
    Variant(
        "50 % f32", 0.5, "unstructured", torch.float32, {1: 1.7, 4: 1.3, 8: 1.3, 16: 1.3, 512: 0.95}, None
    ),
    Variant("70 % f32", 0.7, "unstructured", torch.float32, {1: 2.6}),
    Variant("2:4 f32", 0.5, "2:4", torch.float32, {1: 1.6}),
    # bfloat16 beyond one token: no target; the AMX or AVX-512 BF16 kernel's range (AMX_TOKENS, DPBF16_TOKENS)
    Variant("50 % bf16", 0.5, "unstructured", torch.bfloat16, {1: 1.5}, (1, 4, 8, 16, 64, 128, 512)),
]
SWEEP_SHAPE = (4096, 4096)
SWEEP = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
TOKEN_SWEEP = [1, 2, 4, 8, 16, 24, 32, 48, 64]
QUICK_SWEEP_SHAPE, QUICK_SWEEP, QUICK_TOKENS = (576, 1536), [0.3, 0.5, 0.9], [1, 16, 32]
COLD_MB = 512
"""Copies of each weight are cycled through until the dense ones hold this much: a call then reads its
weight from memory, as each layer of a model does while decoding, not from a cache that holds it (a sparse
weight fits in a cache its dense form does not: its speedup would then exceed the bytes limit)."""
T = TypeVar("T")


# ---- machine ------------------------------------------------------------------------------------------

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_bf16", "amx_bf16")
TORCH_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that cap the instructions torch's dense kernels use (oneDNN: bfloat16 matmul;
MKL: float32): set, a run stands in for a CPU without the instructions above the cap."""


def machine_info() -> dict:
    """The CPU, the kernels' instruction set, the versions and the date: what a figure needs beside it."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    parallel = [line.strip() for line in torch.__config__.parallel_info().splitlines()]
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = (
                (index / "size").read_text().strip()
            )
        except OSError:
            continue
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "caches": caches,
        "isa": cpu_kernels.isa(),
        "isa_forced": os.environ.get(cpu_kernels.ISA_VARIABLE) or None,
        "thread_backend": cpu_kernels.thread_backend(),
        "native_problem": cpu_kernels.native_problem(),
        "torch_parallel": next((line for line in parallel if line.startswith("ATen parallel backend")), ""),
        "torch_isa_caps": {name: os.environ[name] for name in TORCH_ISA_CAPS if os.environ.get(name)},
        "torch_bfloat16_isa": cpu_kernels.torch_bfloat16_isa(),
        "amx_kernel": cpu_kernels.amx_available(),
        "dpbf16_kernel": cpu_kernels.dpbf16_available(),
        **library_versions(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def print_machine(info: dict) -> None:
    print(f"- command: `{info['command']}`")
    print(f"- date: {info['date']}")
    caches = ", ".join(f"{level} {size}" for level, size in info["caches"].items())
    print(
        f"- CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs, flags {' '.join(info['cpu_flags'])}; "
        f"caches per core: {caches or 'unknown'}"
    )
    forced = f" (forced by {cpu_kernels.ISA_VARIABLE})" if info["isa_forced"] else ""
    print(f"- kernels: {info['isa']}{forced}, threads on {info['thread_backend']}; {info['torch_parallel']}")
    caps = info.get("torch_isa_caps")
    if caps:
        capped = ", ".join(f"{name}={value}" for name, value in caps.items())
        print(f"- torch's dense kernels capped by {capped} (standing in for a CPU without what is above)")
    bfloat16_isa = info.get("torch_bfloat16_isa") or "float32 FMAs (no bfloat16 dot products)"
    print(f"- torch's bfloat16 matmul on: {bfloat16_isa}")
    print(f"- llmprune's AMX kernel (bfloat16): {'yes' if info.get('amx_kernel') else 'no'}")
    print(f"- llmprune's AVX-512 BF16 kernel: {'yes' if info.get('dpbf16_kernel') else 'no'}")
    print(
        f"- llmprune {info['llmprune']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"Python {info['python']}"
    )
    if info["native_problem"]:
        print(
            f"- WARNING: {info['native_problem']}: the sparse timings are the slow torch reference, "
            "meaningless"
        )


def select_isa(forced: str | None, thread_backend: str | None = None) -> None:
    """Force the kernels' instruction set (``LLMPRUNE_CPU_KERNEL``) and thread backend
    (``LLMPRUNE_CPU_THREADS``) and choose them again."""
    if forced:
        os.environ[cpu_kernels.ISA_VARIABLE] = forced
    if thread_backend:
        os.environ[cpu_kernels.THREADS_VARIABLE] = thread_backend
    cpu_kernels.reset_isa()
    try:
        cpu_kernels.isa()  # a bad or unsupported value fails here, before any measurement
        cpu_kernels.thread_backend()
    except UsageError as exc:
        raise SystemExit(f"error: {exc}") from None


# ---- weights ------------------------------------------------------------------------------------------


def pruned_weight(
    rows: int, cols: int, sparsity: float, pattern: str, dtype: torch.dtype, seed: int = 0
) -> torch.Tensor:
    """A random ``[rows, cols]`` weight with its smallest magnitudes zeroed (per row, or N:M groups)."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    weight.masked_fill_(magnitude_mask(weight, sparsity, Pattern.parse(pattern), scope="row"), 0.0)
    return weight.to(dtype)


def bytes_limit(rows: int, cols: int, layout: cpu_kernels.BitmaskWeight) -> float:
    """Dense weight bytes over the sparse layout's: the speedup of a product bound by reading the weight."""
    return rows * cols * layout.values.element_size() / layout.nbytes


def formula_limit(sparsity: float, value_bytes: int = 4) -> float:
    """The issue's limit ``b / (b·(1 - s) + 1/8)`` for ``b``-byte values and a 1-bit mask."""
    return value_bytes / (value_bytes * (1 - sparsity) + 1 / 8)


# ---- timing -------------------------------------------------------------------------------------------


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def alternated(
    dense: Callable[[], object], sparse: Callable[[], object], repeats: int, sample_s: float
) -> tuple[float, float]:
    """Median seconds per call of ``dense`` and ``sparse``, sampled alternately after a warm-up; each
    sample runs as many calls as make the faster one last ``sample_s``."""
    one = []
    for fn in (dense, sparse):  # warm-up: at least 3 calls and 50 ms each (scratch buffers, caches)
        started, count = time.perf_counter(), 0
        while count < 3 or time.perf_counter() - started < 0.05:
            fn()
            count += 1
        one.append(per_call(fn, 1))
    calls = max(1, math.ceil(sample_s / max(1e-9, min(one))))
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        samples[0].append(per_call(dense, calls))
        samples[1].append(per_call(sparse, calls))
    return statistics.median(samples[0]), statistics.median(samples[1])


def rotation(
    dense: torch.Tensor, sparse: T, cold_bytes: int, clone: Callable[[T], T] = copy.deepcopy
) -> tuple[Callable[[], torch.Tensor], Callable[[], T], int]:
    """Getters that cycle through copies of a dense weight and of its sparse form, as many as make the dense
    copies hold ``cold_bytes`` (``COLD_MB``), and that count."""
    count = max(1, math.ceil(cold_bytes / (dense.numel() * dense.element_size())))
    dense_cycle = itertools.cycle([dense] + [dense.clone() for _ in range(count - 1)])
    sparse_cycle = itertools.cycle([sparse] + [clone(sparse) for _ in range(count - 1)])
    return lambda: next(dense_cycle), lambda: next(sparse_cycle), count


def clone_layout(layout: cpu_kernels.BitmaskWeight) -> cpu_kernels.BitmaskWeight:
    return cpu_kernels.BitmaskWeight(layout.rows, layout.cols, *(t.clone() for t in layout.tensors()))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).norm() / expected.norm().clamp_min(1e-30))


@torch.inference_mode()
def layer_cases(
    shapes: list[tuple[int, int]],
    variants: list[Variant],
    token_counts: list[int],
    threads: list[int],
    repeats: int,
    sample_s: float,
    cold_bytes: int,
) -> list[dict]:
    """Dense ``F.linear`` against ``SparseLinear``, per shape, variant, token count and thread count."""
    rows = []
    for out_features, in_features in shapes:
        for variant in variants:
            weight = pruned_weight(
                out_features, in_features, variant.sparsity, variant.pattern, variant.dtype
            )
            module = SparseLinear.from_dense(weight)
            limit = bytes_limit(out_features, in_features, module.weight_layout)
            next_weight, next_module, copies = rotation(weight, module, cold_bytes)
            for tokens in token_counts if variant.token_counts is None else variant.token_counts:
                x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1))
                x = x.to(variant.dtype)
                error = relative_error(module(x), F.linear(x.float(), weight.float()))
                for thread_count in threads:
                    torch.set_num_threads(thread_count)
                    dense_s, sparse_s = alternated(
                        lambda x=x, w=next_weight: F.linear(x, w()),
                        lambda x=x, m=next_module: m()(x),
                        repeats,
                        sample_s,
                    )
                    target = variant.targets.get(tokens) if (out_features, in_features) in LARGE else None
                    row = {
                        "case": variant.name + ("" if tokens == 1 else f", {tokens} tokens"),
                        "out": out_features,
                        "in": in_features,
                        "tokens": tokens,
                        "threads": thread_count,
                        "dtype": str(variant.dtype).removeprefix("torch."),
                        "sparsity": round(module.sparsity, 4),
                        "dense_ms": dense_s * 1e3,
                        "sparse_ms": sparse_s * 1e3,
                        "speedup": dense_s / sparse_s,
                        "bytes_limit": limit,
                        "target": target,
                        "path": module.path(tokens),
                        "relative_error": error,
                        "copies": copies,
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


@torch.inference_mode()
def sparsity_sweep(
    shape: tuple[int, int],
    sparsities: list[float],
    thread_count: int,
    repeats: int,
    sample_s: float,
    cold_bytes: int,
) -> list[dict]:
    """Speedup of ``SparseLinear`` at 1 token, float32, against its sparsity."""
    out_features, in_features = shape
    torch.set_num_threads(thread_count)
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(1))
    rows = []
    for sparsity in sparsities:
        weight = pruned_weight(out_features, in_features, sparsity, "unstructured", torch.float32)
        module = SparseLinear.from_dense(weight)
        next_weight, next_module, _ = rotation(weight, module, cold_bytes)
        dense_s, sparse_s = alternated(
            lambda w=next_weight: F.linear(x, w()), lambda m=next_module: m()(x), repeats, sample_s
        )
        row = {
            "sparsity": sparsity,
            "threads": thread_count,
            "dense_ms": dense_s * 1e3,
            "sparse_ms": sparse_s * 1e3,
            "speedup": dense_s / sparse_s,
            "bytes_limit": bytes_limit(out_features, in_features, module.weight_layout),
            "formula_limit": formula_limit(sparsity),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


@torch.inference_mode()
def token_sweep(
    shape: tuple[int, int],
    token_counts: list[int],
    threads: list[int],
    repeats: int,
    sample_s: float,
    cold_bytes: int,
) -> list[dict]:
    """Speedup of ``cpu_kernels.matmul`` (the kernel itself, at any token count) at 50 %, float32."""
    out_features, in_features = shape
    weight = pruned_weight(out_features, in_features, 0.5, "unstructured", torch.float32)
    layout = cpu_kernels.from_dense(weight)
    next_weight, next_layout, _ = rotation(weight, layout, cold_bytes, clone_layout)
    rows = []
    for thread_count in threads:
        torch.set_num_threads(thread_count)
        for tokens in token_counts:
            x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1))
            dense_s, sparse_s = alternated(
                lambda x=x: F.linear(x, next_weight()),
                lambda x=x: cpu_kernels.matmul(next_layout(), x),
                repeats,
                sample_s,
            )
            row = {
                "tokens": tokens,
                "threads": thread_count,
                "dense_ms": dense_s * 1e3,
                "sparse_ms": sparse_s * 1e3,
                "speedup": dense_s / sparse_s,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


# ---- break-evens and output ---------------------------------------------------------------------------


def break_even_sparsity(sweep: list[dict]) -> float | None:
    """The lowest swept sparsity from which on every higher one is at least dense speed (None: none)."""
    found = None
    for row in sorted(sweep, key=lambda r: r["sparsity"], reverse=True):
        if row["speedup"] < 1:
            break
        found = row["sparsity"]
    return found


def break_even_tokens(tokens: list[dict], thread_count: int) -> tuple[int | None, int | None]:
    """(the most tokens up to which the kernel beats dense at every count, the first count where it does
    not) at ``thread_count`` threads; None where there is none."""
    last, first_loss = None, None
    for row in sorted((r for r in tokens if r["threads"] == thread_count), key=lambda r: r["tokens"]):
        if row["speedup"] < 1:
            first_loss = row["tokens"]
            break
        last = row["tokens"]
    return last, first_loss


def markdown_layers(rows: list[dict]) -> str:
    lines = [
        "| case | shape | tokens | threads | dense ms | sparse ms | speedup | bytes limit | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "—" if r["target"] is None else f"≥ {r['target']:.2f}×"
        lines.append(
            f"| {r['case']} | {r['out']}×{r['in']} | {r['tokens']} | {r['threads']} | "
            f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | **{r['speedup']:.2f}×** | "
            f"{r['bytes_limit']:.2f}× | {target} |"
        )
    return "\n".join(lines)


def markdown_sweep(rows: list[dict]) -> str:
    lines = ["| sparsity | dense ms | sparse ms | speedup | bytes limit |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['sparsity'] * 100:.0f} % | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
            f"**{r['speedup']:.2f}×** | {r['formula_limit']:.2f}× |"
        )
    return "\n".join(lines)


def markdown_tokens(rows: list[dict], threads: list[int]) -> str:
    lines = [
        "| tokens | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads) + " |",
        "|---|" + "---|" * len(threads),
    ]
    by_key = {(r["tokens"], r["threads"]): r["speedup"] for r in rows}
    for tokens in sorted({r["tokens"] for r in rows}):
        cells = [f"{by_key[tokens, t]:.2f}×" if (tokens, t) in by_key else "" for t in threads]
        lines.append(f"| {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], shape: tuple[int, int], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsities = [r["sparsity"] * 100 for r in rows]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(
        sparsities, [r["speedup"] for r in rows], marker="o", label="measured: SparseLinear vs F.linear"
    )
    fine = [s / 100 for s in range(int(min(sparsities)), int(max(sparsities)) + 1)]
    axes.plot(
        [s * 100 for s in fine],
        [formula_limit(s) for s in fine],
        linestyle="--",
        color="grey",
        label="bytes limit 4 / (4(1 − s) + 1/8)",
    )
    axes.axhline(1.0, color="black", linewidth=0.8, label="break-even (dense speed)")
    even = break_even_sparsity(rows)
    if even is not None:
        axes.axvline(
            even * 100, color="tab:red", linestyle=":", label=f"measured break-even ≤ {even * 100:.0f} %"
        )
    axes.set_xlabel("sparsity (%)")
    axes.set_ylabel("speedup over dense")
    threads = rows[0]["threads"]
    axes.set_title(
        f"{shape[0]}×{shape[1]} float32, 1 token, {threads} thread{'s' * (threads > 1)}, "
        f"{info['isa']}\n{info['cpu']}",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- command line -------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``all``, ``large``, ``smollm2`` or ``OUTxIN`` entries, comma-separated."""
    named = {"all": LARGE + SMOLLM2, "large": LARGE, "smollm2": SMOLLM2}
    shapes: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in named:
            shapes += named[part]
            continue
        out_features, sep, in_features = part.partition("x")
        if not sep or not out_features.isdigit() or not in_features.isdigit():
            raise argparse.ArgumentTypeError(f"shape {part!r}: expected OUTxIN, all, large or smollm2")
        shapes.append((int(out_features), int(in_features)))
    return list(dict.fromkeys(shapes))


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help="all (default), large, smollm2 or OUTxIN, comma-separated",
    )
    parser.add_argument("--threads", type=int_list, default=[1, 2], help="thread counts, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=None, help="alternated samples per case (default 15)")
    parser.add_argument("--sample-ms", type=float, default=None, help="least time of one sample (default 20)")
    parser.add_argument(
        "--tokens", type=int_list, default=[1, 4, 8, 16, 512], help="token counts of the 50 %% float32 case"
    )
    parser.add_argument(
        "--cold-mb",
        type=float,
        default=None,
        help=f"cycle through copies of each weight until the dense ones hold this much ({COLD_MB}; with "
        "--quick 8; 0: one weight, which small shapes then read from a cache)",
    )
    parser.add_argument("--sweep", type=float_list, default=None, help="sparsities of the sweep (0.3..0.9)")
    parser.add_argument("--sweep-shape", type=parse_shapes, default=None, help="one OUTxIN (4096x4096)")
    parser.add_argument("--sweep-threads", type=int, default=1)
    parser.add_argument("--no-sweeps", action="store_true", help="only the single-layer cases")
    parser.add_argument(
        "--isa",
        choices=cpu_kernels.ISAS,
        default=None,
        help=f"force the kernels' code path ({cpu_kernels.ISA_VARIABLE})",
    )
    parser.add_argument(
        "--thread-backend",
        choices=cpu_kernels.THREAD_BACKENDS,
        default=None,
        help=f"force where the kernels' threads come from ({cpu_kernels.THREADS_VARIABLE})",
    )
    parser.add_argument("--json", type=Path, default=None, help="write everything here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="the sweep's plot (default docs/cpu_kernels_speedup.png; none with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a few small cases, short samples")
    args = parser.parse_args()

    select_isa(args.isa, args.thread_backend)
    quick = args.quick
    shapes = args.shapes or (QUICK_SHAPES if quick else LARGE + SMOLLM2)
    repeats = args.repeats or (3 if quick else 15)
    sample_s = (args.sample_ms or (2.0 if quick else 20.0)) / 1e3
    cold_mb = args.cold_mb if args.cold_mb is not None else (8 if quick else COLD_MB)
    cold = int(cold_mb * 2**20)
    tokens = list(dict.fromkeys(min(t, 32) for t in args.tokens)) if quick else args.tokens  # 32: expands
    sweep_shape = args.sweep_shape[0] if args.sweep_shape else (QUICK_SWEEP_SHAPE if quick else SWEEP_SHAPE)
    sweep = args.sweep or (QUICK_SWEEP if quick else SWEEP)
    token_counts = QUICK_TOKENS if quick else TOKEN_SWEEP
    plot = args.plot if args.plot is not None or quick else Path("docs/cpu_kernels_speedup.png")
    info = machine_info()
    started = time.perf_counter()

    layers = layer_cases(shapes, VARIANTS, tokens, args.threads, repeats, sample_s, cold)
    result: dict = {
        "machine": info,
        "settings": {
            "repeats": repeats,
            "sample_ms": sample_s * 1e3,
            "cold_mb": cold_mb,
            "sparse_tokens": sparse_linear.SPARSE_TOKENS,
        },
        "layers": layers,
        "variants": [{**asdict(v), "dtype": str(v.dtype)} for v in VARIANTS],
    }
    if not args.no_sweeps:
        result["sweep_shape"] = list(sweep_shape)
        result["sparsity_sweep"] = sparsity_sweep(
            sweep_shape, sweep, args.sweep_threads, repeats, sample_s, cold
        )
        result["token_sweep"] = token_sweep(sweep_shape, token_counts, args.threads, repeats, sample_s, cold)
        result["break_even_sparsity"] = break_even_sparsity(result["sparsity_sweep"])
        result["break_even_tokens"] = {t: break_even_tokens(result["token_sweep"], t) for t in args.threads}
    result["seconds"] = time.perf_counter() - started

    print("\n## Machine\n")
    print_machine(info)
    print(
        f"- settings: median of {repeats} alternated samples of ≥ {sample_s * 1e3:g} ms after a warm-up; "
        f"each call reads the next of copies of its weight that hold ≥ {cold_mb:g} MiB dense (cold caches); "
        f"SparseLinear runs the kernel up to SPARSE_TOKENS = {sparse_linear.SPARSE_TOKENS} tokens (float32 "
        f"with AVX-512 and no many-token kernel: {sparse_linear.AVX512_SPARSE_TOKENS})"
    )
    print("\n## Single layers: dense F.linear against SparseLinear\n")
    print(markdown_layers(layers))
    failed = [r for r in layers if r["relative_error"] > (1e-5 if r["dtype"] == "float32" else 1e-2)]
    for r in failed:
        print(f"\nWARNING: {r['case']} {r['out']}×{r['in']}: relative error {r['relative_error']:.2g}")
    if not args.no_sweeps:
        shape = f"{sweep_shape[0]}×{sweep_shape[1]}"
        print(f"\n## Speedup against sparsity: {shape}, float32, 1 token, {args.sweep_threads} thread(s)\n")
        print(markdown_sweep(result["sparsity_sweep"]))
        even = result["break_even_sparsity"]
        print(
            "\nbreak-even sparsity (lowest swept from which on the kernel is at least dense speed): "
            + ("none in the sweep" if even is None else f"{even * 100:.0f} %")
        )
        print(f"\n## Speedup against tokens: cpu_kernels.matmul vs F.linear, {shape}, 50 %, float32\n")
        print(markdown_tokens(result["token_sweep"], args.threads))
        for thread_count, (last, loss) in result["break_even_tokens"].items():
            print(
                f"\n{thread_count} thread(s): the kernel beats dense up to "
                + ("no token count" if last is None else f"{last} tokens")
                + ("" if loss is None else f", not at {loss}")
            )
        if plot is not None:
            plot_sweep(result["sparsity_sweep"], sweep_shape, info, plot)
            print(f"\nplot: {plot}")
    print(f"\n{result['seconds']:.0f} s in all")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
