"""Sparse fine-tuning and gradual pruning on the embedded model, public protocol (issue 5). Run by hand.

One-shot Wanda (50 % unstructured, 2:4) with the core benchmark's calibration (32 x 256 tokens, seed 0),
then fine-tuned on windows drawn from the calibration part of the embedded text only (the first 70 % of
its tokens); held-out perplexity on the first 16 non-overlapping 512-token windows of the last 20 %, as in
benchmarks/core.py, measured at step milestones inside one run (the learning rate is constant after a
short warm-up, so a milestone of a long run is what a run of that length gives). Gradual pruning goes
from the dense model to 50 % over the same budget. Runs go in priority order; the JSON is rewritten
after every milestone so that a run cut short keeps what it measured.

    python benchmarks/training.py --out benchmarks/out/training.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import llmprune
from llmprune.data.text import tokens_for
from llmprune.training import FinetuneOptions, SparsityMasks, finetune_model
from llmprune.training.finetuning import training_windows

NSAMPLES, SEQLEN, SEED, EVAL_WINDOWS, EVAL_SEQLEN = 32, 256, 0, 16, 512

RUNS = {  # name: (start, extra fine-tuning options); gradual pruning ends at 3/4 of the steps
    "wanda50-lm": ("unstructured", {}),
    "wanda50-distill": ("unstructured", {"distill": True}),
    "wanda24-lm": ("2:4", {}),
    "wanda24-distill": ("2:4", {"distill": True}),
    "dense-lm": ("dense", {}),  # the in-domain gain a sparse model's fine-tuning also gets
    "gradual50-lm": ("dense", {"gradual": True, "final": 0.5, "start": 0, "score": "wanda"}),
}
_PRUNED: dict[str, tuple[dict, float, float]] = {}  # start -> (weights, report sparsity, perplexity)


def _start_model(start: str, tokenizer, evaluation):
    """The embedded model one-shot pruned with Wanda (once per pattern, then copied), and its perplexity."""
    model = llmprune.load("smollm2", "float32", "cpu")
    if start not in _PRUNED:
        sparsity = 0.0
        if start != "dense":
            calibration = llmprune.calibration_data(tokenizer, "embedded", NSAMPLES, SEQLEN, SEED)
            sparsity = llmprune.prune(model, calibration, method="wanda", pattern=start).achieved_sparsity
        state = {k: v.clone() for k, v in model.state_dict().items()}
        _PRUNED[start] = (state, sparsity, llmprune.perplexity(model, evaluation))
    state, sparsity, ppl = _PRUNED[start]
    model.load_state_dict(state)
    return model, sparsity, ppl


def run(name: str, steps: int, args, results: dict, save) -> None:
    start, extra = RUNS[name]
    if extra.get("gradual"):
        extra = {**extra, "end": steps * 3 // 4, "frequency": max(1, steps // 20)}
    tokenizer = llmprune.load_tokenizer()
    evaluation = llmprune.evaluation_data(tokenizer, "embedded", EVAL_SEQLEN, EVAL_WINDOWS)
    model, sparsity, ppl = _start_model(start, tokenizer, evaluation)
    teacher = llmprune.load("smollm2", "float32", "cpu") if extra.get("distill") else None
    row = {"start": start, "steps": steps, "options": extra, "perplexity": {}, "losses": []}
    results["runs"][name] = row
    row["prune_report_sparsity"] = sparsity
    masks = SparsityMasks.from_zeros(model, "unstructured" if start == "dense" else start)
    initial_zeros = {n: (m.weight == 0).clone() for n, m in masks.targets.items()}
    row["perplexity"]["0"] = ppl
    print(f"{name}: step 0 ppl {row['perplexity']['0']:.2f}", flush=True)
    save()
    options = FinetuneOptions(
        steps=steps, lr=args.lr, batch_size=args.batch_size, seqlen=args.seqlen, warmup=10, **extra
    )
    windows = training_windows(tokens_for(tokenizer, "embedded", "calibration"), options)
    milestones = {25, 50, 200, 500, steps}
    timer = {"last": time.perf_counter()}

    def on_step(step: int, loss: float, trained) -> None:
        row["losses"].append(loss)
        if step % 10 == 0:
            print(
                f"{name}: step {step} loss {loss:.4f} ({time.perf_counter() - timer['last']:.1f} s)",
                flush=True,
            )
            timer["last"] = time.perf_counter()
        if step in milestones:
            row["perplexity"][str(step)] = llmprune.perplexity(trained, evaluation)
            print(f"{name}: step {step} ppl {row['perplexity'][str(step)]:.2f}", flush=True)
            save()

    result = finetune_model(
        model, windows, options, teacher=teacher, masks=None if start == "dense" else masks, on_step=on_step
    )
    row["wall_seconds_per_step"] = result.seconds_per_step
    row["cpu_seconds_per_step"] = result.cpu_seconds_per_step
    row["final_sparsity"] = result.overall_sparsity
    row["layer_sparsity_range"] = [min(result.sparsity.values()), max(result.sparsity.values())]
    final = SparsityMasks(model)  # re-checked from the weights themselves
    row["rechecked_sparsity"] = final.overall()
    if start != "dense":
        row["mask_kept_exactly"] = all(
            torch.equal(initial_zeros[n], m.weight == 0) for n, m in final.targets.items()
        )
    if start == "2:4" or extra.get("pattern") == "2:4":
        row["nm_valid"] = all(
            int((m.weight != 0).reshape(m.weight.shape[0], -1, 4).sum(-1).max()) <= 2
            for m in final.targets.values()
        )
    print(f"{name}: done {json.dumps({k: v for k, v in row.items() if k != 'losses'})}", flush=True)
    save()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out/training.json")
    parser.add_argument(
        "--runs",
        default="wanda50-lm:200,wanda50-distill:50,wanda24-lm:50,gradual50-lm:50",
        help="NAME:STEPS,... in order (names: " + ", ".join(RUNS) + ")",
    )
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-dense", action="store_true", help="do not re-measure the dense model")
    args = parser.parse_args()
    if args.threads:  # on an oversubscribed machine one thread per process wastes less in spin-waits
        torch.set_num_threads(args.threads)
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.platform()}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": vars(args),
        "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2) + "\n")

    if not args.skip_dense:
        model, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
        results["dense_perplexity"] = llmprune.perplexity(
            model, llmprune.evaluation_data(tokenizer, "embedded", EVAL_SEQLEN, EVAL_WINDOWS)
        )
        print(f"dense ppl {results['dense_perplexity']:.2f}", flush=True)
        del model
        save()
    for spec in args.runs.split(","):
        name, _, steps = spec.partition(":")
        run(name, int(steps), args, results, save)


if __name__ == "__main__":
    main()
