"""Options of sparse fine-tuning and gradual pruning, defined once for the CLI, YAML recipes and the API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from llmprune.config import (
    Count,
    DataSource,
    Device,
    DType,
    EvalSeqlen,
    Group,
    ModelName,
    Seed,
    StrictModel,
    WindowLength,
    fields_in,
)
from llmprune.methods.patterns import Pattern
from llmprune.training.schedule import Schedule, schedule_problem


class FinetuneOptions(StrictModel):
    """The training itself: what ``finetune_model`` accepts."""

    steps: Count = Field(100, ge=1, description="optimizer steps")
    lr: float = Field(2e-5, gt=0.0, description="AdamW learning rate (constant after warm-up)")
    warmup: Count = Field(10, ge=0, description="steps of linear learning-rate warm-up")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    batch_size: Count = Field(4, ge=1, description="token windows per step")
    seqlen: WindowLength = Field(128, description="tokens per training window")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    seed: Seed = Field(0, description="seed for drawing training windows")
    distill: bool = Field(False, description="add distillation from the dense teacher: KL on logits")
    temperature: float = Field(1.0, gt=0.0, description="distillation softmax temperature")
    distill_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="loss = (1 - w)·LM + w·T²·KL(teacher ‖ student)"
    )
    gradual: bool = Field(
        False, description="prune gradually while training (Zhu & Gupta) instead of keeping the model's zeros"
    )
    initial: Annotated[float, Group.GRADUAL] = Field(
        0.0, ge=0.0, lt=1.0, description="gradual: sparsity at the start step"
    )
    final: Annotated[float | None, Group.GRADUAL] = Field(
        None, ge=0.0, lt=1.0, description="gradual: sparsity at the end step (default 0.5, or 1-N/M)"
    )
    start: Annotated[Count, Group.GRADUAL] = Field(0, ge=0, description="gradual: first pruning step")
    end: Annotated[Count | None, Group.GRADUAL] = Field(
        None, ge=0, description="gradual: step reaching the final sparsity [default: steps]"
    )
    frequency: Annotated[Count, Group.GRADUAL] = Field(
        10, ge=1, description="gradual: steps between mask updates"
    )
    curve: Annotated[Literal["cubic", "linear"], Group.GRADUAL] = Field(
        "cubic", description="gradual: sparsity schedule"
    )
    score: Annotated[Literal["magnitude", "wanda"], Group.GRADUAL] = Field(
        "magnitude", description="gradual: |W|, or |W|·‖X‖ from running input norms"
    )
    pattern: Annotated[str, Group.GRADUAL] = Field(
        "unstructured", description="gradual: 'unstructured' or N:M such as 2:4"
    )

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: Any) -> str:
        pattern = Pattern.parse(str(value))
        if pattern.structured:
            raise ValueError("training-time pruning supports unstructured and N:M patterns")
        return str(pattern)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneOptions:
        if not self.gradual:
            stray = sorted(set(fields_in(FinetuneOptions, Group.GRADUAL)) & self.model_fields_set)
            if stray:
                raise ValueError(f"{', '.join(stray)} appl{'ies' if len(stray) == 1 else 'y'} with --gradual")
            return self
        pattern = Pattern.parse(self.pattern)
        if pattern.is_nm and self.final is not None and abs(self.final - pattern.implied_sparsity) > 1e-9:
            raise ValueError(f"pattern {pattern} ends at sparsity {pattern.implied_sparsity:g}; drop --final")
        problem = schedule_problem(
            self.initial, self.final_sparsity, self.start, self.end_step, self.frequency
        )
        if problem:
            raise ValueError(problem)
        if self.end_step > self.steps:
            raise ValueError(f"end step {self.end_step} is past the last step {self.steps}")
        return self

    @property
    def final_sparsity(self) -> float:
        implied = Pattern.parse(self.pattern).implied_sparsity
        return implied if implied is not None else (0.5 if self.final is None else self.final)

    @property
    def end_step(self) -> int:
        return self.steps if self.end is None else self.end

    def schedule(self) -> Schedule | None:
        """The gradual schedule, or None when fine-tuning keeps the model's own mask."""
        if not self.gradual:
            return None
        return Schedule(
            self.initial, self.final_sparsity, self.start, self.end_step, self.frequency, self.curve
        )


class FinetuneConfig(FinetuneOptions):
    """``llmprune finetune``: the training options plus model, data, teacher and output."""

    model: ModelName = "smollm2"
    data: DataSource = Field(
        "embedded", description="training text: 'embedded' = the calibration part of the embedded text"
    )
    teacher: str | None = Field(
        None, description="dense teacher for --distill [default: the model recorded in MODEL's llmprune.json]"
    )
    output: str | None = Field(None, description="output directory (default: ./finetuned-<model>)")
    overwrite: bool = Field(False, description="replace --output (and its step checkpoints) if they exist")
    save_every: Count = Field(
        0, ge=0, description="also save a checkpoint OUTPUT-stepN every N steps (0: only at the end)"
    )
    dtype: DType = "auto"
    device: Device = "auto"
    eval_nsamples: Count = Field(16, ge=0, description="evaluation windows for perplexity (0 skips it)")
    eval_seqlen: EvalSeqlen = 512

    def windows(self) -> dict[str, int]:
        """The token windows fed to the model, by flag; each must fit in its context."""
        windows = {"--seqlen": self.seqlen}
        if self.eval_nsamples:
            windows["--eval-seqlen"] = self.eval_seqlen
        return windows

    def options(self) -> FinetuneOptions:
        chosen = self.model_fields_set & set(FinetuneOptions.model_fields)
        return FinetuneOptions(**{name: getattr(self, name) for name in chosen})

    def output_path(self) -> Path:
        if self.output is not None:  # an empty --output is refused, not the default
            return Path(self.output)
        return Path(f"finetuned-{Path(self.model.rstrip('/')).name.removesuffix('.gguf')}")

    def checkpoint_path(self, step: int) -> Path:
        output = self.output_path()
        return output.with_name(f"{output.name}-step{step}")

    def checkpoint_steps(self) -> list[int]:
        every = self.save_every
        return [] if not every else [s for s in range(every, self.steps, every)]
