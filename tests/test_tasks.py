"""lm-eval tasks on a model in memory: local tasks built in a temporary directory (no download)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import llmprune
from llmprune.errors import DataUnavailableError, UsageError
from llmprune.models import loading

pytest.importorskip("lm_eval")
from conftest import invoke, save_tiny_llama, tiny_llama_for
from llmprune.evaluation import tasks

QUESTIONS = [f"Question {i}: which word fits?" for i in range(4)]


def write_task(root: Path, name: str, docs: list[dict]) -> None:
    """A multiple-choice lm-eval task reading a local JSON-lines file through the ``json`` builder."""
    data = root / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(doc) for doc in docs) + "\n")
    (root / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    short, long = " yes", " no, not at all, never"
    # With every logit zero, a continuation's log-likelihood is -(its tokens)·log V: the shortest wins.
    write_task(root, "toy_short", [{"question": q, "choices": [short, long], "answer": 0} for q in QUESTIONS])
    write_task(root, "toy_long", [{"question": q, "choices": [short, long], "answer": 1} for q in QUESTIONS])
    letters = [" A", " B", " C", " D"]
    write_task(
        root,
        "toy_letters",
        [{"question": q, "choices": letters, "answer": i % 4} for i, q in enumerate(QUESTIONS)],
    )
    return root


@pytest.fixture(scope="module")
def manager(task_dir):
    return tasks.task_manager([task_dir], defaults=False)


def test_local_task_gives_an_accuracy(tokenizer, manager):
    scores = llmprune.evaluate_tasks(
        tiny_llama_for(tokenizer), tokenizer, ["toy_letters"], manager=manager, quiet=True
    )
    assert set(scores) == {"toy_letters"}
    assert set(scores["toy_letters"]) == {"acc", "acc_stderr"}
    accuracy = scores["toy_letters"]["acc"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    assert accuracy * len(QUESTIONS) == pytest.approx(round(accuracy * len(QUESTIONS)))  # k of 4 right


def test_scores_come_from_the_model_in_memory(tokenizer, manager):
    model = tiny_llama_for(tokenizer)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: the choice with fewer tokens is always preferred
    scores = tasks.evaluate_tasks(model, tokenizer, ["toy_short", "toy_long"], manager=manager, quiet=True)
    assert scores["toy_short"]["acc"] == 1.0
    assert scores["toy_long"]["acc"] == 0.0
    assert not model.training


def test_unknown_task_lists_the_valid_ones(manager):
    with pytest.raises(
        UsageError, match=r"unknown task 'toy_shrt'; valid tasks: toy_letters, toy_long, toy_short"
    ):
        tasks.check_task_names(["toy_short", "toy_shrt"], manager)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "tiny", tokenizer)


@pytest.fixture
def local_tasks_only(monkeypatch, task_dir):
    real = tasks.task_manager
    monkeypatch.setattr(tasks, "task_manager", lambda include=(): real(include, defaults=False))


def test_cli_eval_tasks_json(capsys, saved_model, task_dir, local_tasks_only):
    code, out, err = invoke(
        capsys,
        "eval",
        saved_model,
        "--tasks",
        "toy_letters",
        "--task-dir",
        task_dir,
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == str(saved_model)
    assert math.isfinite(result["perplexity"]["value"]) and result["perplexity"]["windows"] == 2
    assert 0.0 <= result["tasks"]["toy_letters"]["acc"] <= 1.0


def test_cli_eval_tasks_table(capsys, saved_model, task_dir, local_tasks_only):
    code, out, err = invoke(
        capsys, "eval", saved_model, "--tasks", "toy_short", "--task-dir", task_dir, "--no-perplexity", "-q"
    )
    assert code == 0, err
    assert "perplexity" not in out and "toy_short" in out and "acc" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "toy_shrt"], "unknown task 'toy_shrt'; valid tasks: toy_letters, toy_long, toy_short"),
        (["--tasks", "toy_short", "--task-dir", "nowhere"], "task directory not found: nowhere"),
        (["--no-perplexity"], "--no-perplexity leaves nothing to measure; give --tasks"),
        (
            ["--tasks", "toy_short", "--num-fewshot", "-1"],
            "num_fewshot: Input should be greater than or equal to 0",
        ),
    ],
)
def test_cli_bad_task_input_exit_2_before_loading(
    capsys, saved_model, task_dir, local_tasks_only, no_model_loading, args, message
):
    if "--task-dir" not in args:
        args += ["--task-dir", str(task_dir)]
    code, out, err = invoke(capsys, "eval", saved_model, *args)
    assert code == 2 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: ") and message in lines[0], err


@pytest.mark.slow
def test_lm_eval_own_tasks_offline(monkeypatch, tmp_path):
    """lm-eval's real index: a misspelt name suggests the right one; arc_easy offline names its dataset."""
    datasets_config = pytest.importorskip("datasets.config")
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    manager = tasks.task_manager()
    with pytest.raises(UsageError, match=r"unknown task 'arc_eazy'; closest valid names: .*arc_easy"):
        tasks.check_task_names(["arc_eazy"], manager)
    with pytest.raises(DataUnavailableError) as error:
        tasks.load_tasks(["arc_easy"], manager)
    message = str(error.value)
    assert "cannot load the datasets of arc_easy" in message and "allenai/ai2_arc (ARC-Easy)" in message
    assert "HF_DATASETS_OFFLINE=1" in message and "\n" not in message
