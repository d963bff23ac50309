"""Pruning across processes: gloo processes on CPU end with the single process's weights, bit for bit.

The calibration batches are formed before they are shared among processes (whole batches per process), so
every batch holds the same samples for any number of processes, and the per-batch statistics are added in
float64, where the order of the additions does not change the sum. With the same threads per process (one
here, as torchrun gives each worker), 1, 2 and 3 processes (an uneven share of batches) must give the very
same weights and report: compared with ``torch.equal``, on the tiny model and on the embedded one.
"""

from __future__ import annotations

import hashlib
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
from conftest import save_text, save_tiny_llama, tiny_calibration, tiny_model
from llmprune.api import run
from llmprune.cli.main import main
from llmprune.config import PruneOptions, RunConfig, build
from llmprune.errors import UsageError
from llmprune.pipeline.distributed import Communicator, TorchDistributed, communicator_from_environment
from llmprune.pipeline.statistics import InputStatistics
from llmprune.pruning import prune_model

CASES = [("wanda", False), ("wanda", True), ("sparsegpt", False), ("sparsegpt", True)]
# The embedded model runs the two cases that share no code path (each statistic, each walk); the tiny
# model runs all four.
EMBEDDED_CASES = [("wanda", False), ("sparsegpt", True)]
# Beyond the reference methods: OWL's scoring pass, refinement by each group's owner, reconstruction's
# gradients summed over processes.
BEYOND = {
    "owl-swaps-resolve-layer": {"schedule": "owl", "refine": "swaps,resolve", "reconstruct": "layer"},
    "2:4-dense": {"method": "sparsegpt", "pattern": "2:4", "refine": "resolve", "reconstruct": "dense"},
}
WORLDS = (2, 3)
# 8 samples in batches of 2: 4 batches, shared 2 + 2 by two processes and 1 + 1 + 2 by three.
NSAMPLES, BATCH_SIZE = 8, 2


def decoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name.startswith("model.layers.") and isinstance(module, nn.Linear)
    }


def prune_tiny(
    method: str, true_sequential: bool, comm: Communicator | None = None, **extra
) -> tuple[dict, dict]:
    """Prune a tiny Llama; its decoder weights and the report's layer rows."""
    model = tiny_model("llama")
    # Errors are measured on every 5th token, which each process picks from its global token offset.
    values = {"method": method, "true_sequential": true_sequential, "batch_size": BATCH_SIZE, **extra}
    options = build(PruneOptions, {**values, "error_tokens": 48})
    report = prune_model(model, tiny_calibration(nsamples=NSAMPLES), options, comm=comm)
    return decoder_weights(model), {"rows": report.to_dict()["layers"], "blocks": report.to_dict()["blocks"]}


def prune_beyond(case: str, comm: Communicator | None = None) -> tuple[dict, dict]:
    options = {"method": "wanda", **BEYOND[case], "reconstruct_lr": 1e-3}
    return prune_tiny(options.pop("method"), False, comm, **options)


def _join(rank: int, world: int, init_file: str) -> Communicator:
    """One thread per process (as torchrun's workers); a process group unless alone."""
    torch.set_num_threads(1)
    if world == 1:
        return Communicator()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comm = communicator_from_environment(torch.device("cpu"))  # wraps the group set up above
    assert isinstance(comm, TorchDistributed) and (comm.rank, comm.world_size) == (rank, world)
    return comm


