"""The public API lined up: every entry point takes its config, keywords or both (keywords win); ``evaluate``
is what ``llmprune eval`` prints; the names renamed in 0.2 still work for a release, with a warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import llmprune
from conftest import invoke, tiny_calibration, tiny_llama_for, tiny_model
from llmprune.data.text import embedded_text
from llmprune.errors import UsageError
from llmprune.inference import bench as bench_module
from llmprune.models import loading


@pytest.fixture(scope="module")
def tokenizer():
    return llmprune.load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny Llama with the embedded model's tokenizer, saved; and a text file to calibrate on."""
    root = tmp_path_factory.mktemp("api")
    model = root / "tiny-llama"
    tiny_llama_for(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    text = root / "text.txt"
    text.write_text(embedded_text()[:20_000], encoding="utf-8")
    return {"model": model, "text": text}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_pruning(first, second) -> None:
    (model_a, report_a), (model_b, report_b) = first, second
    a, b = weights(model_a), weights(model_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [(r.name, r.achieved_sparsity) for r in report_a.layers] == [
        (r.name, r.achieved_sparsity) for r in report_b.layers
    ]


def pruned(options=None, **keywords):
    model = tiny_model("llama")
    return model, llmprune.prune(model, tiny_calibration(4, 16), options, **keywords)


# ---- prune --------------------------------------------------------------------------------------------


def test_prune_takes_options_or_keywords_alike():
    options = llmprune.PruneOptions(method="sparsegpt", sparsity=0.6, blocksize=16)
    by_options = pruned(options)
    assert_same_pruning(by_options, pruned(method="sparsegpt", sparsity=0.6, blocksize=16))
    assert by_options[1].achieved_sparsity == pytest.approx(0.6, abs=0.01)
    assert_same_pruning(pruned(), pruned(llmprune.PruneOptions()))  # the defaults: Wanda 50 %


def test_prune_keywords_override_the_options():
    options = llmprune.PruneOptions(method="sparsegpt", sparsity=0.6)
    two_four = pruned(method="sparsegpt", pattern="2:4")
    assert_same_pruning(pruned(options, pattern="2:4", sparsity=None), two_four)
    assert_same_pruning(pruned(options, method="magnitude"), pruned(method="magnitude", sparsity=0.6))
    assert options.method == "sparsegpt"  # not changed in place


def test_prune_validates_the_combination():
    with pytest.raises(UsageError, match=r"pattern 2:4 fixes sparsity at 0\.5; drop --sparsity 0\.6"):
        pruned(llmprune.PruneOptions(sparsity=0.6), pattern="2:4")
    with pytest.raises(UsageError, match="bogus: unknown option"):
        pruned(bogus=1)
    with pytest.raises(TypeError, match="expected a PruneOptions, got dict"):
        pruned({"method": "magnitude"})


def test_a_run_config_serves_as_prune_options():
    config = llmprune.RunConfig(method="magnitude", sparsity=0.3, nsamples=4)
    assert_same_pruning(pruned(config), pruned(method="magnitude", sparsity=0.3))


# ---- run, evaluate ------------------------------------------------------------------------------------


def run_options(saved, output: Path) -> dict:
    return {
        "model": str(saved["model"]),
        "calibration": str(saved["text"]),
        "nsamples": 4,
        "seqlen": 16,
        "eval_data": str(saved["text"]),
        "eval_nsamples": 2,
        "eval_seqlen": 32,
        "output": str(output),
    }


def test_run_takes_a_config_or_keywords(saved, tmp_path):
    options = run_options(saved, tmp_path / "a")
    by_config = llmprune.run(llmprune.RunConfig(**options))
    by_keywords = llmprune.run(**{**options, "output": str(tmp_path / "b")})
    overridden = llmprune.run(llmprune.RunConfig(**options), output=str(tmp_path / "c"), method="magnitude")
    assert isinstance(by_config, llmprune.RunReport)
    assert by_config.pruned_perplexity == by_keywords.pruned_perplexity
    assert by_config.report.achieved_sparsity == by_keywords.report.achieved_sparsity
    assert overridden.config.method == "magnitude" and overridden.output == tmp_path / "c"
    assert overridden.dense_perplexity == by_config.dense_perplexity


def test_a_run_checks_its_model_once(saved, tmp_path, monkeypatch):
    """The checkpoint directory is validated once, though the run reads its config, tokenizer and weights."""
    real, calls = loading.check_checkpoint_dir, []

    def counted(directory, **kwargs):
        calls.append(Path(directory))
        return real(directory, **kwargs)

    monkeypatch.setattr(loading, "check_checkpoint_dir", counted)
    llmprune.run(**run_options(saved, tmp_path / "out"))
    assert calls == [saved["model"]]
    calls.clear()
    llmprune.evaluate(model=str(saved["model"]), data=str(saved["text"]), nsamples=2, seqlen=32)
    assert calls == [saved["model"]]
    calls.clear()
    loading.check_model_name(str(saved["model"]))  # outside a job, every call checks
    loading.check_model_name(str(saved["model"]))
    assert len(calls) == 2


def test_run_metadata_is_recorded_the_same_way_by_a_sweep(saved, tmp_path):
    """A sweep's saved model carries the record ``llmprune prune`` writes for the same recipe."""
    options = run_options(saved, tmp_path / "run")
    options["method"] = "magnitude"
    single = llmprune.run(**options)
    sweep = llmprune.sweep(
        model=options["model"], methods=["magnitude"], sparsities=[0.5], calibration=options["calibration"],
        nsamples=4, seqlen=16, eval_data=options["eval_data"], eval_nsamples=2, eval_seqlen=32,
        output=str(tmp_path / "sweep"), save_models=True,
    )  # fmt: skip
    saved_record = json.loads((Path(sweep.cells[0]["model"]) / "llmprune.json").read_text())
    expected = single.metadata
    assert list(saved_record) == list(expected)
    assert saved_record["calibration"] == expected["calibration"]
    for key in ("data", "windows", "seqlen"):
        assert saved_record["perplexity"][key] == expected["perplexity"][key]
    assert saved_record["perplexity"]["dense"] == pytest.approx(expected["perplexity"]["dense"], rel=1e-6)
    assert saved_record["perplexity"]["pruned"] == pytest.approx(expected["perplexity"]["pruned"], rel=1e-6)
    assert saved_record["recipe"]["method"] == "magnitude"
    assert saved_record["report"]["achieved_sparsity"] == expected["report"]["achieved_sparsity"]


def test_evaluate_is_what_the_command_prints(capsys, saved):
    flags = {"data": str(saved["text"]), "nsamples": 2, "seqlen": 32}
    report = llmprune.evaluate(llmprune.EvalConfig(model=str(saved["model"]), **flags))
    assert isinstance(report, llmprune.EvalReport) and report.tasks is None
    args = ["eval", saved["model"], "--data", saved["text"], "--nsamples", 2, "--seqlen", 32]
    result = invoke(capsys, *args, "--json")
    assert result.code == 0, result.err
    printed = json.loads(result.out)
    measured = report.to_dict()
    assert printed["perplexity"].pop("seconds") > 0 and measured["perplexity"].pop("seconds") > 0
    assert printed == measured
    assert measured["perplexity"]["windows"] == 2 and measured["model"] == str(saved["model"])
    table = invoke(capsys, *args)
    assert f"perplexity {report.perplexity['value']:.3f} on {saved['text']} (2×32 tokens" in table.out
    by_keywords = llmprune.evaluate(model=str(saved["model"]), **flags)
    assert by_keywords.perplexity["value"] == report.perplexity["value"]


def test_evaluate_checks_before_loading(saved, no_model_loading):
    with pytest.raises(UsageError, match="--no-perplexity leaves nothing to measure"):
        llmprune.evaluate(model=str(saved["model"]), perplexity=False)
    with pytest.raises(UsageError, match=r"model path not found: \./nowhere"):
        llmprune.evaluate(model="./nowhere")
    with pytest.raises(UsageError, match="--seqlen 4096 is longer than the context"):
        llmprune.evaluate(model=str(saved["model"]), seqlen=4096)


# ---- bench --------------------------------------------------------------------------------------------


def test_bench_takes_a_config_or_keywords(monkeypatch):
    def clocked(*config, **keywords) -> llmprune.BenchReport:
        ticks = iter(range(0, 10_000, 2))  # every phase lasts 2 "seconds"
        monkeypatch.setattr(bench_module, "_clock", lambda: next(ticks))
        return llmprune.bench(*config, **keywords)

    def timings(report: llmprune.BenchReport) -> dict:
        figures = report.model
        return {"seconds": figures.seconds, "prefill": figures.prefill_tokens_per_s, "order": report.order}

    options = {"prompt_len": 8, "batch": 2, "new_tokens": 2, "repeats": 2, "warmup": 0}
    model = tiny_model("llama")
    by_keywords = clocked(model=model, **options)
    by_config = clocked(llmprune.BenchConfig(**options), model=model)
    assert isinstance(by_config, llmprune.BenchReport)
    assert by_config.settings == by_keywords.settings and timings(by_config) == timings(by_keywords)
    assert by_config.model.prefill_tokens_per_s == 2 * 8 / 2
    overridden = clocked(llmprune.BenchConfig(**options), model=model, batch=4)
    assert overridden.settings["batch"] == 4 and overridden.model.prefill_tokens_per_s == 4 * 8 / 2


def test_bench_takes_a_config_only_as_its_positional_argument():
    with pytest.raises(TypeError, match="expected a BenchConfig, got LlamaForCausalLM"):
        llmprune.bench(tiny_model("llama"))


# ---- the public names ---------------------------------------------------------------------------------


def test_training_names_are_all_exported_at_the_top():
    assert set(llmprune.training.__all__) <= set(llmprune.__all__)
    assert llmprune.FinetuneOptions is llmprune.training.config.FinetuneOptions
    assert llmprune.finetune is llmprune.training.finetuning.finetune


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("RunResult", "RunReport"),
        ("SweepResult", "SweepReport"),
        ("FinetuneResult", "FinetuneReport"),
        ("BenchResult", "BenchReport"),
        ("AccelerateReport", "SparseKernelsReport"),
        ("accelerate", "use_sparse_kernels"),
    ],
)
def test_renamed_names_still_work_with_a_warning(old, new):
    with pytest.warns(DeprecationWarning, match=rf"llmprune\.{old} is deprecated .*; use llmprune\.{new}"):
        value = getattr(llmprune, old)
    assert value is getattr(llmprune, new)
    assert old not in llmprune.__all__ and new in llmprune.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(llmprune, new)  # the new name does not warn


def test_the_old_loaders_still_load_with_a_warning(saved):
    with pytest.warns(DeprecationWarning, match=r"llmprune\.load_model is deprecated .*; use llmprune\.load"):
        model = llmprune.load_model(str(saved["model"]), "float32", "cpu")
    assert isinstance(model, torch.nn.Module) and not model.training
    with pytest.warns(DeprecationWarning, match=r"llmprune\.load_embedded_model is deprecated"):
        loader = llmprune.load_embedded_model
    assert callable(loader)
    assert "load_model" not in llmprune.__all__ and "load_embedded_model" not in llmprune.__all__


def test_sparse_kernels_report_summary():
    report = llmprune.SparseKernelsReport("cutlass", swapped=["a", "b"])
    assert report.summary() == "2:4 sparse kernels (cutlass): 2 linear layers swapped"
