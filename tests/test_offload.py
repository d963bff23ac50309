"""Streaming (``--offload``): decoder layers read from the checkpoint's shards one at a time, each pruned
layer written to the output's shards at once, activations on disk past ``--max-memory``. The output is an
ordinary sharded checkpoint that plain ``from_pretrained`` loads, equal to the in-memory path's output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

import llmprune
from conftest import save_text
from llmprune import api
from llmprune.cli.main import main
from llmprune.config import RunConfig
from llmprune.models.shards import INDEX_FILE, CheckpointShards
from llmprune.pipeline import offload


def _config(family: str, vocab: int, tied: bool):
    common = {"vocab_size": vocab, "tie_word_embeddings": tied}
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common)
    shape = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)
    if family == "llama":
        return LlamaConfig(intermediate_size=64, num_key_value_heads=2, **shape, **common)
    return OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **shape, **common)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return save_text(tmp_path_factory.mktemp("text") / "text.txt")


def save_checkpoint(directory: Path, tokenizer, family: str = "llama", tied: bool = False) -> Path:
    """A tiny random model with the embedded model's tokenizer, saved in several small shards."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, len(tokenizer), tied))
    model.save_pretrained(directory, max_shard_size="2MB")
    tokenizer.save_pretrained(directory)
    assert (directory / INDEX_FILE).is_file()
    return directory


def run_config(model: Path, text: Path, output: Path, **options) -> RunConfig:
    values = {"nsamples": 4, "seqlen": 16, "eval_nsamples": 2, "eval_seqlen": 32, **options}
    return RunConfig(
        model=str(model), calibration=str(text), eval_data=str(text), output=str(output), **values
    )


def state(directory: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


@pytest.mark.parametrize(
    ("family", "tied", "method", "options"),
    [
        ("llama", False, "sparsegpt", {}),
        ("llama", True, "wanda", {"pattern": "2:4"}),
        ("llama", False, "wanda", {"true_sequential": True}),
        ("gpt2", True, "sparsegpt", {}),
        ("opt", True, "magnitude", {}),
        ("llama", False, "wanda", {"schedule": "owl", "refine": "swaps,resolve", "reconstruct": "layer"}),
    ],
)
def test_streamed_output_equals_the_in_memory_output(
    tmp_path, tokenizer, text, family, tied, method, options
):
    source = save_checkpoint(tmp_path / "model", tokenizer, family, tied)
    in_memory = llmprune.run(run_config(source, text, tmp_path / "memory", method=method, **options))
    streamed = llmprune.run(
        run_config(source, text, tmp_path / "streamed", method=method, offload=True, **options)
    )
    assert streamed.streamed and not in_memory.streamed
    expected, got = state(tmp_path / "memory"), state(tmp_path / "streamed")  # plain from_pretrained
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert streamed.dense_perplexity == pytest.approx(in_memory.dense_perplexity, rel=1e-6)
    assert streamed.pruned_perplexity == pytest.approx(in_memory.pruned_perplexity, rel=1e-6)
    assert streamed.report.achieved_sparsity == pytest.approx(in_memory.report.achieved_sparsity)

    # One shard per decoder layer (and per tensor outside them), all in the index, nothing else left.
    weight_map = json.loads((tmp_path / "streamed" / INDEX_FILE).read_text())["weight_map"]
    shards = sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert set(weight_map.values()) == set(shards)
    layers = {name.split(".layers.")[1].split(".")[0] if ".layers." in name else name for name in weight_map}
    if family != "gpt2":  # GPT-2's layers are transformer.h.N
        assert len(layers) == len(shards)
    metadata = json.loads((tmp_path / "streamed" / "llmprune.json").read_text())
    assert metadata["recipe"]["offload"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "model", "streamed"]


def test_each_layer_is_in_memory_only_while_it_is_pruned(tmp_path, tokenizer, text, monkeypatch):
    source = save_checkpoint(tmp_path / "model", tokenizer)
    seen = []
    original_finish = offload.StreamedLayers.finish

    def finish(self, index, layer):
        layers = layer_list[0]
        materialised = [
            i for i, other in enumerate(layers) if other.self_attn.q_proj.weight.device.type != "meta"
        ]
        seen.append((index, materialised))
        original_finish(self, index, layer)

    layer_list = []
    original_skeleton = api.streaming_skeleton

    def skeleton(*args, **kwargs):
        model, shards = original_skeleton(*args, **kwargs)
        layer_list.append(model.model.layers)
        return model, shards

    monkeypatch.setattr(offload.StreamedLayers, "finish", finish)
    monkeypatch.setattr(api, "streaming_skeleton", skeleton)
    llmprune.run(run_config(source, text, tmp_path / "out", offload=True, eval_nsamples=0))
    assert seen == [(0, [0]), (1, [1]), (2, [2])]


def test_activations_past_max_memory_go_to_disk_and_are_removed(tmp_path, tokenizer, text, monkeypatch):
    source = save_checkpoint(tmp_path / "model", tokenizer)
    spilled = []
    original_keep = offload.ActivationStore.keep

    def keep(self, outputs):
        kept = original_keep(self, outputs)
        if self.max_bytes is not None:  # the run's store (a streamed perplexity keeps its own, in RAM)
            spilled.append(isinstance(kept, offload.SpilledBatches) and all(p.is_file() for p in kept.paths))
        return kept

    monkeypatch.setattr(offload.ActivationStore, "keep", keep)
    in_ram = llmprune.run(run_config(source, text, tmp_path / "ram", offload=True, max_memory="1GiB"))
    assert spilled and not any(spilled)
    spilled.clear()
    on_disk = llmprune.run(run_config(source, text, tmp_path / "disk", offload=True, max_memory="1KiB"))
    assert spilled and all(spilled)
    assert on_disk.pruned_perplexity == in_ram.pruned_perplexity
    expected, got = state(tmp_path / "ram"), state(tmp_path / "disk")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "model", "ram"]  # no activation files


