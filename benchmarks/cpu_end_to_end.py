"""End to end on the CPU, batch 1, float32: a pruned model on the sparse kernels against itself (issue 16).

By hand, on a quiet machine. Each pruned model is measured twice, alternated by ``llmprune.bench`` in one
process: as it is (dense weights holding zeros: the baseline) and as a copy whose decoder linear layers run
on the CPU sparse kernels (``llmprune.use_sparse_kernels(model, backend="cpu")``, or ``SparseLinear``
swapped in by hand where that backend is not there yet). The copy shares every tensor it does not swap
(embeddings, norms, LM head) with the baseline, so memory holds the dense model once.

(a) A synthetic Llama of 1.48 B parameters (hidden 2048, intermediate 5632, 30 layers, 16 heads, 4 KV
    heads, vocabulary 32000, untied head), random weights, every decoder linear layer pruned by magnitude
    per row to each ``--sparsity`` in turn (speed does not depend on the values): decode and prefill
    throughput against dense, and the bytes of the decoder's linear weights.
(b) The embedded model (SmolLM2-135M) pruned by Wanda, 50 % unstructured and 2:4, on 32 × 256 embedded
    calibration tokens: decode throughput, and perplexity on the first 16 embedded evaluation windows of
    512 tokens, swapped against dense-with-zeros (their 4 significant digits must agree), also with every
    token forced through the sparse kernel (no expansion to dense) on the first ``--kernel-windows``.
    With ``--cli`` also through the command line: ``llmprune prune`` saves each pruning, then ``llmprune
    bench PRUNED --baseline PRUNED --sparse-kernels --device cpu --batch 1`` measures it.

Prints markdown tables, the machine and the command; ``--json`` writes everything. The full synthetic
model needs about 11 GB of memory at 50 % (5.9 GB dense, 3.1 GB swapped, working memory).

    python benchmarks/cpu_end_to_end.py --threads 1,2 --cli --json benchmarks/out/cpu_end_to_end.json
    python benchmarks/cpu_end_to_end.py --quick       # 1 synthetic layer, tiny settings: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from cpu_kernels import float_list, int_list, machine_info, print_machine, select_isa  # next to this script
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import llmprune
from llmprune.errors import UsageError
from llmprune.inference import cpu_kernels, sparse_linear
from llmprune.inference.sparse_linear import SparseLinear, too_dense
from llmprune.methods.magnitude import magnitude_mask
from llmprune.methods.patterns import Pattern
from llmprune.models.architecture import decoder_layers, prunable_modules

SYNTHETIC = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 30,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
SYNTHETIC_TARGETS = {0.5: 1.5, 0.7: 2.2}  # decode speedup
PREFILL_TARGET, MEMORY_TARGET, EMBEDDED_TARGET = 0.95, 0.55, 1.2
EMBEDDED = [("wanda 50 %", {"sparsity": 0.5}), ("wanda 2:4", {"pattern": "2:4"})]


# ---- models -------------------------------------------------------------------------------------------


def synthetic_llama(layers: int) -> nn.Module:
    """The synthetic Llama in float32 with transformers' random initialisation (seeded)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**SYNTHETIC, "num_hidden_layers": layers})
    return LlamaForCausalLM(config).to(torch.float32).eval()


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers (``nn.Linear``, ``Conv1D`` or swapped) of every decoder layer, by dotted name."""
    prefix, layers = decoder_layers(model)
    found = {}
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear | Conv1D | SparseLinear):
                found[f"{prefix}.{index}.{name}"] = module
    return found


@torch.no_grad()
def prune_by_magnitude(model: nn.Module, sparsity: float) -> None:
    """Zero the smallest magnitudes of every row of every decoder linear weight, layer by layer, in place
    (pruning further an already pruned model gives what pruning the dense one would: zeros go first)."""
    prefix, layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        for module in prunable_modules(layer, f"{prefix}.{index}").values():
            weight = module.weight
            weight.masked_fill_(magnitude_mask(weight, sparsity, Pattern(), scope="row"), 0.0)


def _swap_by_hand(model: nn.Module) -> list[tuple[str, str]]:
    """Every decoder linear layer sparse enough replaced by a ``SparseLinear``; those left, with why."""
    skipped = []
    for name, module in decoder_linears(model).items():
        if isinstance(module, SparseLinear):
            continue
        weight = module.weight.detach()
        weight = weight.t() if isinstance(module, Conv1D) else weight
        sparsity = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
        reason = too_dense(sparsity)
        if reason:
            skipped.append((name, reason))
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SparseLinear.from_dense(weight, module.bias))
    return skipped


def sparse_copy(dense: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of ``dense`` sharing all its tensors, with its decoder linear layers swapped to the CPU
    kernels; and how they were swapped (the entry point, layers swapped, layers left dense and why)."""
    shared = {id(t): t for t in [*dense.parameters(), *dense.buffers()]}
    model = copy.deepcopy(dense, memo=shared)
    if model.get_input_embeddings().weight is not dense.get_input_embeddings().weight:
        raise SystemExit("the copy does not share the dense model's tensors")
    before = {name: module.weight.data_ptr() for name, module in decoder_linears(dense).items()}
    try:
        report = llmprune.use_sparse_kernels(model, backend="cpu")
    except UsageError as exc:
        if not str(exc).startswith("backend must be"):
            raise
        how, skipped = (
            "SparseLinear swapped in by hand (no 'cpu' backend in use_sparse_kernels)",
            _swap_by_hand(model),
        )
    else:
        how = "llmprune.use_sparse_kernels(model, backend='cpu')"
        skipped = [(c.name, "; ".join(c.reasons)) for c in getattr(report, "skipped", [])]
    after = {name: module.weight.data_ptr() for name, module in decoder_linears(dense).items()}
    if after != before:
        raise SystemExit("swapping the copy changed the dense model's weights")
    swapped = [name for name, module in model.named_modules() if isinstance(module, SparseLinear)]
    return model, {"how": how, "swapped": len(swapped), "skipped": skipped}


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the decoder's linear layers as held: weight and bias, or a ``SparseLinear``'s buffers."""
    total = 0
    for module in decoder_linears(model).values():
        tensors = list(module.buffers()) if isinstance(module, SparseLinear) else list(module.parameters())
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@contextlib.contextmanager
def kernel_for_every_token_count() -> Iterator[None]:
    """``SparseLinear`` runs the sparse kernel at any token count (no expansion to dense for prefill)."""
    saved = sparse_linear.SPARSE_TOKENS
    sparse_linear.SPARSE_TOKENS = 1 << 62
    try:
        yield
    finally:
        sparse_linear.SPARSE_TOKENS = saved


@torch.inference_mode()
def logits_error(model: nn.Module, baseline: nn.Module, vocab: int, tokens: int = 8) -> float:
    """Relative L2 error of the logits of a ``tokens``-token random prompt (the sparse kernel's path)."""
    prompt = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    expected = baseline(input_ids=prompt, use_cache=False).logits.float()
    got = model(input_ids=prompt, use_cache=False).logits.float()
    return float((got - expected).norm() / expected.norm())


# ---- measurements -------------------------------------------------------------------------------------


def progress(label: str):
    def report(done: int, total: int) -> None:
        print(f"  {label}: round {done + 1}/{total}", file=sys.stderr, flush=True)

    return report


def bench_pair(
    model: nn.Module, baseline: nn.Module, args: argparse.Namespace, threads: int, label: str
) -> dict:
    """``llmprune.bench``, batch 1, the swapped model alternated with its dense-with-zeros baseline."""
    report = llmprune.bench(
        model=model,
        baseline=baseline,
        prompt_len=args.prompt_len,
        batch=1,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=threads,
        device="cpu",
        progress=progress(f"{label}, {threads} thread(s)"),
    )
    return {
        "threads": threads,
        "decode_dense": report.baseline.decode_tokens_per_s_batch1,
        "decode_sparse": report.model.decode_tokens_per_s_batch1,
        "decode_speedup": report.speedup["decode_1"],
        "prefill_dense": report.baseline.prefill_tokens_per_s,
        "prefill_sparse": report.model.prefill_tokens_per_s,
        "prefill_speedup": report.speedup["prefill"],
        "model_bytes_dense": report.baseline.weight_bytes,
        "model_bytes_sparse": report.model.weight_bytes,
        "peak_bytes_dense": report.baseline.peak_memory_bytes,
        "peak_bytes_sparse": report.model.peak_memory_bytes,
        "report": report.to_dict(),
    }


def synthetic(args: argparse.Namespace) -> list[dict]:
    started = time.perf_counter()
    dense = synthetic_llama(args.layers)
    parameters = sum(p.numel() for p in dense.parameters())
    print(
        f"synthetic Llama: {parameters / 1e9:.3f} B parameters, {args.layers} layers, built in "
        f"{time.perf_counter() - started:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    rows = []
    for sparsity in sorted(args.sparsity):
        started = time.perf_counter()
        prune_by_magnitude(dense, sparsity)
        model, swap = sparse_copy(dense)
        print(
            f"pruned to {sparsity * 100:.0f} % and swapped ({swap['swapped']} layers) in "
            f"{time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        row = {
            "sparsity": sparsity,
            "parameters": parameters,
            "layers": args.layers,
            "swap": swap,
            "linear_bytes_dense": linear_bytes(dense),
            "linear_bytes_sparse": linear_bytes(model),
            "logits_relative_error": logits_error(model, dense, SYNTHETIC["vocab_size"]),
            "runs": [
                bench_pair(model, dense, args, t, f"synthetic {sparsity * 100:.0f} %") for t in args.threads
            ],
        }
        row["linear_bytes_ratio"] = row["linear_bytes_sparse"] / row["linear_bytes_dense"]
        rows.append(row)
        del model
    return rows


def _perplexity(model: nn.Module, windows: torch.Tensor, label: str) -> float:
    started = time.perf_counter()
    value = llmprune.perplexity(model, windows)
    print(
        f"  perplexity {label}: {value:.6g} ({time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return value


def embedded(args: argparse.Namespace) -> list[dict]:
    tokenizer = llmprune.load_tokenizer("smollm2")
    calibration = llmprune.calibration_data(tokenizer, "embedded", nsamples=args.nsamples, seqlen=args.seqlen)
    windows = llmprune.evaluation_data(tokenizer)[: args.eval_windows]
    few = windows[: args.kernel_windows]
    rows = []
    for label, options in EMBEDDED:
        dense = llmprune.load("smollm2", dtype="float32", device="cpu")
        started = time.perf_counter()
        pruned = llmprune.prune(dense, calibration, method="wanda", **options)
        print(f"{label}: pruned in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        model, swap = sparse_copy(dense)
        row = {
            "pruning": label,
            "achieved_sparsity": pruned.achieved_sparsity,
            "swap": swap,
            "linear_bytes_dense": linear_bytes(dense),
            "linear_bytes_sparse": linear_bytes(model),
            "logits_relative_error": logits_error(model, dense, int(dense.config.vocab_size)),
            "eval_windows": len(windows),
            "perplexity_dense": _perplexity(dense, windows, "dense-with-zeros"),
            "perplexity_sparse": _perplexity(model, windows, "swapped"),
            "kernel_windows": len(few),
        }
        if len(few):
            row["perplexity_dense_few"] = _perplexity(dense, few, f"dense-with-zeros, {len(few)} windows")
            with kernel_for_every_token_count():
                row["perplexity_kernel_few"] = _perplexity(model, few, f"kernel only, {len(few)} windows")
        row["runs"] = [bench_pair(model, dense, args, t, label) for t in args.threads]
        rows.append(row)
        del model, dense
    return rows


def llmprune_cli(*args: str) -> tuple[int, str, str]:
    """Run ``llmprune ARGS`` in a child process: its exit status, stdout and stderr."""
    print("$ llmprune " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "llmprune", *args], capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def through_cli(args: argparse.Namespace) -> list[dict]:
    """The embedded model's prunings saved by ``llmprune prune``, then ``llmprune bench PRUNED --baseline
    PRUNED --sparse-kernels --device cpu`` (the issue's command; the baseline loads dense-with-zeros)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmprune-cpu-e2e-") as work:
        for label, options in EMBEDDED:
            pruned = str(Path(work) / label.replace(" ", "-").replace(":", "of").replace("%", "pc"))
            flags = [part for key, value in options.items() for part in (f"--{key}", str(value))]
            samples = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
            prune = [
                "prune", "--method", "wanda", *flags, *samples, "--output", pruned, "--eval-nsamples", "0",
                "--device", "cpu", "--dtype", "float32",
            ]  # fmt: skip
            code, _, err = llmprune_cli(*prune)
            shown = " ".join(prune).replace(pruned, "PRUNED")
            if code:
                raise SystemExit(f"llmprune prune failed ({code}): {err.strip()}")
            for threads in args.threads:
                command = [
                    "bench", pruned, "--baseline", pruned, "--sparse-kernels", "--device", "cpu",
                    "--dtype", "float32", "--batch", "1", "--prompt-len", str(args.prompt_len),
                    "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                    "--warmup", str(args.warmup), "--threads", str(threads),
                ]  # fmt: skip
                code, out, err = llmprune_cli(*command, "--json")
                row = {
                    "pruning": label,
                    "threads": threads,
                    "prune_command": f"llmprune {shown}",
                    "command": "llmprune " + " ".join(command).replace(pruned, "PRUNED"),
                }
                if code:
                    row["error"] = f"exit {code}: " + (err.strip().splitlines() or [""])[-1]
                else:
                    report = json.loads(out)
                    row["decode_speedup"] = report["speedup"]["decode_1"]
                    row["prefill_speedup"] = report["speedup"]["prefill"]
                    row["report"] = report
                rows.append(row)
    return rows


# ---- output -------------------------------------------------------------------------------------------


def _mb(count: int) -> str:
    return f"{count / 2**20:,.0f} MiB"


def _digits(value: float) -> str:
    return f"{value:.4g}"


def print_synthetic(rows: list[dict]) -> None:
    first = rows[0]
    print(
        f"\n## Synthetic Llama, {first['parameters'] / 1e9:.2f} B parameters ({first['layers']} layers), "
        "batch 1, float32\n"
    )
    print(
        "| sparsity | threads | dense decode tok/s | sparse decode tok/s | decode | target | "
        "dense prefill tok/s | sparse prefill tok/s | prefill | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        target = SYNTHETIC_TARGETS.get(row["sparsity"])
        for run in row["runs"]:
            print(
                f"| {row['sparsity'] * 100:.0f} % | {run['threads']} | {run['decode_dense']:.2f} | "
                f"{run['decode_sparse']:.2f} | **{run['decode_speedup']:.2f}×** | "
                f"{'—' if target is None else f'≥ {target}×'} | {run['prefill_dense']:.1f} | "
                f"{run['prefill_sparse']:.1f} | **{run['prefill_speedup']:.2f}×** | ≥ {PREFILL_TARGET}× |"
            )
    print(
        "\n| sparsity | decoder linear weights, dense | sparse | ratio | target | whole model, dense | "
        "sparse | logits rel. error (8 tokens) | layers swapped / left dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        run = row["runs"][0]
        target = f"≤ {MEMORY_TARGET}×" if row["sparsity"] == 0.5 else "—"
        print(
            f"| {row['sparsity'] * 100:.0f} % | {_mb(row['linear_bytes_dense'])} | "
            f"{_mb(row['linear_bytes_sparse'])} | "
            f"**{row['linear_bytes_ratio']:.3f}×** | {target} | {_mb(run['model_bytes_dense'])} | "
            f"{_mb(run['model_bytes_sparse'])} | {row['logits_relative_error']:.1e} | "
            f"{row['swap']['swapped']} / {len(row['swap']['skipped'])} |"
        )
    print(f"\nswapped with {first['swap']['how']}")


def print_embedded(rows: list[dict]) -> None:
    print("\n## Embedded model (SmolLM2-135M), batch 1, float32\n")
    print(
        "| pruning | sparsity | threads | dense decode tok/s | sparse decode tok/s | decode | target | "
        "prefill |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for run in row["runs"]:
            print(
                f"| {row['pruning']} | {row['achieved_sparsity'] * 100:.1f} % | {run['threads']} | "
                f"{run['decode_dense']:.1f} | {run['decode_sparse']:.1f} | **{run['decode_speedup']:.2f}×** "
                f"| ≥ {EMBEDDED_TARGET}× | {run['prefill_speedup']:.2f}× |"
            )
    print(
        "\n| pruning | perplexity, dense-with-zeros | swapped | same 4 digits | kernel only | dense, same "
        "windows | same 4 digits | decoder linear weights, sparse / dense | logits rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        same = _digits(row["perplexity_dense"]) == _digits(row["perplexity_sparse"])
        few = ["—", "—", "—"]
        if "perplexity_kernel_few" in row:
            kernel, dense = row["perplexity_kernel_few"], row["perplexity_dense_few"]
            few = [f"{kernel:.6g}", f"{dense:.6g}", "yes" if _digits(kernel) == _digits(dense) else "**NO**"]
        print(
            f"| {row['pruning']} | {row['perplexity_dense']:.6g} | {row['perplexity_sparse']:.6g} | "
            f"{'yes' if same else '**NO**'} | {' | '.join(few)} | "
            f"{row['linear_bytes_sparse'] / row['linear_bytes_dense']:.3f}× | "
            f"{row['logits_relative_error']:.1e} |"
        )
    first = rows[0]
    print(
        f"\nperplexity on {first['eval_windows']} embedded evaluation windows of 512 tokens (kernel only: "
        f"the first {first['kernel_windows']}, every token through the sparse kernel); swapped with "
        f"{first['swap']['how']}"
    )


def print_cli(rows: list[dict]) -> None:
    print("\n## Embedded model through the CLI (`llmprune bench --sparse-kernels --device cpu`)\n")
    print("| pruning | threads | decode | prefill | command |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            figures = f"{row['error']} | —"
        else:
            figures = f"**{row['decode_speedup']:.2f}×** | {row['prefill_speedup']:.2f}×"
        print(f"| {row['pruning']} | {row['threads']} | {figures} | `{row['command']}` |")
    for command in dict.fromkeys(row["prune_command"] for row in rows):
        print(f"\nPRUNED from `{command}`")


# ---- command line -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["both", "synthetic", "embedded"], default="both")
    parser.add_argument(
        "--sparsity", type=float_list, default=[0.5, 0.7], help="synthetic model, e.g. 0.5,0.7"
    )
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the synthetic model (30)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per round (32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per model (3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per model first (1)")
    parser.add_argument("--threads", type=int_list, default=[1, 2], help="thread counts, e.g. 1,2")
    parser.add_argument("--nsamples", type=int, default=None, help="embedded calibration windows (32)")
    parser.add_argument(
        "--seqlen", type=int, default=None, help="embedded calibration tokens per window (256)"
    )
    parser.add_argument("--eval-windows", type=int, default=None, help="perplexity windows of 512 (16)")
    parser.add_argument(
        "--kernel-windows", type=int, default=None, help="of which through the kernel only (4; 0: skip)"
    )
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
    parser.add_argument(
        "--cli",
        action="store_true",
        help="also the embedded prunings through llmprune prune and llmprune bench",
    )
    parser.add_argument("--json", type=Path, default=None, help="write everything here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 synthetic layer, 16-token prompt, 4 tokens, 1 round: checks the script",
    )
    args = parser.parse_args()
    defaults = {
        "layers": 30,
        "prompt_len": 128,
        "new_tokens": 32,
        "repeats": 3,
        "warmup": 1,
        "nsamples": 32,
        "seqlen": 256,
        "eval_windows": 16,
        "kernel_windows": 4,
    }
    if args.quick:
        defaults.update(
            layers=1,
            prompt_len=16,
            new_tokens=4,
            repeats=1,
            warmup=0,
            nsamples=4,
            seqlen=64,
            eval_windows=2,
            kernel_windows=1,
        )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    select_isa(args.isa, args.thread_backend)
    info = machine_info()
    started = time.perf_counter()
    result: dict = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    result["settings"]["json"] = None if args.json is None else str(args.json)
    if args.part in ("both", "synthetic"):
        result["synthetic"] = synthetic(args)
    if args.part in ("both", "embedded"):
        result["embedded"] = embedded(args)
    if args.cli:
        result["cli"] = through_cli(args)
    result["seconds"] = time.perf_counter() - started

    print("\n## Machine\n")
    print_machine(info)
    print(
        f"- settings: batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} decoded tokens, median of "
        f"{args.repeats} rounds after {args.warmup} warm-up, alternated by llmprune.bench; SparseLinear runs "
        f"the kernel up to {sparse_linear.SPARSE_TOKENS} tokens"
    )
    if "synthetic" in result:
        print_synthetic(result["synthetic"])
    if "embedded" in result:
        print_embedded(result["embedded"])
    if "cli" in result:
        print_cli(result["cli"])
    print(f"\n{result['seconds']:.0f} s in all")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
