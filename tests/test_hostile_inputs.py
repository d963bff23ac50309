"""Hostile but realistic input (issue 14, items 7-10): windows past the model's context, numbers at the
edges, broken recipes, selectors that match nothing, devices this machine lacks.

Each class of failure is one parametrized test through the command line: exit 2, one line on stderr, and
(where the information is there before loading) no model loaded.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

from conftest import invoke, save_text, save_tiny_llama
from llmprune.models.architecture import context_length

GPT2_CONTEXT = 32


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tokenizer) -> dict[str, str]:
    """A tiny Llama (64 positions, RoPE) and a tiny GPT-2 (32 learned positions), both with the embedded
    model's tokenizer, and a calibration text of a few thousand tokens."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    gpt2 = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=32, **ids)
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    text = save_text(root / "text.txt")
    llama = save_tiny_llama(root / "llama", tokenizer)
    return {"llama": str(llama), "gpt2": str(root / "gpt2"), "text": str(text)}


pytestmark = pytest.mark.usefixtures("in_tmp")


def error_of(capsys, *args: str) -> str:
    """The one error line of a command that must fail with exit 2."""
    return invoke(capsys, *args).error_line


def small_run(paths, model: str = "llama") -> list[str]:
    return ["--model", paths[model], "--calibration", paths["text"], "--nsamples", "2", "--seqlen", "16",
            "--eval-data", paths["text"], "--eval-nsamples", "1", "--eval-seqlen", "16"]  # fmt: skip


# ---- 7. windows past the model's context --------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["prune", "{gpt2_run}", "--seqlen", "64"], "--seqlen 64 is longer than the context of {gpt2} (32"),
        (["prune", "{gpt2_run}", "--eval-seqlen", "33"], "--eval-seqlen 33 is longer than the context of"),
        (
            ["prune", "{llama_run}", "--seqlen", "512"],
            "--seqlen 512 is longer than the context of {llama} (64",
        ),
        (
            ["eval", "{gpt2}", "--seqlen", "64"],
            "--seqlen 64 is longer than the context of {gpt2} (32 positions)",
        ),
        (["sweep", "--model", "{gpt2}", "--seqlen", "64"], "--seqlen 64 is longer than the context"),
        (
            ["sweep", "--model", "{gpt2}", "--seqlen", "16", "--eval-seqlen", "64"],
            "--eval-seqlen 64 is longer",
        ),
        (["finetune", "{gpt2}", "--seqlen", "64"], "--seqlen 64 is longer than the context of {gpt2}"),
        (["finetune", "{gpt2}", "--seqlen", "16", "--eval-seqlen", "40"], "--eval-seqlen 40 is longer"),
        (["bench", "{gpt2}", "--prompt-len", "40"], "--prompt-len 40 is longer than the context of {gpt2}"),
        (["bench", "{gpt2}", "--prompt-len", "30", "--new-tokens", "3"], "(33 tokens) is longer than"),
    ],
)
def test_a_window_past_the_context_is_refused_before_loading(
    capsys, paths, no_model_loading, command, message
):
    args = []
    for arg in command:
        if arg in ("{gpt2_run}", "{llama_run}"):
            args += small_run(paths, arg.strip("{}").removesuffix("_run"))
        else:
            args.append(arg.format(**paths))
    assert message.format(**paths) in error_of(capsys, *args)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (GPT2Config(n_positions=GPT2_CONTEXT), GPT2_CONTEXT),
        (LlamaConfig(max_position_embeddings=128), 128),
        (OPTConfig(max_position_embeddings=2048), 2048),
        (object(), None),
    ],
)
def test_context_length_reads_every_family(config, expected):
    assert context_length(config) == expected


def test_a_window_of_exactly_the_context_runs(capsys, paths, tmp_path):
    args = ["eval", paths["gpt2"], "--data", paths["text"], "--nsamples", "1", "--seqlen", str(GPT2_CONTEXT)]
    result = invoke(capsys, *args)
    assert result.code == 0, result.err


