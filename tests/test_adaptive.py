"""Structured pruning with per-layer widths (``widths="adaptive"``): the allocation follows the scores
and meets the global budget, every layer stays valid, and the saved model round-trips through
``llmprune.load``."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from conftest import (
    EVAL_TOKENS,
    logits,
    parameter_count,
    structured_prune_args,
    tiny_calibration,
    tiny_model,
)
from llmprune.errors import UsageError
from llmprune.export.save import save_pruned
from llmprune.storage import METADATA_FILE, read_metadata
from llmprune.structured.allocate import Steps, allocate
from llmprune.structured.checkpoint import WIDTHS_KEY, layer_widths

HIDDEN = 64  # every tiny model's hidden size




def decoder_layers(model: torch.nn.Module):
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def test_layers_whose_units_fall_far_below_their_typical_one_lose_more():
    model = tiny_model("llama")  # 3 layers; 4 query heads in 2 key/value groups of head size 16; MLP 128
    weak_channels = list(range(0, 128, 2))  # half of layer 1's channels: almost no output
    dead_heads = [*range(16, 32), *range(48, 64)]  # o_proj columns of query head 1 (group 0) and 3 (group 1)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, weak_channels] *= 1e-3
        model.model.layers[2].self_attn.o_proj.weight[:, dead_heads] = 0
    llmprune.prune(
        model,
        tiny_calibration(),
        pattern="structured",
        widths="adaptive",
        score="wanda",
        reconstruct=False,  # kept weights stay as they were: which units went can be read off them
        sparsity=0.25,
    )
    widths = layer_widths(model)
    assert [w["heads"] for w in widths] == [4, 4, 2]  # only the dead heads went
    o_proj = model.model.layers[2].self_attn.o_proj.weight
    assert o_proj.abs().sum(dim=0).min() > 0
    channels = [w["intermediate"] for w in widths]
    assert channels[1] <= 64 and channels[1] < min(channels[0], channels[2])  # all the weak ones, at least
    down = model.model.layers[1].mlp.down_proj.weight
    assert down.abs().amax(dim=0).min() > 1e-2  # none of the weak channels (|w| < 1e-3 · 0.1) is left


@pytest.mark.parametrize(
    ("family", "units", "head_mode", "channel_cost"),
    [
        ("llama", ["heads", "channels"], "queries", 3 * HIDDEN),
        ("llama", ["heads", "channels"], "groups", 3 * HIDDEN),
        ("qwen2", ["heads", "channels"], "queries", 3 * HIDDEN),
        ("opt", ["channels"], "queries", 2 * HIDDEN + 1),  # fc1 row and bias, fc2 column
        ("gpt2", ["channels"], "queries", 2 * HIDDEN + 1),
    ],
)
@pytest.mark.parametrize("sparsity", [0.2, 0.35])  # OPT: channels are half of a layer
def test_the_global_budget_is_met_and_widths_differ(family, units, head_mode, channel_cost, sparsity):
    model = tiny_model(family)
    before = parameter_count(model)
    report = llmprune.prune(
        model,
        tiny_calibration(),
        pattern="structured",
        units=units,
        sparsity=sparsity,
        widths="adaptive",
        score="wanda",  # no added biases: the removed count is exactly the units'
        head_mode=head_mode,
    )
    removed = report.parameters_before - report.parameters_after
    assert removed == before - parameter_count(model)
    assert abs(removed - sparsity * report.parameters_before) <= channel_cost / 2
    widths = layer_widths(model)
    assert widths is not None and len({w["intermediate"] for w in widths}) > 1
    generated = model.generate(EVAL_TOKENS[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


@pytest.mark.parametrize("head_mode", ["queries", "groups"])
def test_every_layer_stays_valid_at_extreme_sparsity(head_mode):
    model = tiny_model("llama")
    llmprune.prune(
        model,
        tiny_calibration(),
        pattern="structured",
        sparsity=0.95,
        widths="adaptive",
        head_mode=head_mode,
    )
    # Everything allowed is removed: all channels but one; all query heads but one in each of the two
    # key/value groups, or all groups but one (with both its query heads).
    expected = (2, 2) if head_mode == "queries" else (2, 1)
    for layer in model.model.layers:
        attention = layer.self_attn
        heads, kv_heads = attention.q_proj.out_features // 16, attention.k_proj.out_features // 16
        assert layer.mlp.down_proj.in_features == 1
        assert (heads, kv_heads) == expected and attention.v_proj.out_features == kv_heads * 16
        assert (
            attention.num_key_value_groups == heads // kv_heads and attention.o_proj.in_features == heads * 16
        )
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize(
    ("family", "units"), [("llama", "heads,channels"), ("qwen2", "heads,channels"), ("opt", "channels")]
)
def test_saved_model_round_trips_through_load(tmp_path, family, units):
    model = tiny_model(family)
    llmprune.prune(
        model, tiny_calibration(), pattern="structured", units=units, sparsity=0.4, widths="adaptive"
    )
    widths = layer_widths(model)
    assert widths is not None
    save_pruned(model, None, tmp_path / "out", {"note": "kept"})
    metadata = read_metadata(tmp_path / "out")
    assert metadata[WIDTHS_KEY] == widths and metadata["note"] == "kept"
    loaded = llmprune.load(tmp_path / "out")
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert torch.equal(logits(loaded), logits(model))
    prompt = EVAL_TOKENS[:1, :4]
    assert torch.equal(
        loaded.generate(prompt, max_new_tokens=6, do_sample=False),
        model.generate(prompt, max_new_tokens=6, do_sample=False),
    )
    with pytest.raises(RuntimeError, match="mismatch"):  # one config cannot describe the layers
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_a_layer_left_whole_gets_the_flap_biases_and_round_trips(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # four dominant channels: every other channel of layer 0 sits near its mean
        model.model.layers[0].mlp.down_proj.weight[:, :4] *= 100
    llmprune.prune(
        model, tiny_calibration(), pattern="structured", units="channels", sparsity=0.1, widths="adaptive"
    )
    assert layer_widths(model)[0]["intermediate"] == 128
    untouched = model.model.layers[0].mlp.down_proj
    assert untouched.in_features == 128 and torch.equal(untouched.bias, torch.zeros(HIDDEN))
    assert all(layer.mlp.down_proj.in_features < 128 for layer in model.model.layers[1:])
    save_pruned(model, None, tmp_path / "out", {})
    assert torch.equal(logits(llmprune.load(tmp_path / "out")), logits(model))


def test_a_uniform_model_records_no_widths_and_loads_as_it_is(tmp_path):
    model = tiny_model("llama")
    llmprune.prune(model, tiny_calibration(), pattern="structured", sparsity=0.4)
    assert layer_widths(model) is None
    save_pruned(model, None, tmp_path / "out", {})
    assert WIDTHS_KEY not in read_metadata(tmp_path / "out")
    assert torch.equal(logits(llmprune.load(tmp_path / "out")), logits(model))


def test_widths_that_do_not_match_the_weights_are_refused(tmp_path):
    model = tiny_model("llama")
    llmprune.prune(model, tiny_calibration(), pattern="structured", sparsity=0.4, widths="adaptive")
    save_pruned(model, None, tmp_path / "out", {})
    path = tmp_path / "out" / METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata[WIDTHS_KEY][0]["intermediate"] += 1
    path.write_text(json.dumps(metadata))
    with pytest.raises(UsageError, match="do not match the recorded widths"):
        llmprune.load(tmp_path / "out")
    metadata[WIDTHS_KEY].pop()
    path.write_text(json.dumps(metadata))
    with pytest.raises(UsageError, match="3 decoder layers"):
        llmprune.load(tmp_path / "out")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pattern": "unstructured"}, "--widths applies to structured pruning"),
        ({"pattern": "structured", "units": ["layers"]}, "--widths adaptive needs --units heads and/or"),
    ],
)
def test_bad_requests_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        llmprune.prune(tiny_model("llama"), tiny_calibration(), widths="adaptive", **options)


def test_allocation_takes_the_lowest_scores_within_the_budget():
    steps = [
        Steps(torch.tensor([-2.0, 0.5]), cost=10.0),  # a layer's heads: the first is cheap to lose
        Steps(torch.tensor([-1.0, -0.5, 0.0, 3.0]), cost=1.0),  # its channels
        Steps(torch.tensor([-3.0, -0.2, 0.1]), cost=1.0),  # another layer's channels
    ]
    assert allocate(steps, 13.0) == [1, 2, 1]  # -3, -2 (the head), -1, -0.5: 13
    assert allocate(steps, 14.0) == [1, 2, 2]  # and -0.2
    assert allocate(steps, 3.0) == [0, 2, 1]  # the head does not fit: -3, -1, -0.5
    assert allocate(steps, 1000.0) == [2, 4, 3]  # every allowed step, short of the budget


def test_cli_saves_per_layer_widths_that_eval_and_load_read(tmp_path, capsys):
    from conftest import save_tiny_llama
    from llmprune.cli.main import main

    tokenizer = llmprune.load_tokenizer("smollm2")
    source = save_tiny_llama(tmp_path / "tiny", tokenizer)
    with torch.no_grad():  # layer 1's MLP adds almost nothing: it should lose more channels than layer 0
        dense = AutoModelForCausalLM.from_pretrained(source)
        dense.model.layers[1].mlp.down_proj.weight[:, :48] *= 1e-3
        dense.save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text(llmprune.embedded_text()[:20_000], encoding="utf-8")
    main(structured_prune_args(source, text, tmp_path / "out", "--widths", "adaptive", "--sparsity", "0.3"))
    assert "saved to" in capsys.readouterr().out
    metadata = read_metadata(tmp_path / "out")
    assert metadata["recipe"]["widths"] == "adaptive"
    widths = metadata[WIDTHS_KEY]
    assert widths[1]["intermediate"] < widths[0]["intermediate"]
    loaded = llmprune.load(tmp_path / "out")
    assert [layer.mlp.down_proj.in_features for layer in loaded.model.layers] == [
        w["intermediate"] for w in widths
    ]
    main(["eval", str(tmp_path / "out"), "--data", str(text), "--nsamples", "2", "--seqlen", "16"])
    assert "perplexity" in capsys.readouterr().out
