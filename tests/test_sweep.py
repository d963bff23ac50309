"""``llmprune sweep`` on a tiny Llama: every file, exact restoration between cells, resume, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import llmprune
from conftest import invoke, tiny_llama_for
from llmprune.data.text import embedded_text
from llmprune.errors import UsageError
from llmprune.sweeps import runner

ERROR = "llmprune: error: "
FILES = (
    "results.csv",
    "results.json",
    "layer_sparsity.csv",
    "perplexity.png",
    "layer_sparsity.png",
    "report.html",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    tokenizer = llmprune.load_tokenizer("smollm2")
    model = tiny_llama_for(tokenizer)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    text = root / "text.txt"
    text.write_text(embedded_text()[:20_000], encoding="utf-8")
    return {"model": root / "tiny", "text": text}


def options(files, output: Path, **extra) -> dict:
    return {
        "model": str(files["model"]),
        "calibration": str(files["text"]),
        "eval_data": str(files["text"]),
        "nsamples": 4,
        "seqlen": 16,
        "eval_nsamples": 2,
        "eval_seqlen": 16,
        "output": str(output),
        **extra,
    }


def flags(values: dict) -> list[str]:
    args = []
    for name, value in values.items():
        args += [
            f"--{name.replace('_', '-')}",
            ",".join(map(str, value)) if isinstance(value, list) else str(value),
        ]
    return args


def test_sweep_writes_every_file_and_matches_standalone_runs(capsys, files, tmp_path):
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text("methods: [magnitude, wanda]\npatterns: [unstructured, 2:4]\nsave-models: true\n")
    output = tmp_path / "grid"
    code, out, err = invoke(
        capsys, "sweep", "--recipe", recipe, *flags(options(files, output, sparsities=[0.3, 0.6])), "--json"
    )
    assert code == 0, err
    results = json.loads(out)
    for name in FILES:
        assert (output / name).is_file(), name
    keys = ["magnitude-unstructured-0.3", "wanda-unstructured-0.3", "magnitude-unstructured-0.6"]
    keys += ["wanda-unstructured-0.6", "magnitude-2of4", "wanda-2of4"]
    assert [cell["key"] for cell in results["cells"]] == keys
    with open(output / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["key"] for row in rows] == keys
    assert json.loads(rows[0]["recipe"])["method"] == "magnitude"
    for cell in results["cells"]:
        assert cell["achieved_sparsity"] == pytest.approx(cell["target_sparsity"], abs=0.02)
        assert math.isfinite(cell["perplexity"]) and cell["perplexity"] > 1
        assert cell["recipe"]["nsamples"] == 4 and cell["recipe"]["pattern"] == cell["pattern"]
        assert {row["block"] for row in cell["layers"]} == {0, 1}
        assert Path(cell["model"], "config.json").is_file()
    for name in ("perplexity.png", "layer_sparsity.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (output / "report.html").read_text()
    assert '<table id="results">' in page and page.count("data:image/png;base64,") == 2
    assert all(f"<summary>{key}</summary>" in page for key in keys)
    assert "http://" not in page and "https://" not in page  # self-contained
    with open(output / "layer_sparsity.csv") as handle:
        assert next(csv.reader(handle)) == ["key", "layer_0", "layer_1"]
    table = (output / "results.md").read_text().splitlines()
    assert table[0] == "| perplexity | 30% | 60% | 2:4 |" and table[3].startswith("| magnitude | ")

    # Every cell started from the dense weights: the same figures as fresh, standalone runs.
    tokenizer = llmprune.load_tokenizer(str(files["model"]))
    calibration = llmprune.calibration_data(tokenizer, str(files["text"]), 4, 16, 0)
    evaluation = llmprune.evaluation_data(tokenizer, str(files["text"]), 16, 2)
    fresh = llmprune.load(str(files["model"]), "float32", "cpu")
    assert results["dense_perplexity"] == pytest.approx(llmprune.perplexity(fresh, evaluation), rel=1e-6)
    for key, method, pattern, sparsity in (
        ("wanda-unstructured-0.6", "wanda", "unstructured", 0.6),
        ("magnitude-2of4", "magnitude", "2:4", None),
    ):
        model = llmprune.load(str(files["model"]), "float32", "cpu")
        llmprune.prune(model, calibration, method=method, pattern=pattern, sparsity=sparsity)
        cell = next(c for c in results["cells"] if c["key"] == key)
        assert cell["perplexity"] == pytest.approx(llmprune.perplexity(model, evaluation), rel=1e-6), key


def test_interrupted_sweep_resumes_without_redoing_finished_cells(files, tmp_path, monkeypatch):
    output = tmp_path / "grid"
    config = options(
        files, output, methods=["magnitude", "wanda"], sparsities=[0.5], patterns=["unstructured", "2:4"]
    )
    calls = []
    real = runner.prune_model

    def crash_on_third(model, calibration, prune_options, *args, **kwargs):
        calls.append((prune_options.method, prune_options.pattern))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while pruning the third cell
        return real(model, calibration, prune_options, *args, **kwargs)

    monkeypatch.setattr(runner, "prune_model", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        llmprune.sweep(**config)
    finished = sorted(p.name for p in (output / "cells").iterdir())
    assert finished == ["magnitude-unstructured-0.5.json", "wanda-unstructured-0.5.json"]
    before = {name: (output / "cells" / name).read_text() for name in finished}
    assert not (output / "results.csv").exists()

    calls.clear()
    monkeypatch.setattr(runner, "prune_model", lambda *a, **k: (calls.append(a[2].method), real(*a, **k))[1])
    result = llmprune.sweep(**config)
    assert calls == ["magnitude", "wanda"]  # only the two unfinished cells were pruned
    assert result.computed == ["magnitude-2of4", "wanda-2of4"]
    assert {name: (output / "cells" / name).read_text() for name in finished} == before
    assert [c["key"] for c in result.cells] == [
        "magnitude-unstructured-0.5",
        "wanda-unstructured-0.5",
        "magnitude-2of4",
        "wanda-2of4",
    ]
    assert all((output / name).is_file() for name in FILES)

    # Nothing left to do: no model is loaded, the report is written again.
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    again = llmprune.sweep(**config)
    assert again.computed == [] and again.cells == result.cells

    with pytest.raises(UsageError, match=r"holds a sweep with other options \(nsamples, sparsities differ\)"):
        llmprune.sweep(**{**config, "sparsities": [0.6], "nsamples": 5})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "wanda,foo"], "methods.1: Input should be 'magnitude', 'wanda' or 'sparsegpt'"),
        (["--sparsities", "0.5,1.2"], "sparsities: sparsity must be in [0, 1), got 1.2"),
        (["--sparsities", "-0.1"], "sparsity must be in [0, 1), got -0.1"),
        (["--sparsities", "half"], "sparsities.0: Input should be a valid number"),
        (["--patterns", "structured"], "structured pruning cannot be swept"),
        (["--patterns", "2-4"], "pattern must be 'unstructured', 'structured' or 'N:M'"),
        (["--patterns", "3:7"], "input width 32 is not divisible by M=7"),
        (["--device", "gpu"], "device: device must be auto, cpu, mps, cuda or cuda:N"),
        (["--model", "./nope"], "model path not found: ./nope"),
        (["--calibration", "missing.txt"], "data source 'missing.txt' is neither a text file"),
        (["--output", "{file}"], "exists and is not a directory"),
        (["--output", "{dir}"], "exists and is not a sweep (no sweep.json)"),
        (["--bogus"], "No such option '--bogus'"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_loading(
    capsys, files, tmp_path, no_model_loading, extra, message
):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-dir" / "something").write_text("x")
    extra = [e.format(file=tmp_path / "a-file", dir=tmp_path / "a-dir") for e in extra]
    base = options(files, tmp_path / "grid")
    code, out, err = invoke(capsys, "sweep", *flags(base), *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR) and message in lines[0], err
    assert out == ""
    assert not (tmp_path / "grid").exists()  # nothing written for bad input


def test_quiet_prints_only_where_the_report_went(capsys, files, tmp_path):
    output = tmp_path / "q"
    code, out, err = invoke(
        capsys, "sweep", *flags(options(files, output, methods=["magnitude"], patterns=["2:4"])), "--quiet"
    )
    assert code == 0, err
    assert out == f"report: {output / 'report.html'}\n"
    assert err == ""