# ---- 8. numbers at the edges --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            ["prune", "--nsamples", "99999999999999999999"],
            "nsamples: Input should be less than or equal to 2147483647",
        ),
        (
            ["prune", "--seed", "99999999999999999999999"],
            "seed: Input should be less than or equal to 18446744073709551615",
        ),
        (["prune", "--seed", "-1"], "seed: Input should be greater than or equal to 0"),
        (["prune", "--method", "sparsegpt", "--damp", "inf"], "damp: Input should be a finite number"),
        (["prune", "--sparsity", "nan"], "sparsity: Input should be a finite number"),
        (
            ["prune", "--schedule", "depth", "--schedule-spread", "nan"],
            "schedule_spread: Input should be a finite",
        ),
        (
            ["prune", "--layer-sparsity", "mlp=nan"],
            "sparsity for 'mlp' must be a number in [0, 1), got 'nan'",
        ),
        (["prune", "--nsamples", "100000"], "--nsamples 100000 is more than the"),
        (["prune", "--nsamples", "2000000000"], "of activations (a decoder layer's inputs and outputs)"),
        (
            ["sweep", "--model", "{llama}", "--nsamples", "2000000000", "--seqlen", "16", "--eval-seqlen",
             "16"],
            "GiB of activations",
        ),
        (
            ["eval", "{llama}", "--nsamples", "99999999999999999999"],
            "nsamples: Input should be less than or equal",
        ),
        (
            ["sweep", "--model", "{llama}", "--sparsities", "0.5,nan"],
            "sparsities.1: Input should be a finite number",
        ),
        (["sweep", "--model", "{llama}", "--seed", "1e400"], "seed: Input should be a valid integer"),
        (["finetune", "{llama}", "--lr", "inf"], "lr: Input should be a finite number"),
        (["finetune", "{llama}", "--steps", "99999999999"], "steps: Input should be less than or equal to"),
        (
            ["finetune", "{llama}", "--steps", "2000000000", "--seqlen", "32", "--eval-nsamples", "0"],
            "8,000,000,000 windows of 32 tokens take 1,907.3 GiB as token ids alone, more than half the free",
        ),
        (
            ["bench", "{llama}", "--seed", "99999999999999999999999"],
            "seed: Input should be less than or equal",
        ),
    ],
)
def test_numbers_at_the_edges_are_refused_before_loading(capsys, paths, no_model_loading, command, message):
    args = [arg.format(**paths) for arg in command]
    if args[0] == "prune":
        args += ["--model", paths["llama"], "--calibration", paths["text"], "--seqlen", "16"]
        args += ["--eval-nsamples", "0"]
    assert message in error_of(capsys, *args)


# ---- 9. recipes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "recipe", "message"),
    [
        ("prune", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not UTF-8 text"),
        (
            "prune", b"layer-sparsity: {mlp: [1, 2]}\n",
            "sparsity for 'mlp' must be a number in [0, 1), got [1, 2]",
        ),
        ("prune", b"layer-sparsity: 5\n", "layer_sparsity: expected REGEX=SPARSITY items or a mapping"),
        ("prune", b"method: wanda\nmethod: sparsegpt\n", "'method' is given twice (line 2, column 1)"),
        ("prune", b"layer-sparsity: {mlp: 0.2, mlp: 0.3}\n", "'mlp' is given twice"),
        ("prune", b"true-sequential: true\ntrue_sequential: false\n", "true_sequential is given twice"),
        ("prune", b"exclude: {a: 1}\n", "exclude: expected a list of strings or a comma-separated string"),
        ("prune", b"include: [1, 2]\n", "include: expected a list of strings"),
        ("sweep", b"methods: {wanda: 1}\n", "methods: expected a list or a comma-separated string"),
        ("finetune", b"seed: 1\nseed: 2\n", "'seed' is given twice"),
    ],
)
def test_a_broken_recipe_is_one_line(capsys, paths, tmp_path, no_model_loading, command, recipe, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(recipe)
    model = ["--model", paths["llama"]] if command != "finetune" else [paths["llama"]]
    assert message in error_of(capsys, command, *model, "--recipe", str(path))


# ---- 9. selectors that match nothing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layer-sparsity", "nonexistent=0.9"], "--layer-sparsity 'nonexistent' matches no linear layer"),
        (
            ["--include", "*.q_proj", "--include", "*.nothing"],
            "--include '*.nothing' matches no linear layer",
        ),
        (
            ["--exclude", "*.o_prj"],
            "--exclude '*.o_prj' matches no linear layer (their names look like model.",
        ),
        (["--include", "*.mlp.*", "--exclude", "*_proj"], "no linear layer matches --include/--exclude"),
        (["--exclude", "*.mlp.*", "--layer-sparsity", "mlp=0.7"], "--layer-sparsity 'mlp' sets no layer"),
        (["--layer-sparsity", "proj=0.3", "--layer-sparsity", "q_proj=0.7"], "'q_proj' sets no layer"),
    ],
)
def test_a_selector_matching_nothing_is_refused_before_loading(
    capsys, paths, no_model_loading, flags, message
):
    assert message in error_of(capsys, "prune", *small_run(paths), *flags)


def test_a_sweep_selector_matching_nothing_is_refused_before_loading(capsys, paths, no_model_loading):
    args = ["--model", paths["llama"], "--seqlen", "16", "--eval-seqlen", "16", "--include", "*.nothing"]
    line = error_of(capsys, "sweep", *args)
    assert "--include '*.nothing' matches no linear layer" in line


# ---- 10. devices this machine does not have -----------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "cuda", "cuda:1"])
@pytest.mark.parametrize("command", ["prune", "eval", "bench", "finetune", "sweep"])
def test_a_missing_device_is_refused_before_loading(
    capsys, paths, monkeypatch, no_model_loading, command, device
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    model = [paths["llama"]] if command in ("eval", "bench", "finetune") else ["--model", paths["llama"]]
    kind = device.split(":")[0].upper()
    line = error_of(capsys, command, *model, "--device", device)
    assert line.endswith(f"--device {device} requested but this machine has no {kind} device")


def test_a_device_index_past_the_last_gpu_is_refused(capsys, paths, monkeypatch, no_model_loading):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = error_of(capsys, "prune", "--model", paths["llama"], "--device", "cuda:1")
    assert line.endswith("--device cuda:1 requested but this machine has 1 CUDA device(s)")
