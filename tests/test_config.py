"""Option validation (llmprune.config): ranges, patterns, conflicts, recipes, and the API's keywords."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import llmprune
from conftest import tiny_calibration, tiny_model
from llmprune import api
from llmprune.cli.options import config_options, given
from llmprune.config import EvalConfig, Group, PruneOptions, RunConfig, build, fields_in, read_recipe
from llmprune.errors import UsageError
from llmprune.sweeps.config import SHARED_FIELDS, SweepConfig
from llmprune.training.config import FinetuneConfig, FinetuneOptions

# A valid, non-default value for every PruneOptions field (unstructured, so schedules are allowed).
NON_DEFAULTS = {
    "method": "sparsegpt",
    "sparsity": 0.4,
    "pattern": "unstructured",
    "include": ["*.mlp.*", "*.self_attn.q_proj"],
    "exclude": ["*.down_proj"],
    "layer_sparsity": {r"q_proj": 0.3},
    "schedule": "owl",
    "schedule_spread": 0.05,
    "owl_threshold": 4.0,
    "owl_lambda": 0.1,
    "true_sequential": True,
    "blocksize": 16,
    "damp": 0.02,
    "refine": ["swaps", "resolve"],
    "refine_iterations": 10,
    "swap_rounds": 5,
    "reconstruct_steps": 4,
    "reconstruct_lr": 1e-3,
    "preset": "best",
    "magnitude_scope": "row",
    "units": ["channels"],
    "unit_score": "wanda",
    "reconstruct": "dense",
    "head_mode": "groups",
    "widths": "uniform",  # adaptive needs pattern=structured; test_structured passes it through the API
    "batch_size": 2,
    "error_tokens": 64,
}


def usage_error(model_class, values) -> str:
    with pytest.raises(UsageError) as raised:
        build(model_class, values)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_defaults():
    options = RunConfig()
    assert (options.method, options.pattern, options.target_sparsity) == ("wanda", "unstructured", 0.5)
    assert options.model == "smollm2" and options.calibration == "embedded"
    assert EvalConfig().model == "smollm2"


@pytest.mark.parametrize("value", [1.0, -0.1, "abc", 1.5])
def test_sparsity_outside_unit_interval(value):
    assert usage_error(RunConfig, {"sparsity": value}).startswith("sparsity: ")


@pytest.mark.parametrize("value", [0.0, 0.5, "0.9", 0.999])
def test_sparsity_inside_unit_interval(value):
    assert build(RunConfig, {"sparsity": value}).target_sparsity == float(value)


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("0:4", "0 < N < M"), ("2-4", "'2-4'"), ("dense", "N:M")],
)
def test_bad_patterns(pattern, problem):
    message = usage_error(RunConfig, {"pattern": pattern})
    assert message.startswith("pattern: ") and problem in message


@pytest.mark.parametrize(("pattern", "sparsity"), [("2:4", 0.5), (" 1 : 4 ", 0.75), ("4:8", 0.5)])
def test_nm_pattern_implies_sparsity(pattern, sparsity):
    options = build(PruneOptions, {"pattern": pattern})
    assert options.pattern == pattern.replace(" ", "")
    assert options.target_sparsity == sparsity
    assert build(PruneOptions, {"pattern": pattern, "sparsity": sparsity}).target_sparsity == sparsity


def test_nm_pattern_conflicts():
    assert "fixes sparsity at 0.5" in usage_error(RunConfig, {"pattern": "2:4", "sparsity": 0.6})
    assert "unstructured pruning only" in usage_error(RunConfig, {"pattern": "2:4", "schedule": "depth"})
    assert "unstructured pruning only" in usage_error(
        RunConfig, {"pattern": "2:4", "layer_sparsity": ["a=0.1"]}
    )


def test_unknown_options_and_choices():
    assert usage_error(RunConfig, {"bogus_key": 1}) == "bogus_key: unknown option"
    assert usage_error(RunConfig, {"method": "obs"}).startswith("method: ")
    assert usage_error(RunConfig, {"dtype": "float64"}).startswith("dtype: ")
    assert usage_error(EvalConfig, {"pattern": "2:4"}) == "pattern: unknown option"


def test_several_problems_in_one_line():
    message = usage_error(RunConfig, {"nsamples": 0, "seqlen": 1})
    assert "nsamples: " in message and "; seqlen: " in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_devices(device):
    assert build(RunConfig, {"device": device}).device == device


def test_bad_device():
    assert "device must be" in usage_error(RunConfig, {"device": "gpu0"})


def test_layer_sparsity_forms():
    options = build(PruneOptions, {"layer_sparsity": ["self_attn\\.(q|k)_proj=0.7", "mlp=0.2"]})
    assert options.layer_sparsity == {"self_attn\\.(q|k)_proj": 0.7, "mlp": 0.2}
    assert build(PruneOptions, {"layer_sparsity": "a=b=0.1"}).layer_sparsity == {"a=b": 0.1}
    assert "REGEX=SPARSITY" in usage_error(PruneOptions, {"layer_sparsity": ["q_proj"]})
    assert "bad regex" in usage_error(PruneOptions, {"layer_sparsity": ["(q=0.5"]})
    assert "must be in [0, 1)" in usage_error(PruneOptions, {"layer_sparsity": ["q=1.0"]})


def test_globs_split_on_commas():
    options = build(PruneOptions, {"include": ["*.q_proj, *.k_proj", "*.v_proj"], "exclude": "*.o_proj"})
    assert options.include == ["*.q_proj", "*.k_proj", "*.v_proj"]
    assert options.exclude == ["*.o_proj"]


def test_depth_schedule_bounds():
    assert build(PruneOptions, {"schedule": "depth", "sparsity": 0.5}).schedule_spread == 0.1
    assert "outside [0, 1)" in usage_error(PruneOptions, {"schedule": "depth", "sparsity": 0.95})
    assert "outside [0, 1)" in usage_error(
        PruneOptions, {"schedule": "depth", "sparsity": 0.1, "schedule_spread": 0.2}
    )


def test_default_output_path():
    assert RunConfig().output_path() == Path("pruned-smollm2-wanda-0.5")
    assert RunConfig(model="org/Model/", method="sparsegpt", pattern="2:4").output_path() == Path(
        "pruned-Model-sparsegpt-2of4"
    )
    assert RunConfig(model="x/m.gguf", sparsity=0.7).output_path() == Path("pruned-m-wanda-0.7")
    assert RunConfig(output="somewhere").output_path() == Path("somewhere")


def test_prune_options_carries_every_algorithm_field():
    config = RunConfig(**NON_DEFAULTS, model="m", nsamples=3)
    options = config.prune_options()
    assert type(options) is PruneOptions
    assert options.model_dump() == PruneOptions(**NON_DEFAULTS).model_dump()


def test_recipe_values_with_dashes_or_underscores(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "method: sparsegpt\npattern: '2:4'\ntrue-sequential: true\nbatch_size: 4\nexclude: ['*.o_proj']\n"
    )
    values = read_recipe(path)
    assert values == {
        "method": "sparsegpt",
        "pattern": "2:4",
        "true_sequential": True,
        "batch_size": 4,
        "exclude": ["*.o_proj"],
    }
    config = build(RunConfig, values)
    assert (config.method, config.pattern, config.true_sequential, config.batch_size) == (
        "sparsegpt",
        "2:4",
        True,
        4,
    )


@pytest.mark.parametrize(("written", "pattern"), [("2:4", "2:4"), ("4:8", "4:8"), ("1:4", "1:4")])
def test_recipe_unquoted_pattern_is_not_base_60(tmp_path, written, pattern):
    """YAML 1.1 reads 2:4 as the sexagesimal integer 124; a recipe must mean the pattern."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"pattern: {written}\nnsamples: 8\ndamp: 0.5\n")
    values = read_recipe(path)
    assert values == {"pattern": pattern, "nsamples": 8, "damp": 0.5}
    assert build(RunConfig, values).pattern == pattern


