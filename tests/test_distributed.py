"""Pruning across processes: two gloo processes on CPU end with the single process's masks and weights.

The calibration rows are split so that each process's batches are exactly the single process's batches
(8 rows in batches of 4: one batch per process). Each layer's statistics are then the same per-batch sums,
added in another order, so they agree to float rounding; masks can only differ where two scores tie to
within that rounding, which the fixed seeds here do not produce (the test is deterministic: same data, same
summation order on every run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

import llmprune
from conftest import tiny_calibration, tiny_model
from llmprune.cli.main import main
from llmprune.config import PruneOptions, build
from llmprune.errors import UsageError
from llmprune.pipeline.distributed import Communicator, TorchDistributed, communicator_from_environment
from llmprune.pipeline.driver import prune_model
from llmprune.pipeline.statistics import InputStatistics
from test_cli import save_tiny_llama

CASES = [("wanda", False), ("wanda", True), ("sparsegpt", False), ("sparsegpt", True)]
WORLD = 2


def prune_tiny(method: str, true_sequential: bool, comm: Communicator | None = None) -> tuple[dict, dict]:
    """Prune a tiny Llama; its decoder weights and the report's layer rows."""
    model = tiny_model("llama")
    # Errors are measured on every 5th token (every process samples from its global token offset), but with
    # true_sequential a single process's batches feed statistics in lockstep, in arrival order, which shifts
    # the sampled tokens: there every token is sampled, so that both runs measure the same tokens.
    error_tokens = 256 if true_sequential else 48
    values = {
        "method": method,
        "true_sequential": true_sequential,
        "batch_size": 4,
        "error_tokens": error_tokens,
    }
    options = build(PruneOptions, values)
    report = prune_model(model, tiny_calibration(nsamples=8), options, comm=comm)
    weights = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name.startswith("model.layers.") and isinstance(module, nn.Linear)
    }
    return weights, report.to_dict()["layers"]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        comm = communicator_from_environment(torch.device("cpu"))  # wraps the group set up above
        assert isinstance(comm, TorchDistributed) and (comm.rank, comm.world_size) == (rank, WORLD)
        results = {case: prune_tiny(*case, comm=comm) for case in CASES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(root / "init"), str(root)), nprocs=WORLD, join=True)
    return [torch.load(root / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize(("method", "true_sequential"), CASES)
def test_two_processes_match_one(distributed_results, method, true_sequential):
    expected_weights, expected_rows = prune_tiny(method, true_sequential)
    first_weights, first_rows = distributed_results[0][(method, true_sequential)]
    for results in distributed_results[1:]:  # every process holds the very same weights and report
        weights, rows = results[(method, true_sequential)]
        assert all(torch.equal(weights[name], first_weights[name]) for name in first_weights)
        assert rows == first_rows
    assert first_weights.keys() == expected_weights.keys()
    for name, weight in expected_weights.items():
        assert torch.equal(first_weights[name] == 0, weight == 0), f"mask of {name}"
        torch.testing.assert_close(first_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert [r["name"] for r in first_rows] == [r["name"] for r in expected_rows]
    for row, expected in zip(first_rows, expected_rows, strict=True):
        assert row["achieved_sparsity"] == expected["achieved_sparsity"]
        assert row["relative_error"] == pytest.approx(expected["relative_error"], rel=1e-4)
        assert row["damp"] == expected["damp"]


def test_rows_are_split_contiguously():
    class Three(Communicator):
        world_size = 3

    shares = []
    for rank in range(3):
        comm = Three()
        comm.rank = rank
        shares.append(comm.rows(7))
    assert [(s.start, s.stop) for s in shares] == [(0, 2), (2, 4), (4, 7)]
    assert Communicator().rows(5) == slice(0, 5)


def test_processes_sample_the_single_process_error_tokens():
    x = torch.randn(2, 37, 6, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    whole = InputStatistics(6, "input_norms", 5, cpu)
    for part in x:
        whole.update(part)
    first, second = InputStatistics(6, "input_norms", 5, cpu), InputStatistics(6, "input_norms", 5, cpu, 37)
    first.update(x[0])
    second.update(x[1])
    assert torch.equal(torch.cat([first.samples(), second.samples()]), whole.samples())


def test_more_processes_than_samples_is_a_usage_error():
    class Three(Communicator):
        world_size = 3

    options = build(PruneOptions, {"method": "wanda"})
    with pytest.raises(UsageError, match=r"^3 processes need at least as many calibration samples, got 2$"):
        prune_model(tiny_model("llama"), tiny_calibration(nsamples=2), options, comm=Three())


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "offload"])
def test_torchrun_cli_saves_once_what_one_process_saves(tmp_path, capsys, streamed):
    """``torchrun -m llmprune prune``: rank 0 alone prints and saves the single process's result, also
    when every process streams the layers from disk (``--offload``) and rank 0 writes the shards."""
    tokenizer = llmprune.load_tokenizer("smollm2")
    model = save_tiny_llama(tmp_path / "tiny", tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(llmprune.embedded_text()[:20_000], encoding="utf-8")
    args = ["prune", "--model", model, "--calibration", text, "--method", "sparsegpt", "--nsamples", "4"]
    args += ["--seqlen", "16", "--batch-size", "2", "--eval-nsamples", "0", "--device", "cpu", "--output"]

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD)]
    launcher += ["--standalone", "-m", "llmprune"]  # standalone: a local rendezvous on a free port
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two_args = [*map(str, args), tmp_path / "two", *(["--offload"] if streamed else [])]
    ran = subprocess.run([*launcher, *two_args], capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count("saved to") == 1 and "Traceback" not in ran.stderr
    assert ran.stdout.count("streamed from disk") == int(streamed)

    main([*map(str, args), str(tmp_path / "one")])
    two = {k: v for f in (tmp_path / "two").glob("*.safetensors") for k, v in load_file(f).items()}
    one = {k: v for f in (tmp_path / "one").glob("*.safetensors") for k, v in load_file(f).items()}
    assert two.keys() == one.keys()
    for name in one:
        assert torch.equal(two[name] == 0, one[name] == 0), name
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
