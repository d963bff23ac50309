"""Resuming an interrupted run from its last finished decoder layer: the result is bit-identical to a run
that never stopped, whether it was stopped by an exception, a crash while checkpointing, or SIGKILL; other
options or a missing checkpoint are refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmprune
from conftest import ERROR, save_text, save_tiny_llama, tiny_calibration, tiny_model
from conftest import invoke as invoke_cli
from llmprune.config import PruneOptions, RunConfig, build
from llmprune.pipeline import resume
from llmprune.pipeline.resume import STATE_FILE, LayerCheckpoint
from llmprune.pruning import prune_model
from llmprune.storage import METADATA_FILE

LAYERS = 8


class Crash(Exception):
    pass


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    other = dict(second.named_parameters())
    for name, param in first.named_parameters():
        assert torch.equal(param, other[name]), f"{name} differs from the uninterrupted run"


# --- in process: the driver with a checkpoint ------------------------------------------------------------


def run_with_checkpoint(
    checkpoint: LayerCheckpoint | None, options: PruneOptions, stop_after: int | None = None
):
    """Prune a fresh tiny Llama (3 layers); raise Crash once layer ``stop_after`` is done."""
    model, calls = tiny_model("llama"), []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if stop_after is not None and done == stop_after + 1:
            raise Crash

    report = prune_model(model, tiny_calibration(), options, progress, checkpoint)
    return model, report, calls


@pytest.mark.parametrize(
    "options",
    [
        {"method": "wanda"},
        {"method": "sparsegpt"},
        {"method": "sparsegpt", "pattern": "2:4", "true_sequential": True, "batch_size": 3},
        {"method": "magnitude", "schedule": "depth"},
        {"method": "wanda", "schedule": "owl", "refine": "swaps,resolve", "reconstruct": "dense"},
        {"method": "sparsegpt", "pattern": "2:4", "refine": "resolve", "reconstruct": "sublayer"},
    ],
    ids=[
        "wanda",
        "sparsegpt",
        "sparsegpt-2:4-true-sequential",
        "magnitude-depth",
        "wanda-owl-all",
        "2:4-refined",
    ],
)
@pytest.mark.parametrize("stop_after", [0, 1, 2])
def test_resumed_run_is_bit_identical(tmp_path, options, stop_after):
    options = build(PruneOptions, options)
    expected, expected_report, _ = run_with_checkpoint(None, options)

    checkpoint = LayerCheckpoint(tmp_path / "b", {})
    with pytest.raises(Crash):
        run_with_checkpoint(checkpoint, options, stop_after)
    assert json.loads(checkpoint.state_path.read_text())["next_layer"] == stop_after + 1
    resumed, report, calls = run_with_checkpoint(checkpoint, options)

    assert calls[0] == stop_after + 1  # the finished layers were not pruned again
    same_weights(resumed, expected)
    assert [asdict(r) for r in report.layers] == [asdict(r) for r in expected_report.layers]
    assert [asdict(b) for b in report.blocks] == [asdict(b) for b in expected_report.blocks]
    # one hidden-state file at a time, one weight file per layer
    assert sorted(p.name for p in checkpoint.directory.iterdir()) == [
        "hidden-00002.safetensors",
        "layer-00000.safetensors",
        "layer-00001.safetensors",
        "layer-00002.safetensors",
        STATE_FILE,
    ]


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    options = build(PruneOptions, {"method": "sparsegpt"})
    expected, _, _ = run_with_checkpoint(None, options)
    checkpoint = LayerCheckpoint(tmp_path / "b", {})
    save_file = resume.save_file

    def crash_midway(tensors, filename):
        if "hidden-00001" in filename:
            Path(filename).write_bytes(b"half a file")
            raise Crash
        save_file(tensors, filename)

    with monkeypatch.context() as patch:
        patch.setattr(resume, "save_file", crash_midway)
        with pytest.raises(Crash):
            run_with_checkpoint(checkpoint, options)
    state = json.loads(checkpoint.state_path.read_text())
    assert state["next_layer"] == 1 and state["hidden"] == "hidden-00000.safetensors"
    resumed, _, calls = run_with_checkpoint(checkpoint, options)
    assert calls[0] == 1
    same_weights(resumed, expected)


def test_the_recipe_leaves_out_output_and_evaluation():
    first = RunConfig(output="a", overwrite=True, resume=True, eval_nsamples=0, eval_seqlen=64)
    second = RunConfig(output="b", eval_data="other.txt")
    assert first.pruning_recipe() == second.pruning_recipe()
    assert "resume" not in first.pruning_recipe() and "method" in first.pruning_recipe()
    assert RunConfig(method="sparsegpt").pruning_recipe() != second.pruning_recipe()
    assert RunConfig(sparsity=0.5).pruning_recipe() == second.pruning_recipe()
    assert RunConfig(sparsity=0.6).pruning_recipe() != second.pruning_recipe()


# --- the command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """An 8-layer tiny Llama with the embedded model's tokenizer, and calibration text."""
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_llama(root / "model", tokenizer, layers=LAYERS)
    return {"model": model, "text": save_text(root / "text.txt")}


