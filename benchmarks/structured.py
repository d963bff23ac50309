"""Structured pruning on the embedded model (issue 4): parameters, perplexity and CPU throughput. By hand.

Public protocol (calibration 32 x 256 tokens, seed 0; evaluation the first 16 windows of 512 tokens of the
last 20 %). Cells: heads + channels removed at 20, 35 and 50 % of the decoder parameters, each with and
without least-squares re-fitting, the 25 % target, and 2, 4 and 8 whole layers removed by block influence.
Throughput is measured for every cell against the dense model in the same process, alternating dense and
pruned runs (medians of ``--repeats`` after a warm-up): prefill tokens/s for a 512-token prompt at batch 1
(next-token logits only, as ``generate`` does), and decode tokens/s at batch 1 (64 greedy steps with the KV
cache).

    python benchmarks/structured.py --out benchmarks/out/structured.json

``--widths adaptive`` prunes heads + channels at 20, 35 and 50 % with per-layer widths (FLAP's global
ranking) instead; those models are saved with ``save_pruned`` and read back with ``llmprune.load``.
``--skip-timing`` leaves throughput out (timings on a shared machine are not worth reporting).
``--time-only`` re-times the models a run saved; ``--plot PNG --logs LOG...`` draws perplexity against
prefill speedup from the JSON lines such runs print (the last timing of a cell wins):

    python benchmarks/structured.py --time-only > benchmarks/out/structured-timing.log
    python benchmarks/structured.py --plot docs/structured_tradeoff.png \
        --logs benchmarks/out/structured.log benchmarks/out/structured-timing.log
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import llmprune
from llmprune.export.save import save_pruned
from llmprune.structured import decoder_parameters
from llmprune.structured.checkpoint import layer_widths

PROMPT, DECODE = 512, 64


@torch.no_grad()
def prefill_seconds(model: torch.nn.Module, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=prompt, use_cache=True, logits_to_keep=1)  # as generate() does: next-token logits only
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model: torch.nn.Module, prompt: torch.Tensor) -> float:
    """Time of ``DECODE`` single-token greedy steps after the prompt (prefill excluded)."""
    output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(DECODE):
        output = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def alternated(dense: torch.nn.Module, pruned: torch.nn.Module, prompt: torch.Tensor, repeats: int) -> dict:
    """Medians of dense and pruned timings taken in turn (after one warm-up each)."""
    times: dict[str, list[float]] = {
        k: [] for k in ("dense_prefill", "pruned_prefill", "dense_decode", "pruned_decode")
    }
    for model in (dense, pruned):
        prefill_seconds(model, prompt), decode_seconds(model, prompt[:, :64])
    for _ in range(repeats):
        for name, model in (("dense", dense), ("pruned", pruned)):
            times[f"{name}_prefill"].append(prefill_seconds(model, prompt))
            times[f"{name}_decode"].append(decode_seconds(model, prompt))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "dense_prefill_tps": PROMPT / medians["dense_prefill"],
        "pruned_prefill_tps": PROMPT / medians["pruned_prefill"],
        "prefill_speedup": medians["dense_prefill"] / medians["pruned_prefill"],
        "dense_decode_tps": DECODE / medians["dense_decode"],
        "pruned_decode_tps": DECODE / medians["pruned_decode"],
        "decode_speedup": medians["dense_decode"] / medians["pruned_decode"],
    }


def read_logs(logs: list[Path]) -> tuple[list[dict], dict[int, dict]]:
    """The cell rows (dense first, in cell order) and the latest timing of each cell, from printed logs."""
    rows: list[dict] = []
    timings: dict[int, dict] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if "perplexity" in record:
                rows = [record] if record.get("cell") == "dense" else [*rows, record]
            elif isinstance(record.get("cell"), int):
                timings[record["cell"]] = record
    return rows, timings


def plot(rows: list[dict], timings: dict[int, dict], path: Path) -> None:
    """Perplexity (log scale) against prefill speedup over dense, one point per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.scatter([1.0], [rows[0]["perplexity"]], color="black", marker="*", s=120, label="dense")
    styles = {
        (False, True): ("tab:blue", "o", "heads + channels, re-fitted"),
        (False, False): ("tab:orange", "s", "heads + channels, not re-fitted"),
        (True, True): ("tab:green", "^", "whole layers (block influence)"),
    }
    seen = set()
    for number, row in enumerate(rows[1:]):
        if number not in timings:
            continue
        key = (row["units"] == ["layers"], bool(row["reconstruct"]))
        color, marker, label = styles[key]
        x, y = timings[number]["prefill_speedup"], row["perplexity"]
        axes.scatter([x], [y], color=color, marker=marker, label=None if key in seen else label)
        seen.add(key)
        text = f"{len(row['removed_layers'])} layers" if key[0] else f"{row['removed_fraction']:.0%}"
        axes.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_yscale("log")
    axes.set_xlabel("prefill speedup over dense (512-token prompt, CPU)")
    axes.set_ylabel("perplexity (embedded text)")
    axes.set_title("Structured pruning of SmolLM2-135M: quality against speed")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/structured.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--score", default="flap")
    parser.add_argument("--models", type=Path, default=Path("benchmarks/out/structured-models"))
    parser.add_argument("--time-only", action="store_true", help="only time the models saved by a run")
    parser.add_argument("--widths", choices=["uniform", "adaptive"], default="uniform")
    parser.add_argument("--sparsities", default="0.2,0.35,0.5", help="heads + channels cells")
    parser.add_argument("--skip-timing", action="store_true", help="parameters and perplexity only")
    parser.add_argument("--plot", type=Path, help="draw perplexity against speedup from --logs to this PNG")
    parser.add_argument("--logs", type=Path, nargs="*", default=[], help="JSON-lines output of earlier runs")
    args = parser.parse_args()
    if args.plot:
        plot(*read_logs(args.logs), args.plot)
        return
    if args.time_only:
        dense, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
        prompt = llmprune.evaluation_data(tokenizer, "embedded", 512, 16)[:1, :PROMPT]
        for number in range(len(list(args.models.glob("cell-*")))):
            saved = llmprune.load(args.models / f"cell-{number}", dtype="float32", device="cpu")
            print(
                json.dumps({"cell": number, **alternated(dense, saved.eval(), prompt, args.repeats)}),
                flush=True,
            )
        return

    dense, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
    calibration = llmprune.calibration_data(tokenizer, "embedded", 32, 256, 0)
    evaluation = llmprune.evaluation_data(tokenizer, "embedded", 512, 16)
    prompt = evaluation[:1, :PROMPT]
    layers = dense.config.num_hidden_layers
    sparsities = [float(x) for x in args.sparsities.split(",")]
    if args.widths == "uniform":
        cells = [
            {"units": ["heads", "channels"], "sparsity": s, "reconstruct": r}
            for s in sparsities
            for r in (True, False)
        ]
        cells.insert(0, {"units": ["heads", "channels"], "sparsity": 0.25, "reconstruct": True})
        cells += [{"units": ["layers"], "sparsity": k / layers, "reconstruct": True} for k in (2, 4, 8)]
    else:  # the default score and re-fitting, against the uniform cells of the same sparsity
        cells = [{"units": ["heads", "channels"], "sparsity": s, "reconstruct": True} for s in sparsities]

    rows = [
        {
            "cell": "dense",
            "parameters": sum(p.numel() for p in dense.parameters()),
            "decoder_parameters": decoder_parameters(dense),
            "perplexity": llmprune.perplexity(dense, evaluation),
        }
    ]
    print(json.dumps(rows[0]), flush=True)
    # Phase 1: prune every cell and save it; phase 2: time every saved model (loaded with llmprune.load:
    # plain from_pretrained for uniform widths) against the dense model, so that timing runs back to back
    # on a quiet machine.
    for number, cell in enumerate(cells):
        pruned = copy.deepcopy(dense)
        report = llmprune.prune(
            pruned, calibration, pattern="structured", score=args.score, widths=args.widths, **cell
        )
        save_pruned(pruned, None, args.models / f"cell-{number}", {}, overwrite=True)
        widths = layer_widths(pruned)
        row = {
            **cell,
            "score": args.score,
            "widths": args.widths,
            "layer_widths": widths,
            "seconds": report.seconds,
            "parameters": sum(p.numel() for p in pruned.parameters()),
            "decoder_parameters": report.parameters_after,
            "removed_fraction": report.achieved_sparsity,
            "removed_layers": report.removed_layers,
            "heads": pruned.config.num_attention_heads,
            "kv_heads": pruned.config.num_key_value_heads,
            "intermediate": pruned.config.intermediate_size,
            "perplexity": llmprune.perplexity(pruned, evaluation),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del pruned
    for number, row in enumerate([] if args.skip_timing else rows[1:]):
        saved = llmprune.load(args.models / f"cell-{number}", dtype="float32", device="cpu")
        row.update(alternated(dense, saved, prompt, args.repeats))
        print(json.dumps({"cell": number, **{k: v for k, v in row.items() if "tps" in k or "speedup" in k}}))

    machine = {
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(
        "| removed | re-fit | heads / kv / MLP width | params | perplexity | prefill tok/s | decode tok/s |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | | | {rows[0]['parameters'] / 1e6:.1f} M | {rows[0]['perplexity']:.2f} | | |")
    for r in rows[1:]:
        what = (
            f"{len(r['removed_layers'])} layers"
            if r["units"] == ["layers"]
            else f"{r['removed_fraction']:.1%}"
        )
        shapes = f"{r['heads']} / {r['kv_heads']} / {r['intermediate']}"
        if r["layer_widths"]:  # per layer: the range over layers
            shapes = " / ".join(
                f"{min(w[k] for w in r['layer_widths'])}–{max(w[k] for w in r['layer_widths'])}"
                for k in ("heads", "kv_heads", "intermediate")
            )
        timing = (
            f"{r['pruned_prefill_tps']:.0f} ({r['prefill_speedup']:.2f}×) | "
            f"{r['pruned_decode_tps']:.1f} ({r['decode_speedup']:.2f}×)"
            if "prefill_speedup" in r
            else "not measured | not measured"
        )
        print(
            f"| {what} | {'yes' if r['reconstruct'] else 'no'} | {shapes} | "
            f"{r['parameters'] / 1e6:.1f} M | {r['perplexity']:.2f} | {timing} |"
        )


if __name__ == "__main__":
    main()