def test_recipe_errors(tmp_path):
    with pytest.raises(UsageError, match="recipe not found"):
        read_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML") as raised:
        read_recipe(bad)
    assert "\n" not in str(raised.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- method\n- wanda\n")
    with pytest.raises(UsageError, match="must be a mapping"):
        read_recipe(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_recipe(empty) == {}
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("method: wanda\nno-such-key: 1\nrecipe: x.yaml\n")
    with pytest.raises(UsageError, match=r"recipe .*unknown.yaml: unknown options no-such-key, recipe$"):
        read_recipe(unknown)


def test_api_prune_accepts_every_prune_options_field(monkeypatch):
    assert set(NON_DEFAULTS) == set(PruneOptions.model_fields), "add new fields to NON_DEFAULTS"
    received = {}
    monkeypatch.setattr(
        api, "prune_model", lambda model, calibration, config, progress: received.update(c=config)
    )
    llmprune.prune(None, None, **NON_DEFAULTS)
    assert received["c"].model_dump() == PruneOptions(**NON_DEFAULTS).model_dump()
    with pytest.raises(UsageError, match="bogus: unknown option"):
        llmprune.prune(None, None, bogus=1)
    parameters = inspect.signature(llmprune.prune).parameters
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_api_prune_with_keywords_on_a_tiny_model():
    model = tiny_model("llama")
    report = llmprune.prune(
        model,
        tiny_calibration(4, 16),
        method="sparsegpt",
        pattern="2:4",
        true_sequential=True,
        blocksize=32,
        exclude=["*.down_proj"],
    )
    assert report.layers and all(r.achieved_sparsity == pytest.approx(0.5) for r in report.layers)
    assert not any(r.name.endswith("down_proj") for r in report.layers)


# --- field groups: the lists of fields are read from the fields --------------------------------------------


def test_field_groups():
    output = ["output", "overwrite", "save_format", "resume", "offload", "max_memory"]
    assert fields_in(RunConfig, Group.OUTPUT) == output
    assert fields_in(RunConfig, Group.EVALUATION) == ["eval_data", "eval_nsamples", "eval_seqlen"]
    unstructured = ["layer_sparsity", "schedule", "schedule_spread", "owl_threshold", "owl_lambda"]
    assert fields_in(RunConfig, Group.UNSTRUCTURED) == unstructured
    refine = ["refine", "refine_iterations", "swap_rounds", "reconstruct_steps", "reconstruct_lr"]
    assert fields_in(RunConfig, Group.REFINE) == refine
    structured = ["units", "unit_score", "head_mode", "widths"]
    assert fields_in(RunConfig, Group.STRUCTURED) == structured
    assert fields_in(SweepConfig, Group.OUTPUT) == ["output", "save_models"]
    gradual = ["initial", "final", "start", "end", "frequency", "curve", "score", "pattern"]
    assert fields_in(FinetuneOptions, Group.GRADUAL) == fields_in(FinetuneConfig, Group.GRADUAL) == gradual


def test_the_recipe_is_every_field_but_output_and_evaluation():
    recipe = RunConfig(output="o", eval_nsamples=0, resume=True, max_memory="1GiB").pruning_recipe()
    left_out = {"output", "overwrite", "save_format", "resume", "offload", "max_memory"}
    left_out |= {"eval_data", "eval_nsamples", "eval_seqlen"}
    assert list(recipe) == [name for name in RunConfig.model_fields if name not in left_out]
    assert recipe["sparsity"] == 0.5 and recipe["unit_score"] == "flap"


def test_a_sweep_shares_the_run_options_that_apply_to_every_cell():
    run = ["model", "calibration", "nsamples", "seqlen", "seed", "dtype", "device"]
    refine = ["refine", "refine_iterations", "swap_rounds", "reconstruct_steps", "reconstruct_lr", "preset"]
    algorithm = ["include", "exclude", "true_sequential", "blocksize", "damp", *refine, "magnitude_scope"]
    algorithm.append("reconstruct")
    shared = (*run, "eval_data", "eval_seqlen", *algorithm, "batch_size", "error_tokens")
    assert shared == SHARED_FIELDS
    assert SweepConfig(output="a", save_models=True).identity() == SweepConfig(output="b").identity()


def test_gradual_options_need_gradual():
    assert usage_error(FinetuneConfig, {"score": "wanda", "curve": "linear"}) == (
        "curve, score apply with --gradual"
    )
    assert usage_error(FinetuneConfig, {"end": 5}) == "end applies with --gradual"
    assert build(FinetuneConfig, {"steps": 5, "lr": 1e-4}).schedule() is None


# --- unit_score: the structured unit score, once called score --------------------------------------------


def test_unit_score_keeps_its_old_name_as_a_keyword_and_in_recipes(tmp_path):
    assert build(PruneOptions, {"score": "wanda"}).unit_score == "wanda"
    assert build(RunConfig, {"unit_score": "magnitude"}).unit_score == "magnitude"
    assert build(RunConfig, {"score": "wanda"}).prune_options().unit_score == "wanda"
    assert usage_error(RunConfig, {"score": "bogus"}).startswith("score: Input should be 'magnitude'")
    assert usage_error(RunConfig, {"score": "wanda", "unit_score": "flap"}) == (
        "unit_score is given twice (as unit_score and score)"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text("pattern: structured\nscore: wanda\n")
    assert read_recipe(path) == {"pattern": "structured", "unit_score": "wanda"}
    path.write_text("score: wanda\nunit-score: flap\n")
    with pytest.raises(UsageError, match=r"option unit_score is given twice \(as score and unit-score\)$"):
        read_recipe(path)


def test_a_field_s_old_name_is_also_its_flag():
    @click.command()
    @config_options(PruneOptions)
    def show(**flags):
        click.echo(json.dumps(given(flags)))

    runner = CliRunner()
    for flag in ("--score", "--unit-score"):
        result = runner.invoke(show, [flag, "wanda"])
        assert result.exit_code == 0 and json.loads(result.output) == {"unit_score": "wanda"}, result.output
    assert "--unit-score, --score [magnitude|wanda|flap]" in runner.invoke(show, ["--help"]).output
