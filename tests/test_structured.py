"""Structured pruning: heads, MLP channels and whole layers removed, leaving a smaller model that plain
transformers loads; exact when the removed units contribute nothing; re-fitting lowers the error."""

from __future__ import annotations

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
from llmprune.structured import step as structured_step
from llmprune.structured.reconstruct import least_squares_refit, mean_compensation
from llmprune.structured.removal import WidthPlan
from llmprune.structured.scores import column_scores, keep_highest


def force_plan(monkeypatch, plan: WidthPlan) -> None:
    """Every layer loses the units of ``plan`` (instead of those the budget gives)."""
    monkeypatch.setattr(structured_step, "plan_widths", lambda *args: plan)


@pytest.mark.parametrize("head_mode", ["queries", "groups"])
def test_removing_units_that_contribute_nothing_leaves_logits_unchanged(monkeypatch, head_mode):
    model = tiny_model("llama")  # 4 query heads in 2 key/value groups, head size 16, MLP width 128
    # queries: head 1 of group 0 and head 2 of group 1; groups: group 1 (query heads 2 and 3)
    dead_columns = [*range(16, 48)] if head_mode == "queries" else [*range(32, 64)]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, dead_columns] = 0
            layer.mlp.down_proj.weight[:, [5, 77, 100]] = 0
    before = logits(model)
    force_plan(monkeypatch, WidthPlan(heads=1, channels=3, head_mode=head_mode))
    llmprune.prune(
        model, tiny_calibration(), pattern="structured", score="wanda", reconstruct=False, head_mode=head_mode
    )
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.weight.shape == (64, 125)
    assert layer.self_attn.o_proj.weight.shape == (64, 32)
    expected_kv = 2 if head_mode == "queries" else 1
    assert model.config.num_key_value_heads == expected_kv and model.config.num_attention_heads == 2
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "units", "score"),
    [
        ("llama", ["heads", "channels"], "flap"),
        ("llama", ["layers", "heads", "channels"], "wanda"),
        ("qwen2", ["heads", "channels"], "wanda"),
        ("gemma2", ["heads", "channels"], "magnitude"),
        ("mistral", ["layers"], "wanda"),
        ("opt", ["layers", "channels"], "flap"),
        ("gpt2", ["channels"], "flap"),
        ("gpt_neox", ["channels"], "wanda"),
    ],
)
def test_saved_model_loads_with_plain_transformers_and_generates(tmp_path, family, units, score):
    model = tiny_model(family)
    dense = parameter_count(model)
    report = llmprune.prune(
        model, tiny_calibration(), pattern="structured", units=units, sparsity=0.5, score=score
    )
    assert parameter_count(model) < dense
    assert 0.3 < report.achieved_sparsity < 0.7, report.achieved_sparsity  # units are coarse on tiny models
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert parameter_count(loaded) == parameter_count(model)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    torch.testing.assert_close(logits(loaded), logits(model))
    generated = loaded.generate(EVAL_TOKENS[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_reconstruction_lowers_every_consumer_error():
    results = {}
    for reconstruct in (False, True):
        model = tiny_model("llama")
        report = llmprune.prune(
            model,
            tiny_calibration(),
            pattern="structured",
            sparsity=0.4,
            score="wanda",
            reconstruct=reconstruct,
        )
        results[reconstruct] = {row.name: row.relative_error for row in report.layers}
    assert results[True].keys() == results[False].keys() and results[True]
    for name, error in results[True].items():
        assert error < results[False][name], name


def test_least_squares_refit_matches_a_direct_solve():
    torch.manual_seed(0)
    x = torch.randn(500, 12) @ torch.randn(12, 12) + 0.5
    weight, bias = torch.randn(6, 12), torch.randn(6)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    gram, sums = x.t() @ x, x.sum(0)
    target = x @ weight.t() + bias
    refit = least_squares_refit(weight, bias, gram, sums, len(x), keep, fit_bias=True, damp=1e-9)
    design = torch.cat([x[:, keep], torch.ones(len(x), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, target.double()).solution.t().float()
    torch.testing.assert_close(refit.weight, solution[:, :-1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(refit.bias, solution[:, -1], rtol=1e-3, atol=1e-3)
    no_bias = least_squares_refit(weight, None, gram, sums, len(x), keep, fit_bias=False, damp=1e-9)
    plain = torch.linalg.lstsq(x[:, keep].double(), (x @ weight.t()).double()).solution.t().float()
    torch.testing.assert_close(no_bias.weight, plain, rtol=1e-3, atol=1e-3)


def test_flap_bias_compensation_keeps_the_mean_output():
    torch.manual_seed(0)
    x = torch.randn(1000, 8) + torch.arange(8.0)
    weight = torch.randn(4, 8)
    removed = torch.tensor([False, True, False, False, True, False, False, False])
    bias = mean_compensation(weight, None, x.sum(0), len(x), removed)
    kept = x[:, ~removed] @ weight[:, ~removed].t() + bias
    torch.testing.assert_close(kept.mean(0), (x @ weight.t()).mean(0), rtol=1e-4, atol=1e-4)


def test_scores_follow_their_definitions():
    torch.manual_seed(0)
    x = torch.randn(300, 5) * torch.tensor([1.0, 2.0, 0.1, 3.0, 1.0]) + 4
    weight = torch.randn(3, 5)
    energy, sums = x.square().sum(0), x.sum(0)
    wanda = column_scores("wanda", weight, energy, sums, len(x))
    torch.testing.assert_close(wanda, x.norm(dim=0) * weight.abs().sum(0), rtol=1e-4, atol=1e-4)
    flap = column_scores("flap", weight, energy, sums, len(x))
    torch.testing.assert_close(flap, x.var(dim=0) * weight.square().sum(0), rtol=1e-3, atol=1e-3)
    producer = torch.randn(5, 7)
    magnitude = column_scores("magnitude", weight, energy, sums, len(x), [producer])
    torch.testing.assert_close(magnitude, weight.square().sum(0) + producer.square().sum(1))
    assert keep_highest(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2).tolist() == [0, 2]


def test_the_layer_that_changes_nothing_is_removed_first():
    model = tiny_model("llama")
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: block influence 0
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    expected = [model.model.layers[0], model.model.layers[2]]
    before = logits(model)
    report = llmprune.prune(model, tiny_calibration(), pattern="structured", units=["layers"], sparsity=0.3)
    assert report.removed_layers == [1]
    assert list(model.model.layers) == expected
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "options", "message"),
    [
        ("phi3", {"units": ["channels"]}, "removing channels is not supported for model type 'phi3'"),
        ("opt", {"units": ["heads"]}, "attention heads of opt models cannot be removed"),
        ("llama", {"method": "sparsegpt"}, "--method does not apply to structured pruning"),
        ("llama", {"true_sequential": True}, "true-sequential apply to unstructured and N:M"),
        ("llama", {"units": []}, "structured pruning needs --units"),
    ],
)
def test_bad_requests_are_usage_errors(family, options, message):
    model = tiny_model(family)
    before = logits(model)
    with pytest.raises(UsageError, match=message):
        llmprune.prune(model, tiny_calibration(), pattern="structured", **options)
    torch.testing.assert_close(logits(model), before)  # nothing was touched


def test_cli_writes_a_smaller_checkpoint(tmp_path, capsys):
    from conftest import save_tiny_llama
    from llmprune.cli.main import main

    tokenizer = llmprune.load_tokenizer("smollm2")
    source = save_tiny_llama(tmp_path / "tiny", tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(llmprune.embedded_text()[:20_000], encoding="utf-8")
    options = ["--units", "heads,channels", "--sparsity", "0.25"]
    main(structured_prune_args(source, text, tmp_path / "out", *options))
    printed = capsys.readouterr().out
    assert "decoder parameters" in printed and "saved to" in printed
    dense = AutoModelForCausalLM.from_pretrained(source)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert pruned.config.intermediate_size < dense.config.intermediate_size
    assert parameter_count(pruned) < parameter_count(dense)

    with pytest.raises(SystemExit) as exit_info:
        main(structured_prune_args(source, text, tmp_path / "other", *options, "--offload"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "structured pruning does not support --offload yet" in err and err.count("\n") == 1
