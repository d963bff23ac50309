"""Beyond the reference methods, through the pipeline: OWL per-layer sparsity, --refine (swaps, resolve),
block reconstruction and the preset, on every architecture, with the options they compose with, and the
bad input they refuse before any model is loaded. The math itself is tested in test_owl.py,
test_refine.py and test_reconstruct.py."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from conftest import (
    ERROR,
    TINY_CONFIGS,
    invoke,
    prune_args,
    save_text,
    save_tiny_llama,
    tiny_calibration,
    tiny_model,
)
from llmprune.config import PRESETS, PRESETS_UNSTRUCTURED, PruneOptions, build
from llmprune.methods.patterns import Pattern
from llmprune.models.architecture import linear_layers, read_weight
from llmprune.storage import METADATA_FILE


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("beyond")
    return {"model": save_tiny_llama(root / "tiny-llama", tokenizer), "text": save_text(root / "text.txt")}


def zeros(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The zero pattern of every decoder linear layer."""
    return {name: read_weight(m) == 0 for layer in linear_layers(model) for name, m in layer.items()}


# --- OWL -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_owl_sparsities_have_the_mean_stay_in_the_band_and_follow_the_outliers(method):
    model = tiny_model("llama")
    options = {"method": method, "sparsity": 0.6, "schedule": "owl", "owl_lambda": 0.1}
    report = llmprune.prune(model, tiny_calibration(), **options)
    sparsities, ratios = report.layer_sparsities, report.outlier_ratios
    assert len(sparsities) == len(ratios) == 3
    assert sum(sparsities) / 3 == pytest.approx(0.6, abs=1e-9)
    assert all(0.5 - 1e-9 <= s <= 0.7 + 1e-9 for s in sparsities)
    assert max(abs(s - 0.6) for s in sparsities) == pytest.approx(0.1)  # the farthest layer on the edge
    by_ratio = sorted(range(3), key=lambda i: ratios[i])  # fewer outliers: more pruning
    assert [sparsities[i] for i in by_ratio] == sorted(sparsities, reverse=True)
    assert report.achieved_sparsity == pytest.approx(0.6, abs=2e-3)  # per-row rounding only
    for row in report.layers:
        assert row.target_sparsity == sparsities[row.layer]
        assert row.achieved_sparsity == pytest.approx(row.target_sparsity, abs=1 / row.shape[1])


def test_owl_leaves_per_layer_overrides_alone():
    report = llmprune.prune(
        tiny_model("llama"), tiny_calibration(), schedule="owl", layer_sparsity={"down_proj": 0.2}
    )
    assert {r.target_sparsity for r in report.layers if r.name.endswith("down_proj")} == {0.2}
    assert len(set(report.layer_sparsities)) == 3


# --- refinement through the pipeline ---------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_resolve_lowers_every_layers_error_and_keeps_the_mask(method, pattern):
    plain = tiny_model("llama")
    llmprune.prune(plain, tiny_calibration(), method=method, pattern=pattern)
    model = tiny_model("llama")
    report = llmprune.prune(model, tiny_calibration(), method=method, pattern=pattern, refine="resolve")
    assert all(r.refined_to <= r.refined_from for r in report.layers)
    assert sum(r.refined_to for r in report.layers) < 0.95 * sum(r.refined_from for r in report.layers)
    if method == "magnitude":  # its mask does not depend on the inputs (which resolve changes downstream)
        for (name, got), expected in zip(zeros(model).items(), zeros(plain).values(), strict=True):
            assert torch.equal(got, expected), name


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_swaps_keep_the_pattern_and_never_raise_the_error(pattern):
    model = tiny_model("llama")
    report = llmprune.prune(model, tiny_calibration(), method="wanda", pattern=pattern, refine="swaps")
    assert sum(r.swaps for r in report.layers) > 0
    assert all(r.refined_to <= r.refined_from * (1 + 1e-6) for r in report.layers)
    spec = Pattern.parse(pattern)
    for name, pruned in zeros(model).items():
        if spec.is_nm:
            groups = pruned.reshape(pruned.shape[0], -1, spec.m).sum(-1)
            assert bool((groups >= spec.m - spec.n).all()), name  # N:M holds group by group
        else:
            per_row = pruned.sum(1)
            assert bool((per_row == per_row[0]).all()), name  # Wanda's exact per-row count, kept


# --- block reconstruction, presets, composition ----------------------------------------------------------


def test_reconstruction_lowers_each_blocks_error_and_keeps_zeros_exact():
    model = tiny_model("llama")
    options = {"method": "wanda", "reconstruct": "layer", "reconstruct_lr": 1e-3}
    report = llmprune.prune(model, tiny_calibration(), **options)
    assert [b.layer for b in report.blocks] == [0, 1, 2]
    assert all(b.restored is None and b.error_after < b.error_before for b in report.blocks)
    for name, pruned in zeros(model).items():
        assert int(pruned.sum()) == pruned.numel() // 2, name  # Wanda's 50 % per matrix, exactly


