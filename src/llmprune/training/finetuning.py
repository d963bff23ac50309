"""Sparse fine-tuning: train a pruned model on a language-modelling loss (optionally distilling from the
dense model) while its mask holds exactly; or prune gradually while training. Checkpoints are plain
Hugging Face checkpoints with their sparsity recorded in ``llmprune.json``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.data.text import calibration_windows, evaluation_data, tokens_for
from llmprune.errors import LlmpruneError, NonFiniteError, UsageError
from llmprune.evaluation.perplexity import perplexity
from llmprune.export.save import write_model_metadata
from llmprune.jobs import configured, perplexity_record, preflight, run_metadata
from llmprune.methods.patterns import Pattern, n_m_violations
from llmprune.models.loading import check_model_name, load_plain_model, load_tokenizer, models_checked_once
from llmprune.storage import check_output, prepare_output, read_metadata, staged_directory
from llmprune.training.config import FinetuneConfig, FinetuneOptions
from llmprune.training.masks import SparsityMasks, check_pattern_fits, linear_targets
from llmprune.training.pruner import GradualPruner

StepCallback = Callable[[int, float, nn.Module], None]
"""Called after every optimizer step with the step number (1-based), its loss and the model."""


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over token positions (Hinton et al.,
    arXiv 1503.02531: the T² keeps the gradient scale independent of T)."""
    vocab = student.shape[-1]
    student = F.log_softmax(student.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher.reshape(-1, vocab).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def training_windows(tokens: torch.Tensor, options: FinetuneOptions) -> torch.Tensor:
    """``[steps * batch_size, seqlen]`` windows at seeded random positions of ``tokens``."""
    if len(tokens) < options.seqlen:
        raise UsageError(
            f"fine-tuning data has {len(tokens)} tokens, shorter than one sequence of {options.seqlen}"
        )
    return calibration_windows(tokens, options.steps * options.batch_size, options.seqlen, options.seed)


@dataclass
class FinetuneReport:
    """What training did: the loss of every step, wall and CPU (all threads) time per training step (hooks
    in ``on_step`` excluded) and the sparsity it ended with."""

    losses: list[float]
    seconds_per_step: float
    cpu_seconds_per_step: float
    sparsity: dict[str, float]
    overall_sparsity: float
    pattern: str
    metadata: dict[str, Any] = field(default_factory=dict)
    output: Path | None = None


class DivergedError(NonFiniteError):
    """Training produced a non-finite loss or non-finite weights at ``step``; nothing was saved from it.
    ``updated``: whether an optimizer step came before (only then can a lower learning rate help)."""

    def __init__(self, step: int, problem: str, updated: bool = True) -> None:
        super().__init__(f"fine-tuning diverged at step {step}: {problem}")
        self.step, self.problem, self.updated = step, problem, updated


def nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding NaN or Inf, or None (one device sync when all are finite)."""
    named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return None
    device = named[0][1].device
    sums = torch.stack([p.detach().sum(dtype=torch.float32).to(device) for _, p in named])
    if bool(torch.isfinite(sums).all()):  # a sum is NaN/Inf if any element is (or if it overflows)
        return None
    return next((name for name, p in named if not bool(torch.isfinite(p.detach()).all())), None)


def check_finite_weights(model: nn.Module, step: int) -> None:
    """Raise ``DivergedError`` if the weights after ``step`` hold NaN or Inf: never save such a model."""
    name = nonfinite_parameter(model)
    if name is not None:
        raise DivergedError(step, f"the weights of {name} are not finite")


def check_nm(masks: SparsityMasks, pattern: Pattern) -> None:
    """Raise if any group of M weights holds more than N non-zeros (the masks guarantee it never does for
    finite weights, so this is an internal error)."""
    if not pattern.is_nm:
        return
    from llmprune.models.architecture import read_weight

    for name, module in masks.targets.items():
        if n_m_violations(read_weight(module), pattern.n, pattern.m).any():
            raise LlmpruneError(f"internal error: {name} breaks the {pattern} pattern after training")


def adamw(model: nn.Module, options: FinetuneOptions) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with torch's fused kernel where it exists: one pass per tensor
    instead of a dozen, ~5x faster on the CPU (where sqrt of a pruned weight's zero moment is also slow)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay, fused=fused or None)


def finetune_model(
    model: nn.Module,
    windows: torch.Tensor,
    options: FinetuneOptions | None = None,
    *,
    teacher: nn.Module | None = None,
    masks: SparsityMasks | None = None,
    on_step: StepCallback | None = None,
    **values: Any,
) -> FinetuneReport:
    """Train ``model`` in place on token ``windows`` (``[steps * batch_size, seqlen]``) with AdamW.

    Without ``gradual`` the mask is the model's zeros (or ``masks``) and holds exactly; with ``gradual``
    the model is pruned on the options' schedule. ``teacher`` is needed when ``distill`` is set.
    A non-finite loss (checked every step) or non-finite weights at the end raise ``DivergedError``.
    """
    options = configured(FinetuneOptions, options, values)
    if options.distill and teacher is None:
        raise UsageError("distillation needs a teacher model")
    bad = nonfinite_parameter(model)
    if bad is not None:
        raise NonFiniteError(f"NaN or Inf in the weights of {bad} before fine-tuning")
    schedule = options.schedule()
    if schedule is None:
        masks = masks or SparsityMasks.from_zeros(model)
    torch.manual_seed(options.seed)
    optimizer = adamw(model, options)
    warmup = options.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    pruner = GradualPruner(
        model, schedule, optimizer, pattern=options.pattern, score=options.score, masks=masks
    )
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    losses: list[float] = []
    wall = cpu = 0.0
    try:
        for step in range(1, options.steps + 1):
            started, started_cpu = time.perf_counter(), time.process_time()
            batch = windows[(step - 1) * options.batch_size : step * options.batch_size].to(device)
            output = model(input_ids=batch, labels=batch, use_cache=False)
            loss = output.loss
            if options.distill:
                with torch.no_grad():
                    target = teacher(input_ids=batch, use_cache=False).logits
                kl = distillation_loss(output.logits, target, options.temperature)
                loss = (1 - options.distill_weight) * loss + options.distill_weight * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            if not math.isfinite(value):
                raise DivergedError(step, f"the loss is {value}", updated=step > 1)
            pruner.step(step)
            losses.append(value)
            wall += time.perf_counter() - started
            cpu += time.process_time() - started_cpu
            if on_step is not None:
                model.eval()
                on_step(step, losses[-1], model)
                model.train()
    finally:
        pruner.remove()
        model.train(was_training)
    check_finite_weights(model, options.steps)
    check_nm(pruner.masks, pruner.masks.pattern)
    steps = max(1, len(losses))
    return FinetuneReport(
        losses,
        wall / steps,
        cpu / steps,
        pruner.masks.sparsity(),
        pruner.masks.overall(),
        str(pruner.masks.pattern),
    )


def default_teacher(model: str) -> str | None:
    """The dense model a pruned checkpoint came from, as its ``llmprune.json`` records it."""
    if not Path(model).is_dir():
        return None
    recipe = read_metadata(model).get("recipe") or {}
    return recipe.get("model")


def recorded_pattern(model: str) -> Pattern:
    """The N:M pattern a pruned checkpoint records (its mask is checked against it), else unstructured."""
    recipe = (read_metadata(model).get("recipe") or {}) if Path(model).is_dir() else {}
    pattern = Pattern.parse(str(recipe.get("pattern", "unstructured")))
    return pattern if pattern.is_nm else Pattern()


def sparsity_metadata(result: FinetuneReport) -> dict[str, Any]:
    return {"overall": result.overall_sparsity, "pattern": result.pattern, "layers": result.sparsity}


def save_checkpoint(model, tokenizer, output: Path, metadata: dict[str, Any], overwrite: bool) -> Path:
    """An ordinary Hugging Face checkpoint plus ``llmprune.json``, written atomically."""
    with staged_directory(output, overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_model_metadata(staging, metadata)
    return output


def finetune(
    config: FinetuneConfig | None = None, /, *, on_step: StepCallback | None = None, **overrides: Any
) -> FinetuneReport:
    """``llmprune finetune``: load MODEL, fine-tune it keeping its sparsity (or prune it gradually), save.

    Takes a ``FinetuneConfig``, or its fields as keywords (which override ``config``'s). Cheap checks
    (options, paths, data length, N:M widths, teacher) come before any model is loaded, and the output is
    held (``prepare_output``) until the last save. Returns a ``FinetuneReport`` with perplexities in its
    metadata.
    """
    config = configured(FinetuneConfig, config, overrides)
    # the output is held until the last save
    with prepare_output(config.output_path(), config.overwrite), models_checked_once():
        return _finetune(config, on_step)


def _finetune(config: FinetuneConfig, on_step: StepCallback | None) -> FinetuneReport:
    output = config.output_path()
    for step in config.checkpoint_steps():
        check_output(config.checkpoint_path(step), config.overwrite)
    teacher_name, pattern = None, Pattern()

    def check_teacher() -> None:
        nonlocal teacher_name
        teacher_name = config.teacher or (default_teacher(config.model) if config.distill else None)
        if config.distill and teacher_name is None:
            raise UsageError(
                f"--distill needs --teacher: {config.model} has no llmprune.json recording its dense model"
            )
        if teacher_name is not None:
            check_model_name(teacher_name, tokenizer=False)  # the student's tokenizer serves both

    def check_pattern(skeleton: nn.Module) -> None:  # the N:M widths of the layers to keep sparse
        nonlocal pattern
        pattern = Pattern.parse(config.pattern) if config.gradual else recorded_pattern(config.model)
        check_pattern_fits(linear_targets(skeleton), pattern)

    checked = preflight(
        config.model,
        config.device,
        sources=[config.data],
        windows=config.windows(),
        checks=check_teacher,
        skeleton_checks=check_pattern,
    )
    if config.distill:
        preflight(teacher_name, checked.device, windows={"--seqlen": config.seqlen}, tokenizer=False)
    tokenizer = load_tokenizer(config.model)
    windows = training_windows(tokens_for(tokenizer, config.data, "calibration"), config)
    evaluation = (
        evaluation_data(tokenizer, "embedded", config.eval_seqlen, config.eval_nsamples)
        if config.eval_nsamples
        else None
    )

    model = load_plain_model(config.model, config.dtype, config.device)
    teacher = load_plain_model(teacher_name, config.dtype, config.device) if config.distill else None
    before = perplexity(model, evaluation) if evaluation is not None else None
    source = read_metadata(config.model) if Path(config.model).is_dir() else {}

    def metadata(result: FinetuneReport | None, steps: int, after: float | None = None) -> dict[str, Any]:
        return run_metadata(
            source.get("recipe"),
            finetune={**config.model_dump(), "teacher": teacher_name, "steps_done": steps},
            sparsity=sparsity_metadata(result) if result else None,
            perplexity=perplexity_record(
                "embedded", evaluation, config.eval_seqlen, before=before, after=after
            ),
        )

    masks = None if config.gradual else SparsityMasks.from_zeros(model, pattern)
    saves = set(config.checkpoint_steps())
    saved: list[Path] = []

    def each_step(step: int, loss: float, trained: nn.Module) -> None:
        if step in saves:
            check_finite_weights(trained, step)
            partial = FinetuneReport(
                [], 0.0, 0.0, masks_now.sparsity(), masks_now.overall(), str(masks_now.pattern)
            )
            path = config.checkpoint_path(step)
            saved.append(save_checkpoint(trained, tokenizer, path, metadata(partial, step), True))
        if on_step is not None:
            on_step(step, loss, trained)

    masks_now = masks or SparsityMasks(model, pattern)
    try:
        result = finetune_model(
            model, windows, config.options(), teacher=teacher, masks=masks, on_step=each_step
        )
    except DivergedError as exc:
        kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
        hint = " (lower --lr)" if exc.updated else ""
        raise DivergedError(exc.step, f"{exc.problem}; {kept}{hint}", exc.updated) from None
    after = perplexity(model, evaluation) if evaluation is not None else None
    result.metadata = metadata(result, config.steps, after)
    result.metadata["losses"] = {"first": result.losses[0], "last": result.losses[-1]}
    result.output = save_checkpoint(model, tokenizer, output, result.metadata, config.overwrite)
    return result
