"""Pruning with two CPU processes (gloo) against one, on the same calibration. Run by hand; writes JSON.

Same protocol as ``core.py`` (embedded model, 32 x 256 calibration tokens, seed 0). Both configurations use
the same cores: one process with every thread, or two with half each. Each process also times its
collectives (all-reduce of statistics and error terms, broadcast of pruned weights), which includes waiting
for the slowest process, and counts the bytes it sends through them.

    python benchmarks/distributed.py --out benchmarks/out/distributed.json

``--compare`` instead prunes with 1, 2 and 3 processes (``--runs PxT``: P processes of T threads each, the
first run is the reference) and counts the decoder weight tensors whose mask or values differ from the
reference's, with each result's perplexity (16 x 512 evaluation tokens, as ``core.py``):

    python benchmarks/distributed.py --compare --runs 1x1 2x1 3x1 1x2 --nsamples 8 --seqlen 128 \
        --out benchmarks/out/determinism.json

On the 2-core development machine (the same 2 cores either way, so no speed-up is possible) Wanda took
27.0 s in one process and 28.3 s in two, of which 2.7-4.3 s per process in collectives (0.09-0.14 s per
decoder layer, 405 MiB of weights broadcast); SparseGPT 42 s in two processes with 5-7.5 s in collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import llmprune
from llmprune.config import PruneOptions, build
from llmprune.pipeline.distributed import Communicator, TorchDistributed
from llmprune.pruning import prune_model

NSAMPLES, SEQLEN, SEED = 32, 256, 0


class Timed(Communicator):
    """A communicator that times and counts what it passes to another."""

    def __init__(self, inner: Communicator) -> None:
        super().__init__(inner.device)
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.seconds, self.bytes, self.calls = 0.0, 0, 0

    def _timed(self, operation, tensor: torch.Tensor, *args) -> None:
        start = time.perf_counter()
        operation(tensor, *args)
        self.seconds += time.perf_counter() - start
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._timed(self.inner.all_reduce, tensor)

    def broadcast(self, tensor: torch.Tensor, source: int) -> None:
        self._timed(self.inner.broadcast, tensor, source)


def prune_once(method: str, true_sequential: bool, comm: Communicator) -> dict:
    model, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
    calibration = llmprune.calibration_data(tokenizer, "embedded", NSAMPLES, SEQLEN, SEED)
    options = build(PruneOptions, {"method": method, "true_sequential": true_sequential})
    timed = Timed(comm)
    report = prune_model(model, calibration, options, comm=timed)
    layers = len({row.layer for row in report.layers})
    return {
        "seconds": report.seconds,
        "collective_seconds": timed.seconds,
        "collective_seconds_per_layer": timed.seconds / layers,
        "collective_calls": timed.calls,
        "collective_megabytes": timed.bytes / 2**20,
        "achieved_sparsity": report.achieved_sparsity,
    }


def _worker(rank: int, world: int, threads: int, init: str, cases: list, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        comm = TorchDistributed(torch.device("cpu"))
        results = [prune_once(method, ts, comm) for method, ts in cases]
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def decoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.weight": module.weight.detach().contiguous()
        for name, module in model.named_modules()
        if name.startswith("model.layers.") and isinstance(module, nn.Linear)
    }


def _compare_worker(rank: int, world: int, threads: int, init: str, settings: dict, out: str) -> None:
    """Prune every case with this process's share; rank 0 saves the decoder weights of each."""
    torch.set_num_threads(threads)
    comm: Communicator = Communicator()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        comm = TorchDistributed(torch.device("cpu"))
    try:
        model, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        calibration = llmprune.calibration_data(
            tokenizer, "embedded", settings["nsamples"], settings["seqlen"], SEED
        )
        for index, (method, ts) in enumerate(settings["cases"]):
            model.load_state_dict(dense)
            values = {"method": method, "true_sequential": ts, "batch_size": settings["batch_size"]}
            report = prune_model(model, calibration, build(PruneOptions, values), comm=comm)
            if rank == 0:
                save_file(decoder_weights(model), str(Path(out, f"case{index}.safetensors")))
                Path(out, f"case{index}.json").write_text(json.dumps({"seconds": report.seconds}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def compare(args: argparse.Namespace, cases: list) -> None:
    """1, 2, 3... processes against the first run: tensors whose masks or values differ, and perplexity."""
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size}
    settings["cases"] = cases
    model, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
    evaluation = llmprune.evaluation_data(tokenizer, "embedded", 512, 16)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        for number, spec in enumerate(args.runs):
            world, threads = map(int, spec.split("x"))
            folder = Path(scratch, spec)
            folder.mkdir()
            init = str(Path(scratch, f"init-{spec}"))
            mp.spawn(_compare_worker, args=(world, threads, init, settings, str(folder)), nprocs=world)
            for index, (method, ts) in enumerate(cases):
                weights = load_file(folder / f"case{index}.safetensors")
                seconds = json.loads((folder / f"case{index}.json").read_text())["seconds"]
                first = Path(scratch, args.runs[0], f"case{index}.safetensors")
                reference = weights if number == 0 else load_file(first)
                masks = sum(not torch.equal(w == 0, reference[k] == 0) for k, w in weights.items())
                values = sum(not torch.equal(w, reference[k]) for k, w in weights.items())
                largest = max(float((w - reference[k]).abs().max()) for k, w in weights.items())
                if number and values == 0:
                    ppl = next(r["perplexity"] for r in rows[: len(cases)] if r["case"] == index)
                else:
                    model.load_state_dict(weights, strict=False)
                    ppl = llmprune.perplexity(model, evaluation)
                row = {"run": spec, "case": index, "method": method, "true_sequential": ts,
                       "tensors": len(weights), "masks_differ": masks, "values_differ": values,
                       "max_difference": largest, "perplexity": ppl, "seconds": seconds}
                rows.append(row)
                print(
                    f"{spec:>4} {method:>9} ts={ts!s:5} masks differ {masks:3d}/{len(weights)}, values "
                    f"{values:3d}, max |diff| {largest:.3g}, perplexity {ppl:.3f} ({seconds:.1f} s)",
                    flush=True,
                )
            if number:
                for index in range(len(cases)):
                    (folder / f"case{index}.safetensors").unlink()
    result = {"machine": platform.platform(), "torch": torch.__version__, **settings, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/distributed.json"))
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--true-sequential", action="store_true", help="also the true-sequential mode")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--compare", action="store_true", help="weights of 1, 2, 3 processes against one")
    parser.add_argument("--runs", nargs="+", default=["1x1", "2x1", "3x1"], help="--compare: PxT")
    parser.add_argument("--nsamples", type=int, default=8, help="--compare: calibration samples")
    parser.add_argument("--seqlen", type=int, default=128, help="--compare: tokens per sample")
    parser.add_argument("--batch-size", type=int, default=4, help="--compare: samples per batch")
    args = parser.parse_args()
    modes = (False, True) if args.true_sequential else (False,)
    cases = [(method, ts) for ts in modes for method in args.methods]
    if args.compare:
        compare(args, cases)
        return

    rows = []
    torch.set_num_threads(args.cores)
    single = [prune_once(method, ts, Communicator()) for method, ts in cases]
    with tempfile.TemporaryDirectory() as scratch:
        world = 2
        mp.spawn(
            _worker,
            args=(world, max(1, args.cores // world), str(Path(scratch, "init")), cases, scratch),
            nprocs=world,
            join=True,
        )
        ranks = [json.loads(Path(scratch, f"rank{r}.json").read_text()) for r in range(world)]
    for index, (method, ts) in enumerate(cases):
        rows.append(
            {
                "method": method,
                "true_sequential": ts,
                "one_process": single[index],
                "two_processes": [results[index] for results in ranks],
            }
        )
    result = {"machine": platform.platform(), "cores": args.cores, "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for row in rows:
        one = row["one_process"]["seconds"]
        two = max(r["seconds"] for r in row["two_processes"])
        comm = max(r["collective_seconds"] for r in row["two_processes"])
        print(
            f"{row['method']:>9} ts={row['true_sequential']!s:5}  1 process {one:6.1f} s"
            f"  2 processes {two:6.1f} s (collectives {comm:.2f} s)"
        )


if __name__ == "__main__":
    main()