def test_the_preset_sets_its_options_and_explicit_ones_win():
    best = build(PruneOptions, {"preset": "best"})
    for name, value in {**PRESETS["best"], **PRESETS_UNSTRUCTURED["best"]}.items():
        assert getattr(best, name) == value
    assert build(PruneOptions, {"preset": "best", "method": "wanda"}).method == "wanda"
    assert build(PruneOptions, {"preset": "best", "reconstruct": "none"}).reconstruct == "none"
    assert build(PruneOptions, {"preset": "none"}).refine == []
    assert build(PruneOptions, {"preset": "best"}).schedule == "owl"  # unstructured: OWL too
    assert build(PruneOptions, {"preset": "best", "pattern": "2:4"}).schedule == "uniform"
    # A preset's setting of a dependent option goes with the option it refines.
    swaps = build(PruneOptions, {"preset": "best", "refine": "swaps"})
    assert swaps.refine == ["swaps"] and "refine_iterations" not in swaps.model_fields_set
    layer = build(PruneOptions, {"preset": "best", "reconstruct": "layer"})
    assert "reconstruct_steps" not in layer.model_fields_set


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_the_preset_on_every_architecture(family):
    model = tiny_model(family)
    report = llmprune.prune(model, tiny_calibration(), pattern="2:4", preset="best")
    assert report.achieved_sparsity == pytest.approx(0.5)
    assert all(r.refined_to <= r.refined_from for r in report.layers)
    assert len(report.blocks) == 3 and all(b.error_after <= b.error_before for b in report.blocks)
    for name, pruned in zeros(model).items():
        assert bool((pruned.reshape(pruned.shape[0], -1, 4).sum(-1) == 2).all()), name


def test_everything_composes_with_true_sequential():
    model = tiny_model("qwen2")
    report = llmprune.prune(
        model,
        tiny_calibration(),
        method="sparsegpt",
        sparsity=0.6,
        schedule="owl",
        refine="swaps,resolve",
        reconstruct="sublayer",
        true_sequential=True,
    )
    assert report.achieved_sparsity == pytest.approx(0.6, abs=2e-3)
    assert len(report.blocks) == 3 and all(r.refined_to is not None for r in report.layers)


# --- the command line: reported, saved, refused ----------------------------------------------------------


def test_cli_reports_and_saves_what_each_component_did(capsys, files, tmp_path):
    output = tmp_path / "out"
    options = ["--schedule", "owl", "--refine", "swaps,resolve", "--reconstruct", "layer"]
    result = invoke(capsys, *prune_args(files, "--output", output, *options, "--reconstruct-steps", "4"))
    assert result.code == 0, result.err
    assert "refine" in result.out and "block output" in result.out
    report = json.loads((output / METADATA_FILE).read_text())["report"]
    assert len(report["layer_sparsities"]) == len(report["outlier_ratios"]) == 2
    assert all(row["refined_to"] <= row["refined_from"] for row in report["layers"])
    assert [block["layer"] for block in report["blocks"]] == [0, 1]


def test_opt_refuses_sublayer_reconstruction_before_loading(capsys, tmp_path, tokenizer, no_model_loading):
    source = tmp_path / "opt"
    tiny_model("opt").save_pretrained(source)
    tokenizer.save_pretrained(source)
    files = {"model": source, "text": save_text(tmp_path / "text.txt")}
    result = invoke(capsys, *prune_args(files, "--output", tmp_path / "out", "--reconstruct", "sublayer"))
    assert "--reconstruct sublayer does not apply to opt" in result.error_line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--schedule", "owl", "--pattern", "2:4"], "--schedule owl would give each layer its own N"),
        (["--schedule", "owl", "--owl-lambda", "0.5"], "--owl-lambda 0.5 must be below the sparsity 0.5"),
        (["--owl-threshold", "3"], "--owl-threshold applies only with --schedule owl"),
        (["--schedule", "owl", "--owl-threshold", "0"], "owl_threshold: Input should be greater than 0"),
        (["--refine", "resolve", "--pattern", "structured"], "--refine applies to unstructured and N:M"),
        (["--refine", "polish"], "refine"),
        (["--refine-iterations", "5"], "--refine-iterations applies only with --refine resolve"),
        (["--refine", "resolve", "--swap-rounds", "5"], "--swap-rounds applies only with --refine swaps"),
        (["--reconstruct", "layer", "--reconstruct-steps", "0"], "reconstruct_steps: Input should be"),
        (["--reconstruct", "dense", "--reconstruct-lr", "-1"], "reconstruct_lr: Input should be greater"),
        (["--reconstruct-lr", "1e-3"], "--reconstruct-lr applies only with --reconstruct layer, dense"),
        (["--reconstruct", "layer", "--pattern", "structured"], "--reconstruct layer applies to"),
        (["--reconstruct", "refit"], "--reconstruct refit applies to structured pruning"),
        (["--preset", "best", "--pattern", "structured"], "--preset best applies to unstructured and N:M"),
        (["--preset", "fastest"], "preset"),
    ],
)
def test_bad_options_are_refused_before_loading(capsys, files, tmp_path, no_model_loading, flags, message):
    result = invoke(capsys, *prune_args(files, "--output", tmp_path / "out", *flags))
    assert result.code == 2, result.err
    assert message in result.error_line, result.err
    assert result.error_line.startswith(ERROR)