def prune_args(files, output: Path, *extra: str) -> list[str]:
    return [
        "prune",
        *("--model", str(files["model"]), "--calibration", str(files["text"])),
        *("--nsamples", "4", "--seqlen", "16", "--eval-nsamples", "0", "--output", str(output)),
        *extra,
    ]


def invoke(capsys, *args: str) -> tuple[int, str]:
    """Run ``llmprune ARGS`` in this process; returns the exit code and stderr."""
    result = invoke_cli(capsys, *args)
    return result.code, result.err


def error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(ERROR), err
    return lines[0]


def checkpoint_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.resume")


def test_resume_without_a_checkpoint(capsys, files, tmp_path, monkeypatch):
    monkeypatch.setattr(llmprune.api, "load_plain_model", lambda *a, **k: pytest.fail("model loaded"))
    output = tmp_path / "out"
    line = error_line(*invoke(capsys, *prune_args(files, output, "--resume")))
    assert line == f"{ERROR}--resume: no checkpoint to resume from in {checkpoint_dir(output)}"


def test_resume_with_other_options_is_refused(capsys, files, tmp_path, monkeypatch):
    output = tmp_path / "out"
    save = LayerCheckpoint.save

    def interrupt_after_one_layer(self, *args):
        save(self, *args)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(LayerCheckpoint, "save", interrupt_after_one_layer)
        code, _ = invoke(capsys, *prune_args(files, output))
    assert code == 130 and not output.exists()
    assert json.loads((checkpoint_dir(output) / STATE_FILE).read_text())["next_layer"] == 1

    with monkeypatch.context() as patch:
        patch.setattr(llmprune.api, "load_plain_model", lambda *a, **k: pytest.fail("model loaded"))
        line = error_line(*invoke(capsys, *prune_args(files, output, "--resume", "--method", "sparsegpt")))
        assert "method: wanda → sparsegpt" in line and "drop --resume" in line
        line = error_line(*invoke(capsys, *prune_args(files, output, "--resume", "--sparsity", "0.6")))
        assert "sparsity: 0.5 → 0.6" in line

    # Evaluation options are not part of the recipe; the checkpoint goes once the output is saved.
    evaluated = ("--eval-nsamples", "1", "--eval-seqlen", "16")
    code, err = invoke(capsys, *prune_args(files, output, "--resume", *evaluated))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_run_without_resume_starts_over_and_removes_its_checkpoint(capsys, files, tmp_path):
    output = tmp_path / "out"
    stale = checkpoint_dir(output)
    stale.mkdir()
    (stale / STATE_FILE).write_text('{"fingerprint": "an earlier run"}')
    code, err = invoke(capsys, *prune_args(files, output))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_leaves_no_checkpoint(capsys, files, tmp_path, monkeypatch):
    from llmprune.errors import NonFiniteError
    from llmprune.pipeline import walk

    check_finite = walk.check_finite

    def fail_at_layer_two(tensor, what):
        if what.endswith("layer 2"):
            raise NonFiniteError(f"NaN or Inf in {what}")
        check_finite(tensor, what)

    monkeypatch.setattr(walk, "check_finite", fail_at_layer_two)
    code, err = invoke(capsys, *prune_args(files, tmp_path / "out"))
    assert code == 2 and "decoder layer 2" in err
    assert list(tmp_path.iterdir()) == []


# --- a real SIGKILL --------------------------------------------------------------------------------------

HARNESS = """
import sys, time
import torch
from llmprune.pipeline import walk

torch.set_num_threads(1)
delay = float(sys.argv[1])
if delay:
    run_layer = walk.run_layer

    def slow_run_layer(*args, **kwargs):
        time.sleep(delay)
        return run_layer(*args, **kwargs)

    walk.run_layer = slow_run_layer
from llmprune.cli.main import main

main(sys.argv[2:])
"""


def start(harness: Path, delay: float, args: list[str]) -> subprocess.Popen:
    source = str(Path(llmprune.__file__).parents[1])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(harness), str(delay), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in directory.glob("*.safetensors") for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "offload"])
def test_sigkill_then_resume_is_bit_identical(capsys, files, tmp_path, streamed):
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    expected, output = tmp_path / "expected", tmp_path / "out"
    assert torch.get_num_threads() == 1  # as in the harness
    code, err = invoke(capsys, *prune_args(files, expected))  # in this process: one start-up less
    assert code == 0, err

    state = checkpoint_dir(output) / STATE_FILE
    mode = ["--offload"] if streamed else []
    process = start(harness, 0.2, prune_args(files, output, *mode))
    deadline = time.monotonic() + 240
    try:
        while not (state.is_file() and json.loads(state.read_text())["next_layer"] >= 3):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed_at = json.loads(state.read_text())["next_layer"]
    assert 3 <= killed_at < LAYERS and not output.exists()

    finish(start(harness, 0, [*prune_args(files, output, *mode), "--resume"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected", "harness.py", "out"]  # nothing stale
    weights, reference = all_tensors(output), all_tensors(expected)
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), f"{name} differs from the uninterrupted run"
    report = json.loads((output / METADATA_FILE).read_text())["report"]["layers"]
    assert report == json.loads((expected / METADATA_FILE).read_text())["report"]["layers"]
    assert len(report) == 7 * LAYERS
