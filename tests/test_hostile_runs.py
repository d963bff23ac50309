"""Hostile runs (issue 14, items 4, 11 and 12): training that diverges, options that are not numbers,
damaged metadata and resume checkpoints, a damaged sweep, and Ctrl-C at any moment.

Each must end in one line on stderr with a non-zero exit code (2 for bad input, 130 for Ctrl-C), no
traceback, nothing written that should not be, and what was kept named.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import llmprune
from conftest import ERROR, invoke, save_text, save_tiny_llama
from llmprune.config import RunConfig, build
from llmprune.errors import UsageError
from llmprune.inference.bench import BenchConfig
from llmprune.models.packed import MANIFEST_KEY, SUFFIX
from llmprune.pipeline import resume
from llmprune.storage import METADATA_FILE
from llmprune.sweeps.config import SweepConfig
from llmprune.training.config import FinetuneConfig

INTERRUPTED = "llmprune: interrupted; "


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny dense Llama, the same pruned 2:4 by llmprune (with its llmprune.json), that one compressed,
    and a text file."""
    root = tmp_path_factory.mktemp("hostile-runs")
    dense = save_tiny_llama(root / "dense", tokenizer)
    pruned = root / "pruned"
    options = {"pattern": "2:4", "nsamples": 4, "seqlen": 32, "eval_nsamples": 0}
    llmprune.run(RunConfig(model=str(dense), output=str(pruned), **options))
    compressed = llmprune.compress(pruned, root / "compressed")
    text = save_text(root / "text.txt")
    return {"dense": dense, "pruned": pruned, "compressed": compressed, "text": text}


pytestmark = pytest.mark.usefixtures("in_tmp")


def one_line(result, code: int) -> str:
    """The only non-empty stderr line of a run that exited with ``code``."""
    assert result.code == code, result
    assert "Traceback" not in result.err, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    return lines[0]


def finetune_args(models, output: Path, *extra: str) -> list:
    return [
        "finetune", models["pruned"], "--output", output, "-q",
        "--seqlen", "32", "--batch-size", "1", "--eval-nsamples", "1", "--eval-seqlen", "32", *extra,
    ]  # fmt: skip


def all_finite(directory: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(directory / "model.safetensors").values())


# item 4: a diverging fine-tune ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lr", "problem", "kept"),
    [
        # 1e30 leaves finite (huge) weights after step 1, whose loss at step 2 is NaN
        ("1e30", "diverged at step 2: the loss is nan; the last good checkpoint is {out}-step1", ["step1"]),
        # 1e39 overflows float32: the weights are Inf after step 1, so its checkpoint is never written
        ("1e39", "diverged at step 1: the weights of model.embed_tokens.weight are not finite; no ", []),
    ],
)
def test_diverging_finetune_keeps_only_finite_checkpoints(capsys, models, tmp_path, lr, problem, kept):
    output = tmp_path / "out"
    args = finetune_args(models, output, "--lr", lr, "--warmup", "0", "--steps", "3", "--save-every", "1")
    line = one_line(invoke(capsys, *args), 2)
    assert line.startswith(f"{ERROR}fine-tuning {problem.format(out=output)}"), line
    assert line.endswith("(lower --lr)")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out-{name}" for name in kept]
    for name in kept:
        assert all_finite(tmp_path / f"out-{name}")


