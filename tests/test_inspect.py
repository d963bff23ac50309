"""``llmprune inspect``: what it reports matches what pruning recorded, for plain, pruned and compressed
checkpoints; anything that is not a checkpoint is one line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import llmprune
from conftest import invoke, tiny_calibration, tiny_model
from llmprune.export.inspection import tensor_info
from llmprune.export.save import save_pruned
from llmprune.models.packed import SUFFIX
from llmprune.storage import METADATA_FILE


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama dense, pruned (Wanda 2:4 and magnitude 60 %) with an ``llmprune.json`` like ``run``'s,
    and the 2:4 one compressed."""
    root = tmp_path_factory.mktemp("inspect")
    saved = {}
    model = tiny_model("llama")
    model.save_pretrained(root / "dense")
    saved["dense"] = root / "dense"
    for key, pattern, sparsity, method in [
        ("2:4", "2:4", None, "wanda"),
        ("60", "unstructured", 0.6, "magnitude"),
    ]:
        model = tiny_model("llama")
        report = llmprune.prune(model, tiny_calibration(), method=method, pattern=pattern, sparsity=sparsity)
        metadata = {
            "recipe": {"method": method, "pattern": pattern, "sparsity": report.sparsity},
            "report": report.to_dict(),
        }
        save_pruned(model, None, root / key, metadata)
        saved[key] = root / key
    saved["compressed"] = llmprune.compress(saved["2:4"], root / "compressed")
    return saved


def inspect_json(capsys, directory: Path) -> dict:
    result = invoke(capsys, "inspect", directory, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.mark.parametrize("key", ["2:4", "60", "compressed"])
def test_reports_the_recorded_sparsity(capsys, checkpoints, key):
    info = inspect_json(capsys, checkpoints[key])
    report = json.loads((checkpoints[key] / METADATA_FILE).read_text())["report"]
    tensors = {t["name"]: t for t in info["tensors"]}
    assert len(report["layers"]) == 21
    for row in report["layers"]:
        tensor = tensors[f"{row['name']}.weight"]
        assert tensor["linear"] and tensor["layer"] == row["layer"]
        assert tensor["sparsity"] == pytest.approx(row["achieved_sparsity"], abs=1e-12)
    assert info["linear"]["sparsity"] == pytest.approx(report["achieved_sparsity"], abs=1e-12)
    assert info["report"] == report
    assert [row["layer"] for row in info["layers"]] == [0, 1, 2]  # by index (the file is alphabetical)


def test_nm_compliance(capsys, checkpoints):
    nm = inspect_json(capsys, checkpoints["2:4"])
    assert all(row["patterns"] == ["2:4", "4:8", "8:16"] for row in nm["layers"])
    assert nm["linear"]["patterns"] == ["2:4", "4:8", "8:16"]
    unstructured = inspect_json(capsys, checkpoints["60"])
    assert unstructured["linear"]["patterns"] == []  # 60 % of a matrix, not of every group
    # Group by group: one group of 4 with three non-zeros breaks 2:4 (but not 4:8 if its neighbour is light).
    weights = torch.ones(4, 8)
    weights[:, 1::2] = 0.0
    weights[0, :4] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    weights[0, 4:] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    info = tensor_info("model.layers.0.mlp.up_proj.weight", weights, True, False)
    assert info.max_per_group == {4: 3, 8: 4, 16: None}
    assert info.patterns == ["4:8"]
    transposed = tensor_info("h.0.c_fc.weight", weights.t(), True, True)
    assert transposed.patterns == ["4:8"]


def test_plain_and_compressed_agree(capsys, checkpoints):
    dense = inspect_json(capsys, checkpoints["dense"])
    assert dense["kind"] == "plain" and dense["recipe"] is None
    assert dense["linear"]["sparsity"] == 0.0 and dense["linear"]["patterns"] == []
    model = tiny_model("llama")
    assert dense["parameters"] == sum(p.numel() for p in model.parameters())
    pruned, packed = inspect_json(capsys, checkpoints["2:4"]), inspect_json(capsys, checkpoints["compressed"])
    assert (pruned["kind"], packed["kind"]) == ("llmprune", "compressed")
    for key in ("parameters", "nonzeros", "linear", "recipe"):
        if key == "linear":
            assert {**packed[key], "layouts": {}} == pruned[key]
        else:
            assert packed[key] == pruned[key]
    assert packed["linear"]["layouts"] == {"2:4": 21}
    assert packed["weights_bytes"] < 0.7 * pruned["weights_bytes"]
    assert packed["disk_bytes"] == sum(p.stat().st_size for p in checkpoints["compressed"].iterdir())


def test_human_output(capsys, checkpoints):
    result = invoke(capsys, "inspect", checkpoints["compressed"])
    assert result.code == 0, result.err
    out = result.out
    assert "linear weights per decoder layer" in out
    assert "compressed checkpoint" in out and "2:4×7" in out
    assert "linear weights 110,592, sparsity 50.00%, every one 2:4, 4:8, 8:16" in out
    assert "recipe: wanda 2:4" in out and "recorded achieved sparsity 50.00%" in out
    tensors = invoke(capsys, "inspect", checkpoints["60"], "--tensors").out
    assert "model.layers.2.mlp.down_proj.weight" in tensors and "model.norm.weight" in tensors


def test_not_a_checkpoint(capsys, checkpoints, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    cases = {
        tmp_path / "nothere": "checkpoint directory not found",
        tmp_path / "empty": "is not a Hugging Face checkpoint directory (no config.json)",
        tmp_path / "file.txt": "is a file, not a checkpoint directory",
        tmp_path / "bin": "holds only pickle weights (pytorch_model.bin), which llmprune does not load",
    }
    for path, message in cases.items():
        assert message in invoke(capsys, "inspect", path, "--json").error_line
    assert "No such option" in invoke(capsys, "inspect", checkpoints["dense"], "--bogus").error_line


def test_damaged_compressed_checkpoint(capsys, checkpoints, tmp_path):
    copy = Path(shutil.copytree(checkpoints["compressed"], tmp_path / "copy"))
    weights = copy / f"model{SUFFIX}"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "is truncated or damaged" in invoke(capsys, "inspect", copy).error_line
    (copy / METADATA_FILE).unlink()
    assert "holds compressed weights but no llmprune.json" in invoke(capsys, "inspect", copy).error_line


def test_layers_in_numeric_order(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import TINY_CONFIGS

    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = 11  # the checkpoint lists layers 0, 1, 10, 2, ...
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "deep")
    info = llmprune.inspect_checkpoint(tmp_path / "deep")
    assert [row["layer"] for row in info["layers"]] == list(range(11))
