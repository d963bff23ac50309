"""Training-time pruning: schedules, masks that hold under AdamW, the Trainer callback, sparse fine-tuning
and ``llmprune finetune``."""

from __future__ import annotations

import json
import math

import pytest
import torch

import llmprune
from conftest import ERROR, VOCAB, invoke, tiny_model
from llmprune.export.save import METADATA_FILE
from llmprune.models.architecture import read_weight
from llmprune.training import (
    FinetuneOptions,
    GradualPruner,
    PruningCallback,
    Schedule,
    SparsityMasks,
    finetune_model,
    sparsity_at,
)
from llmprune.training.finetuning import adamw, distillation_loss
from llmprune.training.masks import linear_targets
from test_cli import save_tiny_llama


def repeating_windows(count: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Windows of one short repeated phrase, at random offsets: easy to learn, so the loss must fall."""
    phrase = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:7]
    stream = phrase.repeat(seqlen // 7 + 3)
    offsets = torch.randint(0, 7, (count,), generator=torch.Generator().manual_seed(seed + 1))
    return torch.stack([stream[int(o) : int(o) + seqlen] for o in offsets])


def group_nonzeros(weight: torch.Tensor, m: int) -> list[int]:
    """Non-zeros of every group of ``m`` consecutive inputs of every row, one group at a time."""
    counts = []
    for row in weight:
        for start in range(0, row.numel(), m):
            counts.append(int((row[start : start + m] != 0).sum()))
    return counts


# schedule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # before start: nothing pruned
        (9, 0.0),
        (10, 0.1),  # start: the initial sparsity
        (19, 0.1),  # held until the next update
        (35, 0.7 - 0.6 * (1 - 20 / 100) ** 3),  # last update at step 30
        (60, 0.7 - 0.6 * 0.5**3),
        (105, 0.7 - 0.6 * (1 - 90 / 100) ** 3),
        (110, 0.7),  # end
        (500, 0.7),
    ],
)
def test_cubic_schedule_matches_zhu_gupta(step, expected):
    schedule = Schedule(initial=0.1, final=0.7, start=10, end=110, frequency=10)
    assert schedule.sparsity(step) == pytest.approx(expected, abs=1e-12)


def test_linear_schedule_and_update_steps():
    assert sparsity_at(60, 0.1, 0.7, 10, 110, 10, "linear") == pytest.approx(0.1 + 0.6 * 0.5)
    assert sparsity_at(64, 0.0, 0.5, 0, 100, 1, "linear") == pytest.approx(0.32)
    schedule = Schedule(0.0, 0.5, start=3, end=10, frequency=3)
    assert [t for t in range(15) if schedule.update_step(t)] == [3, 6, 9, 10]
    assert schedule.sparsity(10) == 0.5  # the end is reached even when the frequency does not divide it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": 0.6, "final": 0.5}, "below the initial"),
        ({"start": 10, "end": 10}, "must come after the start"),
        ({"frequency": 0}, "frequency must be at least 1"),
    ],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(llmprune.UsageError, match=message):
        Schedule(**kwargs)


# masks under AdamW ------------------------------------------------------------------------------------


def train(model, pruner, steps: int, lr: float = 1e-2, seqlen: int = 16) -> list[float]:
    optimizer = pruner.optimizer
    windows = repeating_windows(steps * 2, seqlen)
    losses = []
    model.train()
    for step in range(steps):
        batch = windows[2 * step : 2 * step + 2]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights are stored transposed
@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_gradual_pruning_reaches_exact_sparsity_per_layer_and_holds(family, score):
    model = tiny_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = Schedule(0.0, 0.5, start=3, end=7, frequency=2)  # pruning starts once Adam has moments
    pruner = GradualPruner(model, schedule, optimizer, score=score)
    train(model, pruner, 5)
    middle = pruner.masks.overall()
    assert 0.0 < middle < 0.5
    train(model, pruner, 7)  # steps 6..12: the end at 7, then five steps more
    for name, module in linear_targets(model).items():
        weight = read_weight(module)
        if score == "magnitude":  # one threshold per matrix
            assert int((weight == 0).sum()) == round(weight.numel() * 0.5), name
        else:  # Wanda compares within each output row
            assert (weight == 0).sum(dim=1).tolist() == [round(weight.shape[1] * 0.5)] * weight.shape[0]
        assert torch.equal(weight == 0, pruner.masks.masks[name]), name  # every pruned weight exactly 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nm_groups_stay_valid_under_adamw(family):
    model = tiny_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner = GradualPruner(model, Schedule(0.0, 0.5, 2, 6, 2), optimizer, pattern="2:4", score="wanda")
    train(model, pruner, 4)
    counts = [c for module in linear_targets(model).values() for c in group_nonzeros(read_weight(module), 4)]
    assert min(counts) >= 2 and max(counts) == 4  # midway: at most 2 pruned per group, some groups whole
    train(model, pruner, 8)
    for name, module in linear_targets(model).items():
        assert set(group_nonzeros(read_weight(module), 4)) == {2}, name
    state = optimizer.state[next(iter(pruner.masks.targets.values())).weight]
    name, module = next(iter(pruner.masks.targets.items()))
    mask = pruner.masks.masks[name].t() if family == "gpt2" else pruner.masks.masks[name]
    assert not state["exp_avg"][mask].any() and not state["exp_avg_sq"][mask].any()


def test_without_optimizer_state_masking_adam_resurrects_weights():
    """The reason for zeroing Adam's moments: a weight pruned mid-training keeps moving without it."""
    model = tiny_model("llama")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    masks = SparsityMasks(model).attach()
    windows = repeating_windows(8, 16)
    for step in range(4):
        model(
            input_ids=windows[2 * step : 2 * step + 2], labels=windows[2 * step : 2 * step + 2]
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            masks.update(0.5)  # zeroes weights, masks gradients, but leaves Adam's state alone
    leaked = sum(int((read_weight(m)[masks.masks[n]] != 0).sum()) for n, m in masks.targets.items())
    assert leaked > 0
    masks.enforce(optimizer)
    assert all(not read_weight(m)[masks.masks[n]].any() for n, m in masks.targets.items())


# Trainer callback -------------------------------------------------------------------------------------


def test_callback_with_a_real_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama").train()
    windows = repeating_windows(16, 16)
    dataset = [{"input_ids": w, "labels": w} for w in windows]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    callback = PruningCallback(Schedule(0.0, 0.5, start=2, end=5, frequency=1))
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
    assert callback.pruner.steps == 8
    for name, module in linear_targets(model).items():
        weight = read_weight(module)
        assert int((weight == 0).sum()) == round(weight.numel() * 0.5), name
        assert torch.equal(weight == 0, callback.pruner.masks.masks[name])


# sparse fine-tuning -----------------------------------------------------------------------------------


def test_distillation_loss_is_kl_teacher_to_student():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    expected = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert distillation_loss(student, teacher, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("distill", [False, True])
def test_finetuning_lowers_loss_and_keeps_the_mask(distill):
    model = tiny_model("llama")
    teacher = tiny_model("llama") if distill else None
    windows = repeating_windows(40, 16)
    llmprune.prune(model, windows[:8], method="wanda", pattern="2:4")
    zeros = {n: read_weight(m) == 0 for n, m in linear_targets(model).items()}
    masks = SparsityMasks.from_zeros(model, "2:4")
    result = finetune_model(
        model, windows, steps=20, batch_size=2, seqlen=16, lr=3e-3, weight_decay=0.1, warmup=2,
        distill=distill, distill_weight=0.3, temperature=2.0, teacher=teacher, masks=masks,
    )  # fmt: skip
    assert sum(result.losses[-3:]) < 0.7 * sum(result.losses[:3])
    assert result.overall_sparsity == pytest.approx(0.5) and result.pattern == "2:4"
    for name, module in linear_targets(model).items():
        assert torch.equal(read_weight(module) == 0, zeros[name]), name


def test_adamw_takes_the_fused_kernel_where_torch_has_one():
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    optimizer = adamw(model, FinetuneOptions(lr=1e-3, weight_decay=0.1))
    assert optimizer.defaults["fused"] and optimizer.defaults["weight_decay"] == 0.1
    trained = optimizer.param_groups[0]["params"]
    assert len(trained) == sum(p.requires_grad for p in model.parameters()) < len(list(model.parameters()))
    assert adamw(model.to(torch.float64), FinetuneOptions()).defaults["fused"]  # any float dtype on CPU


# llmprune finetune ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny Llama with the real tokenizer, pruned 2:4 by ``llmprune prune`` (so it has llmprune.json)."""
    tokenizer = llmprune.load_tokenizer("smollm2")
    root = tmp_path_factory.mktemp("finetune")
    dense = save_tiny_llama(root / "dense", tokenizer)
    llmprune.run(
        llmprune.RunConfig(
            model=str(dense),
            pattern="2:4",
            nsamples=4,
            seqlen=32,
            eval_nsamples=0,
            output=str(root / "pruned"),
        )
    )
    return root


def test_cli_finetune_with_distillation_writes_checkpoints(capsys, pruned, tmp_path):
    output = tmp_path / "out"
    args = ["finetune", pruned / "pruned", "--steps", "4", "--seqlen", "32", "--batch-size", "2"]
    result = invoke(
        capsys, *args, "--distill", "--save-every", "2", "--eval-nsamples", "2", "--eval-seqlen", "32",
        "--output", output,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "sparsity 50.00% (2:4)" in result.out
    for directory, steps in ((output, 4), (tmp_path / "out-step2", 2)):
        metadata = json.loads((directory / METADATA_FILE).read_text())
        layers = metadata["sparsity"]["layers"]
        assert len(layers) == 14 and all(value == pytest.approx(0.5) for value in layers.values())
        assert metadata["finetune"]["teacher"] == str(pruned / "dense")  # from the pruned model's record
        model = llmprune.load(directory)
        weight = model.model.layers[0].mlp.down_proj.weight
        assert set(group_nonzeros(weight, 4)) <= {0, 1, 2}
        assert metadata["finetune"]["steps_done"] == steps
    assert math.isfinite(json.loads((output / METADATA_FILE).read_text())["perplexity"]["after"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gradual", "--initial", "0.6", "--final", "0.5"], "below the initial"),
        (["--gradual", "--start", "5", "--end", "3"], "must come after the start"),
        (["--gradual", "--frequency", "0"], "frequency: Input should be greater than or equal to 1"),
        (["--gradual", "--pattern", "2:3"], "not divisible by M=3"),
        (["--gradual", "--end", "50"], "past the last step"),
        (["--final", "0.5"], "final applies with --gradual"),
        (["--seqlen", "100000"], "--seqlen 100000 is longer than the context of"),
        (["--distill"], "--distill needs --teacher"),
    ],
)
def test_cli_bad_input_is_one_line_before_loading(capsys, pruned, tmp_path, no_model_loading, flags, message):
    model = pruned / ("dense" if flags == ["--distill"] else "pruned")
    result = invoke(capsys, "finetune", model, "--steps", "10", "--output", tmp_path / "o", *flags)
    assert message in result.error_line


def test_cli_short_data_file(capsys, pruned, tmp_path, no_model_loading):
    short = tmp_path / "short.txt"
    short.write_text("only a few words", encoding="utf-8")
    args = ["--data", short, "--seqlen", "32", "--eval-nsamples", "0", "--output", tmp_path / "o"]
    result = invoke(capsys, "finetune", pruned / "pruned", *args)
    assert result.error_line.startswith(ERROR + "fine-tuning data has")


def test_training_windows_come_from_the_calibration_part_only():
    """The embedded text's calibration part (first 70 %) and evaluation part (last 20 %) are disjoint."""
    from llmprune.data.text import embedded_text, evaluation_windows, tokens_for

    tokenizer = llmprune.load_tokenizer("smollm2")
    whole = torch.tensor(tokenizer(embedded_text())["input_ids"])
    calibration = tokens_for(tokenizer, "embedded", "calibration")
    assert torch.equal(calibration, whole[: len(calibration)])
    evaluation_starts = int(len(whole) * 0.8)  # where evaluation_data's windows begin
    assert len(calibration) < evaluation_starts
    first = evaluation_windows(whole[evaluation_starts:], 512, 1)[0]
    assert torch.equal(first, llmprune.evaluation_data(tokenizer, "embedded", 512, 1)[0])


@pytest.mark.slow
def test_finetuning_the_embedded_model_lowers_training_loss():
    from llmprune.data.text import tokens_for
    from llmprune.training.finetuning import training_windows

    model, tokenizer = llmprune.load("smollm2", device="cpu"), llmprune.load_tokenizer("smollm2")
    options = FinetuneOptions(steps=4, batch_size=2, seqlen=32, lr=1e-4, warmup=0)
    windows = training_windows(tokens_for(tokenizer, "embedded", "calibration"), options)[:2]
    SparsityMasks(model).update(0.5)  # magnitude 50 %: the loss has room to fall

    def loss() -> float:
        with torch.no_grad():
            return model(input_ids=windows, labels=windows).loss.item()

    before = loss()
    result = finetune_model(model, windows.repeat(options.steps, 1), options)
    assert loss() < before
    assert result.overall_sparsity == pytest.approx(0.5, abs=1e-6)


def test_cli_recipe_shares_the_options(capsys, pruned, tmp_path, no_model_loading):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps: 10\ngradual: true\nend: 50\n")
    base = ["finetune", pruned / "pruned", "--output", tmp_path / "o", "--recipe", recipe]
    assert "end step 50 is past the last step 10" in invoke(capsys, *base).error_line
    assert "past the last step" not in invoke(capsys, *base, "--end", "5", "--frequency", "0").error_line
    recipe.write_text("stepz: 10\n")
    assert "unknown option stepz" in invoke(capsys, *base).error_line