def test_max_memory_without_offload_spills_too(tmp_path, tokenizer, text):
    source = save_checkpoint(tmp_path / "model", tokenizer)
    llmprune.run(run_config(source, text, tmp_path / "a"))
    b = llmprune.run(run_config(source, text, tmp_path / "b", max_memory="1KiB"))
    assert not b.streamed
    expected, got = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_model_that_would_not_fit_is_streamed_automatically(tmp_path, tokenizer, text, monkeypatch):
    source = save_checkpoint(tmp_path / "model", tokenizer)
    monkeypatch.setattr(api, "fits_in_memory", lambda *_: False)
    monkeypatch.setattr(api, "load_plain_model", lambda *_, **__: pytest.fail("the whole model was loaded"))
    assert llmprune.run(run_config(source, text, tmp_path / "out")).streamed


def test_failure_midway_leaves_no_output(tmp_path, tokenizer, text, monkeypatch):
    source = save_checkpoint(tmp_path / "model", tokenizer)

    def broken(self, index, layer):
        raise RuntimeError("disk full")

    monkeypatch.setattr(offload.StreamedLayers, "finish", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        llmprune.run(run_config(source, text, tmp_path / "out", offload=True, max_memory="1KiB"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_shards_are_read_by_name_across_files(tmp_path, tokenizer):
    source = save_checkpoint(tmp_path / "model", tokenizer)
    shards = CheckpointShards(source)
    assert len(set(shards.weight_map.values())) > 1
    names = shards.names("model.layers.1.")
    tensors = {name: shards.read(name) for name in names}
    reference = AutoModelForCausalLM.from_pretrained(source).state_dict()
    assert all(torch.equal(tensors[name], reference[name]) for name in names)


def _invoke(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-memory", "lots"], "max_memory: expected a size such as 4GiB"),
        (["--max-memory", "0"], "max_memory: size must be positive"),
        (["--max-memory", "1GiB", "--resume"], "--resume is not supported with --max-memory yet"),
        (["--missing-shard"], "shard files listed in model.safetensors.index.json are missing: "),
    ],
)
def test_bad_input_is_one_line(tmp_path, tokenizer, text, capsys, monkeypatch, flags, message):
    source = save_checkpoint(tmp_path / "model", tokenizer)
    if flags == ["--missing-shard"]:
        shard = json.loads((source / INDEX_FILE).read_text())["weight_map"][
            "model.layers.1.mlp.up_proj.weight"
        ]
        os.remove(source / shard)
        flags, message = ["--offload"], message + shard
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *_, **__: pytest.fail("model loaded"))
    code, err = _invoke(
        capsys, "prune", "--model", source, "--calibration", text, "--output", tmp_path / "out", *flags
    )
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err
