"""The ``llmprune`` command line on a tiny Llama with the embedded model's real tokenizer.

Bad input must give one line on stderr and exit code 2, without a traceback, and before the model is loaded
wherever that is possible; a good run writes a complete checkpoint atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmprune
from conftest import ERROR, invoke, prune_args, save_text, save_tiny_llama
from llmprune.config import EvalConfig, RunConfig
from llmprune.models import loading
from llmprune.storage import METADATA_FILE


@pytest.fixture(scope="session")
def files(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    text = save_text(root / "text.txt")
    short = root / "short.txt"
    short.write_text("only a few words", encoding="utf-8")
    return {
        "model": save_tiny_llama(root / "tiny-llama", tokenizer),
        "nan_model": save_tiny_llama(root / "nan-llama", tokenizer, nan_in="model.layers.1.mlp.up_proj"),
        "text": text,
        "short": short,
    }


pytestmark = pytest.mark.usefixtures("in_tmp")


BAD_PRUNE_FLAGS = [
    (["--sparsity", "1.0"], "sparsity: Input should be less than 1"),
    (["--sparsity", "-0.1"], "sparsity: Input should be greater than or equal to 0"),
    (["--sparsity", "abc"], "sparsity: Input should be a valid number"),
    (["--pattern", "4:4"], "pattern: N:M pattern needs 0 < N < M, got 4:4"),
    (["--pattern", "6:4"], "0 < N < M"),
    (["--pattern", "0:4"], "0 < N < M"),
    (["--pattern", "2-4"], "pattern must be 'unstructured', 'structured' or 'N:M'"),
    (["--method", "foo"], "Invalid value for '--method': 'foo' is not one of"),
    (["--dtype", "float64"], "--dtype"),
    (["--bogus"], "No such option '--bogus'"),
    (["--sparsit", "0.5"], "Did you mean"),
    (["--nsamples"], "'--nsamples' requires an argument"),
    (["--nsamples", "0"], "nsamples: Input should be greater than or equal to 1"),
    (["--device", "gpu"], "device must be auto, cpu, mps, cuda or cuda:N"),
    (["--pattern", "2:4", "--sparsity", "0.6"], "pattern 2:4 fixes sparsity at 0.5; drop --sparsity 0.6"),
    (["--pattern", "2:4", "--schedule", "depth"], "unstructured pruning only"),
    (["--layer-sparsity", "q_proj"], "expected REGEX=SPARSITY"),
    (["--recipe", "nothere.yaml"], "recipe not found: nothere.yaml"),
    (["--model", "./nope"], "model path not found: ./nope"),
    (["--model", "/abs/nope"], "model path not found: /abs/nope"),
    (["--model", "x.gguf"], "model file not found: x.gguf"),
    (["--model", "/" + "very-long-directory-name/" * 8 + "nope"], "model path not found"),
    (["--calibration", "missing.txt"], "data source 'missing.txt' is neither a text file"),
    (["--eval-data", "missing.txt"], "data source 'missing.txt'"),
    (["--pattern", "3:7"], "model.layers.0.self_attn.q_proj: input width 32 is not divisible by M=7"),
    (["--include", "*.nothing"], "--include '*.nothing' matches no linear layer"),
]


@pytest.mark.parametrize(
    ("flags", "message"), BAD_PRUNE_FLAGS, ids=[" ".join(f)[:40] for f, _ in BAD_PRUNE_FLAGS]
)
def test_bad_input_is_one_line_before_loading(capsys, files, no_model_loading, flags, message):
    line = invoke(capsys, *prune_args(files, *flags)).error_line
    assert message in line


def test_calibration_shorter_than_a_window(capsys, files, no_model_loading):
    result = invoke(capsys, *prune_args(files, "--calibration", files["short"]))
    assert re.search(r"calibration text has \d+ tokens, shorter than one window of 16", result.error_line)


def test_model_path_that_is_a_file(capsys, files, no_model_loading):
    assert "is a file" in invoke(capsys, *prune_args(files, "--model", files["text"])).error_line


def test_existing_output_needs_overwrite(capsys, files, tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / METADATA_FILE).write_text("{}")  # an earlier llmprune output (others: test_hostile_outputs.py)
    (output / "stale.txt").write_text("from an earlier run")
    with monkeypatch.context() as patch:
        patch.setattr(llmprune.api, "load_plain_model", lambda *a, **k: pytest.fail("model loaded"))
        line = invoke(capsys, *prune_args(files, "--output", output)).error_line
    assert line == f"{ERROR}output {output} exists; pass --overwrite or choose another --output"
    result = invoke(capsys, *prune_args(files, "--output", output, "--overwrite", "--eval-nsamples", "0"))
    assert result.code == 0, result.err
    assert not (output / "stale.txt").exists()
    assert (output / METADATA_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_nan_weight_names_the_layer(capsys, files, tmp_path):
    output = tmp_path / "out"
    result = invoke(capsys, *prune_args(files, "--model", files["nan_model"], "--output", output))
    assert result.code == 2
    assert "Traceback" not in result.err
    last = result.err.strip().splitlines()[-1]
    assert last.startswith(ERROR) and "NaN or Inf" in last and "model.layers.1.mlp.up_proj" in last
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_json_prints_the_run_record_and_quiet_drops_the_table(capsys, files, tmp_path):
    result = invoke(capsys, *prune_args(files, "--output", tmp_path / "a", "--json"))
    assert result.code == 0, result.err
    record = json.loads(result.out)  # stdout is the JSON and nothing else
    assert record["output"] == str(tmp_path / "a")
    assert record == {**json.loads((tmp_path / "a" / METADATA_FILE).read_text()), **record}
    assert len(record["report"]["layers"]) == 14
    assert "pruning decoder layers" not in result.err  # no progress bar either

    quiet = invoke(capsys, *prune_args(files, "--output", tmp_path / "b", "--quiet"))
    assert quiet.code == 0, quiet.err
    assert "per-layer result" not in quiet.out and "pruning decoder layers" not in quiet.err
    assert f"saved to {tmp_path / 'b'}" in quiet.out
    loud = invoke(capsys, *prune_args(files, "--output", tmp_path / "c"))
    assert "per-layer result" in loud.out and "pruning decoder layers" in loud.err


def test_full_run_writes_a_loadable_checkpoint(capsys, files, tmp_path):
    output = tmp_path / "out"
    result = invoke(capsys, *prune_args(files, "--output", output))
    assert result.code == 0, result.err
    assert f"saved to {output}" in result.out
    assert re.search(r"perplexity \(.*, 2×16\): dense [\d.]+ → pruned [\d.]+", result.out)
    assert "achieved sparsity 50.00% over 14 linear layers" in result.out
    assert "Traceback" not in result.err

    names = {p.name for p in output.iterdir()}
    assert {"config.json", METADATA_FILE, "tokenizer.json", "tokenizer_config.json"} <= names
    assert any(name.endswith(".safetensors") for name in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left behind

    metadata = json.loads((output / METADATA_FILE).read_text())
    assert metadata["recipe"]["method"] == "wanda"
    assert metadata["recipe"]["model"] == str(files["model"])
    assert metadata["calibration"] == {"source": str(files["text"]), "nsamples": 4, "seqlen": 16, "seed": 0}
    assert set(metadata["versions"]) >= {"llmprune", "torch", "transformers", "python"}
    perplexity = metadata["perplexity"]
    assert perplexity["windows"] == 2 and perplexity["seqlen"] == 16
    assert math.isfinite(perplexity["dense"]) and math.isfinite(perplexity["pruned"])
    layers = metadata["report"]["layers"]
    assert len(layers) == 14
    assert all(layer["achieved_sparsity"] == pytest.approx(0.5) for layer in layers)

    model = AutoModelForCausalLM.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)
    weight = model.model.layers[0].mlp.gate_proj.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5)

    evaluated = invoke(capsys, "eval", output, "--data", files["text"], "--nsamples", "2", "--seqlen", "16")
    assert evaluated.code == 0, evaluated.err
    value = float(re.search(r"perplexity ([\d.]+) on ", evaluated.out).group(1))
    assert value == pytest.approx(perplexity["pruned"], rel=1e-3)


def test_eval_prints_perplexity(capsys, files):
    result = invoke(
        capsys, "eval", files["model"], "--data", files["text"], "--nsamples", "2", "--seqlen", "16"
    )
    assert result.code == 0, result.err
    assert re.fullmatch(
        rf"perplexity [\d.]+ on {re.escape(str(files['text']))} \(2×16 tokens, .* s\)\n", result.out
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "./nope"], "model path not found: ./nope"),
        (["eval", "{model}", "--data", "missing.txt"], "neither a text file"),
        (["eval", "{model}", "--nsamples", "-1"], "nsamples: Input should be greater than or equal to 0"),
        (["eval", "{model}", "--seqlen", "1"], "seqlen: "),
        (["eval", "{model}", "--pattern", "2:4"], "No such option '--pattern'"),
        (["eval", "{model}", "--data", "{short}", "--seqlen", "64"], "shorter than one window of 64"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_eval_bad_input(capsys, files, no_model_loading, args, message):
    args = [a.format(model=files["model"], short=files["short"]) for a in args]
    assert message in invoke(capsys, *args).error_line


def test_eval_wikitext2_offline(capsys, files, monkeypatch, tmp_path, no_model_loading):
    datasets_config = pytest.importorskip("datasets.config")
    from huggingface_hub import constants

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = invoke(
        capsys, "eval", files["model"], "--data", "wikitext2", "--nsamples", "2", "--seqlen", "16"
    )
    line = result.error_line
    assert "cannot load wikitext2" in line and "download the dataset wikitext/wikitext-2-raw-v1" in line


def recipe_run(capsys, files, tmp_path, recipe: str, *flags: str) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    output = tmp_path / "out"
    result = invoke(
        capsys, *prune_args(files, "--recipe", path, "--output", output, "--eval-nsamples", "0", *flags)
    )
    assert result.code == 0, result.err
    return json.loads((output / METADATA_FILE).read_text())["recipe"]


def test_recipe_values_are_applied(capsys, files, tmp_path):
    recipe = recipe_run(
        capsys,
        files,
        tmp_path,
        "method: sparsegpt\npattern: 2:4\ntrue-sequential: true\nbatch_size: 2\nexclude: ['*.o_proj']\n",
    )
    assert recipe["method"] == "sparsegpt"
    assert recipe["pattern"] == "2:4"  # unquoted in YAML, still not the base-60 integer 124
    assert recipe["true_sequential"] is True
    assert recipe["batch_size"] == 2
    assert recipe["exclude"] == ["*.o_proj"]


def test_flags_override_the_recipe(capsys, files, tmp_path):
    recipe = recipe_run(
        capsys,
        files,
        tmp_path,
        "method: sparsegpt\npattern: '2:4'\ntrue_sequential: true\nblocksize: 16\n",
        "--method",
        "magnitude",
        "--no-true-sequential",
        "--blocksize",
        "8",
    )
    assert (recipe["method"], recipe["pattern"], recipe["true_sequential"], recipe["blocksize"]) == (
        "magnitude",
        "2:4",
        False,
        8,
    )


def test_recipe_with_an_unknown_key(capsys, files, tmp_path, no_model_loading):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: wanda\nsparsity-level: 0.5\n")
    line = invoke(capsys, *prune_args(files, "--recipe", path)).error_line
    assert line.endswith("unknown option sparsity-level")


def test_recipe_value_errors_are_one_line(capsys, files, tmp_path, no_model_loading):
    path = tmp_path / "recipe.yaml"
    path.write_text("sparsity: 1.5\n")
    assert (
        "sparsity: Input should be less than 1"
        in invoke(capsys, *prune_args(files, "--recipe", path)).error_line
    )
    path.write_text("method: [wanda\n")
    assert "is not valid YAML" in invoke(capsys, *prune_args(files, "--recipe", path)).error_line


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_config_field_has_a_flag(capsys):
    result = invoke(capsys, "prune", "--help")
    assert result.code == 0
    for name in RunConfig.model_fields:
        assert re.search(rf"{flag(name)}\b", result.out), f"{flag(name)} missing from prune --help"
    assert (
        "--recipe" in result.out and "--no-true-sequential" in result.out and "--no-overwrite" in result.out
    )
    result = invoke(capsys, "eval", "--help")
    for name in EvalConfig.model_fields:
        if name != "model":  # the positional MODEL argument
            assert re.search(rf"{flag(name)}\b", result.out), f"{flag(name)} missing from eval --help"


def test_version_and_bare_command(capsys):
    result = invoke(capsys, "--version")
    assert result.code == 0 and llmprune.__version__ in result.out
    bare = invoke(capsys)
    assert "Usage:" in bare.out + bare.err and ERROR not in bare.err


def test_ctrl_c_exits_130_and_writes_nothing(capsys, files, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    output = tmp_path / "out"
    monkeypatch.setattr(llmprune.api, "prune_model", interrupt)
    result = invoke(capsys, *prune_args(files, "--output", output))
    assert result.code == 130
    # before any decoder layer was finished: nothing --resume could continue from
    assert result.err.strip().splitlines()[-1] == "llmprune: interrupted; no output was written"
    assert "Traceback" not in result.err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_saving_leaves_no_partial_output(capsys, files, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    output = tmp_path / "out"
    monkeypatch.setattr("llmprune.storage._fsync_tree", interrupt)  # after every file is written
    result = invoke(capsys, *prune_args(files, "--output", output, "--eval-nsamples", "0"))
    assert result.code == 130
    # neither the output nor its staging directory: only the checkpoint that --resume would finish from
    assert [p.name for p in tmp_path.iterdir()] == [".out.resume"]


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmprune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_subprocess_exit_codes(files, tmp_path):
    bad = run_module("prune", "--model", files["model"], "--sparsity", "1.0")
    assert bad.returncode == 2
    assert bad.stderr == f"{ERROR}sparsity: Input should be less than 1\n"
    assert bad.stdout == ""
    offline = run_module(
        "eval",
        files["model"],
        "--data",
        "wikitext2",
        "--seqlen",
        "16",
        env={
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"),
            "HF_DATASETS_CACHE": str(tmp_path / "ds"),
        },
    )
    assert offline.returncode == 2, offline.stderr
    lines = offline.stderr.strip().splitlines()
    assert len(lines) == 1 and "wikitext/wikitext-2-raw-v1" in lines[0], offline.stderr