def test_finetune_refuses_a_model_with_nan_weights(capsys, models, tmp_path):
    nan = tmp_path / "nan"
    shutil.copytree(models["pruned"], nan)
    weights = load_file(nan / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    args = finetune_args({"pruned": nan}, tmp_path / "out", "--steps", "2")
    line = one_line(invoke(capsys, *args), 2)
    assert line == f"{ERROR}NaN or Inf in the weights of model.layers.1.mlp.up_proj.weight before fine-tuning"
    assert not (tmp_path / "out").exists()


def float_fields() -> list[tuple[type, str]]:
    """Every float option (float or float | None) of every config, found from the annotations: a new one
    is covered as it comes. (Lists of floats: ``sweep --sparsities`` below.)"""
    fields = []
    for config in (RunConfig, FinetuneConfig, SweepConfig, BenchConfig, llmprune.EvalConfig):
        for name, info in config.model_fields.items():
            union = typing.get_origin(info.annotation) in (typing.Union, types.UnionType)
            if info.annotation is float or (union and float in typing.get_args(info.annotation)):
                fields.append((config, name))
    return fields


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", float("nan"), "1e400"])
@pytest.mark.parametrize(("config", "name"), float_fields(), ids=lambda x: getattr(x, "__name__", x))
def test_float_options_must_be_finite(config, name, value):
    with pytest.raises(UsageError, match=f"^{name}: Input should be a finite number$"):
        build(config, {name: value})


@pytest.mark.parametrize(("flag", "value"), [("--lr", "inf"), ("--lr", "nan"), ("--temperature", "inf")])
def test_cli_refuses_non_finite_numbers_before_loading(
    capsys, models, tmp_path, no_model_loading, flag, value
):
    args = finetune_args(models, tmp_path / "o", "--distill", flag, value)
    line = one_line(invoke(capsys, *args), 2)
    assert line == f"{ERROR}{flag[2:]}: Input should be a finite number"


def test_sweep_sparsities_must_be_finite(capsys, no_model_loading):
    line = one_line(invoke(capsys, "sweep", "--sparsities", "0.5,nan"), 2)
    assert line == f"{ERROR}sparsities.1: Input should be a finite number"


# item 11: damaged metadata ----------------------------------------------------------------------------


def first_file(manifest: dict) -> dict:
    return manifest["files"][next(iter(manifest["files"]))]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda m: first_file(m).pop("bytes"), f"manifest entry files.model{SUFFIX} lacks 'bytes'"),
        (lambda m: m.update(files=list(m["files"])), "manifest entry files: Input should be a valid dict"),
        (lambda m: m.pop("files"), "the manifest lacks 'files'"),
        (lambda m: first_file(m).update(bytes="1"), f"model{SUFFIX}.bytes: Input should be a valid int"),
        (lambda m: first_file(m).update(dense_name="../x.safetensors"), "'../x.safetensors' is not a"),
        (lambda m: m["layouts"]["2:4"].pop("tensors"), "manifest entry layouts.2:4 lacks 'tensors'"),
    ],
    ids=["no-bytes", "files-a-list", "no-files", "bytes-a-string", "dense-name-outside", "layout-counts"],
)
def test_damaged_compressed_manifest_is_one_line(capsys, models, tmp_path, damage, problem):
    damaged = tmp_path / "damaged"
    shutil.copytree(models["compressed"], damaged)
    metadata = json.loads((damaged / METADATA_FILE).read_text())
    damage(metadata[MANIFEST_KEY])
    (damaged / METADATA_FILE).write_text(json.dumps(metadata))
    for command in (["decompress", damaged, "--output", tmp_path / "out"], ["inspect", damaged]):
        line = one_line(invoke(capsys, *command), 2)
        assert line.startswith(f"{ERROR}damaged compressed checkpoint {damaged}: "), line
        assert problem in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]
    with pytest.raises(UsageError, match="damaged compressed checkpoint"):
        llmprune.load(damaged)


def test_metadata_that_is_not_an_object(capsys, models, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(models["compressed"], damaged)
    (damaged / METADATA_FILE).write_text("[]")
    line = one_line(invoke(capsys, "decompress", damaged, "--output", tmp_path / "out"), 2)
    assert line == f"{ERROR}{damaged / METADATA_FILE} is damaged: not a JSON object"


def prune_args(models, output: Path, *extra) -> list:
    return [
        "prune", "--model", models["dense"], "--calibration", models["text"], "--nsamples", "2",
        "--seqlen", "16", "--eval-nsamples", "0", "-q", "--output", output, *extra,
    ]  # fmt: skip


def interrupt_after_first_layer(monkeypatch) -> None:
    """Ctrl-C right after decoder layer 0 is checkpointed."""
    save = resume.LayerCheckpoint.save

    def save_then_interrupt(self, index, *args):
        save(self, index, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(resume.LayerCheckpoint, "save", save_then_interrupt)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_key(path: Path, key: str) -> None:
    state = json.loads(path.read_text())
    del state[key]
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda d: truncate(d / "layer-00000.safetensors"), "layer-00000.safetensors: "),
        (lambda d: truncate(d / "hidden-00000.safetensors"), "hidden-00000.safetensors: "),
        (lambda d: (d / "layer-00000.safetensors").unlink(), "layer-00000.safetensors: "),
        (lambda d: (d / resume.STATE_FILE).write_bytes(b"\xff{"), f"{resume.STATE_FILE}: "),
        (lambda d: (d / resume.STATE_FILE).write_text("[1]"), f"{resume.STATE_FILE} is not a JSON object"),
        (lambda d: drop_key(d / resume.STATE_FILE, "hidden"), f"{resume.STATE_FILE} lacks 'hidden'"),
    ],
    ids=["layer-truncated", "hidden-truncated", "layer-missing", "state-not-json", "state-list", "state-key"],
)
def test_damaged_resume_checkpoint_says_so(capsys, models, tmp_path, monkeypatch, damage, problem):
    output = tmp_path / "out"
    checkpoint = tmp_path / ".out.resume"
    with monkeypatch.context() as patch:
        interrupt_after_first_layer(patch)
        line = one_line(invoke(capsys, *prune_args(models, output)), 130)
    assert line == (
        f"{INTERRUPTED}no output was written; 1 finished decoder layer(s) are kept in {checkpoint}: "
        "add --resume to continue"
    )
    damage(checkpoint)
    line = one_line(invoke(capsys, *prune_args(models, output, "--resume")), 2)
    assert line.startswith(f"{ERROR}--resume: the checkpoint in {checkpoint} is damaged ({problem}"), line
    assert line.endswith("; rerun without --resume to start over")
    assert not output.exists()
    assert invoke(capsys, *prune_args(models, output)).code == 0  # as the message says