def _spawn(worker, world: int, root: Path) -> list:
    """Run ``worker(rank, world, init_file, out_dir)`` in ``world`` processes; the results of each rank."""
    out = root / f"world{world}"
    out.mkdir()
    mp.spawn(worker, args=(world, str(out / "init"), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


def _tiny_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    comm = _join(rank, world, init_file)
    try:
        results = {case: prune_tiny(*case, comm=comm) for case in CASES}
        results.update({case: prune_beyond(case, comm) for case in BEYOND})
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        comm.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict[int, list[dict]]:
    root = tmp_path_factory.mktemp("distributed")
    return {world: _spawn(_tiny_worker, world, root) for world in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(("method", "true_sequential"), CASES)
def test_processes_match_one_bit_for_bit(distributed_results, world, method, true_sequential):
    expected_weights, expected_rows = prune_tiny(method, true_sequential)  # one thread (conftest)
    for results in distributed_results[world]:  # every process holds the very same weights and report
        weights, rows = results[(method, true_sequential)]
        assert weights.keys() == expected_weights.keys()
        different = [name for name, want in expected_weights.items() if not torch.equal(weights[name], want)]
        assert not different, f"{len(different)} of {len(weights)} weights differ, first {different[0]}"
        assert rows == expected_rows


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", sorted(BEYOND))
def test_processes_match_one_with_owl_refinement_and_reconstruction(distributed_results, world, case):
    expected_weights, expected = prune_beyond(case)
    assert expected["blocks"] and all(row["refined_to"] is not None for row in expected["rows"])
    for results in distributed_results[world]:
        weights, got = results[case]
        for name, want in expected_weights.items():
            assert torch.equal(weights[name] == 0, want == 0), name  # the same masks
            torch.testing.assert_close(weights[name], want, rtol=1e-4, atol=1e-6)
        assert [row["name"] for row in got["rows"]] == [row["name"] for row in expected["rows"]]
        for row, want in zip(got["rows"], expected["rows"], strict=True):
            assert row["refined_to"] == pytest.approx(want["refined_to"], rel=1e-4)
        for block, want in zip(got["blocks"], expected["blocks"], strict=True):
            assert block["error_after"] == pytest.approx(want["error_after"], rel=1e-4)


def _digests(model: nn.Module) -> dict[str, str]:
    weights = decoder_weights(model)
    return {name: hashlib.sha256(weight.numpy().tobytes()).hexdigest() for name, weight in weights.items()}


def _embedded_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    comm = _join(rank, world, init_file)
    try:
        model, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        calibration = llmprune.calibration_data(tokenizer, "embedded", nsamples=NSAMPLES, seqlen=64, seed=0)
        results = {}
        for method, true_sequential in EMBEDDED_CASES:
            model.load_state_dict(dense)
            values = {"method": method, "true_sequential": true_sequential, "batch_size": BATCH_SIZE}
            report = prune_model(model, calibration, build(PruneOptions, values), comm=comm)
            results[(method, true_sequential)] = _digests(model), report.to_dict()["layers"]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        comm.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_embedded_model_is_bit_identical_on_one_two_and_three_processes(tmp_path):
    """SmolLM2-135M (30 layers, where SparseGPT amplifies any rounding difference layer after layer): every
    decoder weight of 2 and 3 processes equals one process's, for Wanda and true-sequential SparseGPT."""
    (expected,) = _spawn(_embedded_worker, 1, tmp_path)  # one process, one thread
    for world in WORLDS:
        for rank, results in enumerate(_spawn(_embedded_worker, world, tmp_path)):
            for case, (digests, rows) in results.items():
                want, want_rows = expected[case]
                different = [name for name in want if digests[name] != want[name]]
                assert not different, f"{world} processes, rank {rank}, {case}: {len(different)} differ"
                assert rows == want_rows, f"{world} processes, rank {rank}, {case}: the reports differ"


class _Three(Communicator):
    world_size = 3


def test_whole_batches_are_shared_contiguously():
    shares = []
    for rank in range(3):
        comm = _Three()
        comm.rank = rank
        shares.append(comm.share(7, 14))
    assert [(s.start, s.stop) for s in shares] == [(0, 2), (2, 4), (4, 7)]
    assert Communicator().share(5, 9) == slice(0, 5)


@pytest.mark.parametrize("statistic", ["input_norms", "hessian"])
def test_statistics_do_not_depend_on_how_batches_are_split(statistic):
    """Batches fed to one accumulator, or to two whose totals are then added (what all-reduce does), give
    the same fp32 statistic to the bit, also for values spread over many orders of magnitude."""
    generator = torch.Generator().manual_seed(3)
    scales = 10.0 ** torch.randint(-3, 4, (300,), generator=generator)  # per feature
    batches = [torch.randn(40, 300, generator=generator) * scales for _ in range(5)]
    cpu = torch.device("cpu")
    whole = InputStatistics(300, statistic, 7, cpu)
    for batch in batches:
        whole.update(batch)
    for split in (1, 2, 4):
        first, second = InputStatistics(300, statistic, 7, cpu), InputStatistics(300, statistic, 7, cpu)
        for batch in batches[:split]:
            first.update(batch)
        for batch in batches[split:]:
            second.update(batch)
        for mine, other in ((first.sq_norms, second.sq_norms), (first.sums, second.sums)):
            if mine is not None:
                mine += other
        if first.gram is not None:
            first.gram.buffer += second.gram.buffer
        first.tokens += second.tokens
        assert torch.equal(first.statistic(), whole.statistic()), f"split after batch {split}"


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
    options = build(PruneOptions, {"method": "wanda"})
    with pytest.raises(UsageError, match=r"^3 processes need at least as many calibration samples, got 2$"):
        prune_model(tiny_model("llama"), tiny_calibration(nsamples=2), options, comm=_Three())


def test_more_processes_than_batches_is_a_usage_error():
    """Each process needs a whole batch: the error says which batch size gives every process one."""
    options = build(PruneOptions, {"method": "wanda", "batch_size": 4})
    message = r"^3 processes need at least as many calibration batches, got 2 from 8 samples: "
    with pytest.raises(UsageError, match=message + "use --batch-size 2 or smaller$"):
        prune_model(tiny_model("llama"), tiny_calibration(nsamples=8), options, comm=_Three())


def test_too_few_batches_for_the_processes_is_refused_before_loading(tmp_path):
    """``llmprune prune`` checks it from the options alone: the model named here does not even exist."""
    config = build(RunConfig, {"model": str(tmp_path / "no-such-model"), "nsamples": 8, "batch_size": 4})
    with pytest.raises(UsageError, match=r"^3 processes need at least as many calibration batches, got 2 "):
        run(config, comm=_Three())


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "offload"])
def test_torchrun_cli_saves_once_what_one_process_saves(tmp_path, capsys, tokenizer, streamed):
    """``torchrun -m llmprune prune``: rank 0 alone prints and saves the single process's result, also
    when every process streams the layers from disk (``--offload``) and rank 0 writes the shards."""
    model = save_tiny_llama(tmp_path / "tiny", tokenizer)
    text = save_text(tmp_path / "text.txt")
    args = ["prune", "--model", model, "--calibration", text, "--method", "sparsegpt", "--nsamples", "4"]
    args += ["--seqlen", "16", "--batch-size", "2", "--eval-nsamples", "0", "--device", "cpu", "--output"]

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--standalone", "-m", "llmprune"]  # standalone: a local rendezvous on a free port
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two_args = [*map(str, args), tmp_path / "two", *(["--offload"] if streamed else [])]
    ran = subprocess.run([*launcher, *two_args], capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count("saved to") == 1 and "Traceback" not in ran.stderr
    assert ran.stdout.count("streamed from disk") == int(streamed)

    main([*map(str, args), str(tmp_path / "one")])  # one thread, as each torchrun worker (conftest)
    two = {k: v for f in (tmp_path / "two").glob("*.safetensors") for k, v in load_file(f).items()}
    one = {k: v for f in (tmp_path / "one").glob("*.safetensors") for k, v in load_file(f).items()}
    assert two.keys() == one.keys()
    assert all(torch.equal(two[name], one[name]) for name in one)