# item 12: a damaged sweep, and Ctrl-C -----------------------------------------------------------------


@pytest.mark.parametrize("content", [b"{\"config\": ", b"\xff\xfe", b"[1, 2]", b"{\"config\": 3}"])
def test_damaged_sweep_json_is_not_reported_missing(capsys, tmp_path, no_model_loading, content):
    output = tmp_path / "grid"
    (output / "cells").mkdir(parents=True)
    (output / "sweep.json").write_bytes(content)
    line = one_line(invoke(capsys, "sweep", "--output", output), 2)
    assert line.startswith(f"{ERROR}{output / 'sweep.json'} is damaged ("), line
    assert line.endswith(f"delete {output} to start the sweep over, or choose another --output")


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_messages_depend_on_the_command(capsys, models, tmp_path, monkeypatch):
    """Only prune (from its checkpoint) and sweep (skipping finished cells) can continue; compress and
    finetune say nothing of --resume, and finetune names the step checkpoints it kept."""
    import llmprune.export.compressed
    import llmprune.sweeps.runner
    import llmprune.training.finetuning as finetuning

    cases = {}
    with monkeypatch.context() as patch:
        patch.setattr(llmprune.api, "prune_model", interrupt)
        cases["prune"] = invoke(capsys, *prune_args(models, tmp_path / "p"))
    with monkeypatch.context() as patch:
        patch.setattr(llmprune.export.compressed, "compress_weights", interrupt)
        compress = ["compress", models["pruned"], "--output", tmp_path / "c", "--quiet"]
        cases["compress"] = invoke(capsys, *compress)
    with monkeypatch.context() as patch:
        save = finetuning.save_checkpoint

        def save_until_step3(model, tokenizer, output, *args):
            return (interrupt if output.name.endswith("step3") else save)(model, tokenizer, output, *args)

        patch.setattr(finetuning, "save_checkpoint", save_until_step3)
        args = finetune_args(models, tmp_path / "f", "--steps", "5", "--save-every", "1")
        cases["finetune"] = invoke(capsys, *args)
    with monkeypatch.context() as patch:
        patch.setattr(llmprune.sweeps.runner, "prune_model", interrupt)
        sweep = ["sweep", "--model", models["dense"], "--calibration", models["text"], "--nsamples", "2"]
        sweep += ["--seqlen", "16", "--eval-nsamples", "1", "--eval-seqlen", "16", "-q", "--output"]
        sweep.append(tmp_path / "s")
        cases["sweep"] = invoke(capsys, *sweep)
    lines = {command: one_line(result, 130) for command, result in cases.items()}
    assert lines == {
        "prune": f"{INTERRUPTED}no output was written",
        "compress": f"{INTERRUPTED}no output was written",
        "finetune": f"{INTERRUPTED}{tmp_path / 'f'} was not written; kept the step checkpoint(s) "
        f"{tmp_path / 'f-step1'}, {tmp_path / 'f-step2'}",
        "sweep": f"{INTERRUPTED}finished cells are kept in {tmp_path / 's'}: rerun the same command to "
        "continue (it skips them)",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f-step1", "f-step2", "s"]


def test_ctrl_c_during_the_imports_is_one_line(models, tmp_path):
    """A Ctrl-C in the first seconds, while torch and transformers are imported, exits 130 in one line."""
    command = [sys.executable, "-m", "llmprune", *map(str, prune_args(models, tmp_path / "out"))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # As in a terminal: SIGINT at its default even when this run was started with it ignored (a
    # background job of a shell without job control), which the command rightly leaves alone.
    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint
    )
    process = psutil.Process(child.pid)
    started = time.monotonic()
    # Past the interpreter's own start-up (~0.05 s of CPU), well before the imports end (seconds of CPU).
    while sum(process.cpu_times()[:2]) < 0.3 and time.monotonic() - started < 30:
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert err == f"{INTERRUPTED}no output was written\n"
    assert not (tmp_path / "out").exists()


def test_import_llmprune_is_cheap_and_keeps_every_public_name():
    """The package imports its public names on first use (what makes the Ctrl-C above catchable)."""
    code = (
        "import sys, llmprune; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
        "[getattr(llmprune, name) for name in llmprune.__all__]; "
        "from llmprune import prune, sweep, finetune_model, UsageError; "
        "assert llmprune.api.run is llmprune.run and 'torch' in sys.modules; print(len(llmprune.__all__))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=99)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(llmprune.__all__) == 45
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = llmprune.nothing
