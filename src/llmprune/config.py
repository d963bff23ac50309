"""Every option, defined and validated once. The CLI flags, YAML recipes and the Python API all read these.

``PruneOptions`` are the algorithm's options (``llmprune.prune``); ``RunConfig`` adds what a whole run
needs (model, data, output). The CLI builds one flag per field from these definitions.
"""

from __future__ import annotations

import contextlib
import enum
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from llmprune.errors import UsageError
from llmprune.methods.patterns import Pattern

DType = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"],
    Field(description="weight dtype; auto = float32 on CPU, bfloat16 on CUDA"),
]
Device = Annotated[str, Field(description="auto, cpu, cuda or cuda:N")]
ModelName = Annotated[
    str, Field(description="hub id, local directory, .gguf file, or 'smollm2' (the embedded default)")
]
DataSource = Annotated[str, Field(description="'embedded' (Python's docs), a text file, 'wikitext2' or 'c4'")]

# Integers of each kind, bounded above so that an absurd number is refused here, not by an overflow deep
# in torch. Lower bounds (0 or 1) are the fields' own.
MAX_COUNT = 2**31 - 1
Count = Annotated[int, Field(le=MAX_COUNT)]
"""How many of something (samples, steps, rows per batch, tokens): at most what an int32 holds."""
WindowLength = Annotated[int, Field(ge=2, le=MAX_COUNT)]
"""Tokens in one window of text (also checked against the model's context before it is loaded)."""
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]
"""A seed for ``torch.Generator.manual_seed``, which takes 0 .. 2**64 - 1."""
EvalSeqlen = Annotated[WindowLength, Field(description="tokens per evaluation window")]
Reconstruct = Literal["auto", "none", "refit", "layer", "dense", "sublayer"]
BLOCK_RECONSTRUCTION = ("layer", "dense", "sublayer")
"""The ``reconstruct`` modes that run optimiser steps on a pruned decoder layer (unstructured and N:M)."""

PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "best": {
        "method": "sparsegpt",
        "refine": ["resolve"],
        "refine_iterations": 20,
        "reconstruct": "dense",
        "reconstruct_steps": 8,
        "reconstruct_lr": 3e-3,
    },
}
"""What each ``preset`` sets (chosen on held-out calibration windows: docs/benchmarks.md); options given
explicitly override it."""
PRESETS_UNSTRUCTURED: dict[str, dict[str, Any]] = {"none": {}, "best": {"schedule": "owl"}}
"""What a preset adds for unstructured sparsity (OWL's per-layer sparsities do not apply to N:M)."""
_PRESET_DEPENDS = {
    "refine_iterations": "refine",
    "swap_rounds": "refine",
    "reconstruct_steps": "reconstruct",
    "reconstruct_lr": "reconstruct",
    "owl_lambda": "schedule",
    "owl_threshold": "schedule",
}
"""A preset's setting of an option that refines another is dropped when that other is given explicitly."""


_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``4GiB``, ``500MB``, ``1.5G`` or ``1048576`` (KiB/MiB/GiB are powers of 2)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"expected a size such as 4GiB, 500MB or 1048576, got {text!r}")
    number, unit, binary = match.groups()
    scale = 1024 ** ("kmgt".index(unit.lower()) + 1) if unit and binary else _UNITS[unit.lower()]
    size = int(float(number) * scale)
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def names_list(value: Any) -> list[str]:
    """A list of names or globs, given as a list of strings or one comma-separated string (a mapping, a
    number or a list of anything else is refused rather than read as something else)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"expected a list of strings or a comma-separated string, got {value!r}")
    return [part.strip() for item in value for part in item.split(",") if part.strip()]


def _fraction(value: Any, what: str) -> float:
    """A number in [0, 1) (a sparsity), from a number or its text."""
    number = math.nan
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
    if math.isnan(number):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= number < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {number:g}")
    return number


class Group(enum.Enum):
    """What a field belongs to, marked in its annotation (``Annotated[bool, Group.OUTPUT]``) so that a list
    of fields (the recipe, what a sweep shares, what needs --gradual) is read from the fields."""

    STRUCTURED = "applies to structured pruning only"
    UNSTRUCTURED = "applies to unstructured pruning only"
    GRADUAL = "applies to gradual pruning only"
    REFINE = "refines what a method did (unstructured and N:M)"
    OUTPUT = "where and how a run writes and streams its result; not in the recipe"
    EVALUATION = "how the result is measured; not in the recipe"


def fields_in(model: type[BaseModel], *groups: Group) -> list[str]:
    """The fields of ``model`` in any of ``groups``, in declaration order."""
    return [name for name, info in model.model_fields.items() if any(g in info.metadata for g in groups)]


def spellings(name: str, info: FieldInfo) -> list[str]:
    """Every name a field accepts: its own, then any older one it keeps for recipes, flags and keywords."""
    alias = info.validation_alias
    older = alias.choices if isinstance(alias, AliasChoices) else []
    return list(dict.fromkeys([name, *(choice for choice in older if isinstance(choice, str))]))


def field_names(model: type[BaseModel]) -> dict[str, str]:
    """The field each accepted name (own or older) stands for."""
    return {spelled: name for name, info in model.model_fields.items() for spelled in spellings(name, info)}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name, info in cls.model_fields.items():
                given = [spelled for spelled in spellings(name, info) if spelled in values]
                if len(given) > 1:
                    raise ValueError(f"{name} is given twice (as {' and '.join(given)})")
        return values


class PruneOptions(StrictModel):
    """Options of the pruning algorithm itself (what ``llmprune.prune`` accepts)."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = Field("wanda", description="pruning method")
    sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description="fraction of weights removed; default 0.5, or 1-N/M for N:M"
    )
    pattern: str = Field("unstructured", description="'unstructured' or N:M such as 2:4, 4:8, 1:4")
    include: list[str] = Field(
        default_factory=list, description="only prune linear layers whose name matches one of these globs"
    )
    exclude: list[str] = Field(default_factory=list, description="never prune layers matching these globs")
    layer_sparsity: Annotated[dict[str, float], Group.UNSTRUCTURED] = Field(
        default_factory=dict,
        description="per-layer sparsity: REGEX=SPARSITY on module names (first match wins)",
    )
    schedule: Annotated[Literal["uniform", "depth", "owl"], Group.UNSTRUCTURED] = Field(
        "uniform",
        description="per-decoder-layer sparsity around the same mean: depth rises linearly with depth; owl "
        "(outlier-weighed, arXiv 2310.05175) prunes layers with fewer outlier Wanda scores more",
    )
    schedule_spread: Annotated[float, Group.UNSTRUCTURED] = Field(
        0.1, ge=0.0, lt=1.0, description="depth schedule: first layer at mean-spread, last at mean+spread"
    )
    owl_threshold: Annotated[float, Group.UNSTRUCTURED] = Field(
        5.0, gt=0.0, description="owl: a score is an outlier above this many times its layer's mean score (M)"
    )
    owl_lambda: Annotated[float, Group.UNSTRUCTURED] = Field(
        0.08, ge=0.0, lt=1.0, description="owl: layer sparsities stay within mean ± this (λ)"
    )
    true_sequential: bool = Field(
        False, description="prune each sublayer from inputs that went through the pruned sublayers before it"
    )
    blocksize: Count = Field(128, ge=1, description="SparseGPT: columns per lazy-update block")
    damp: float = Field(
        0.01, gt=0.0, description="SparseGPT and --refine resolve: damping as a fraction of mean(diag H)"
    )
    refine: Annotated[list[Literal["swaps", "resolve"]], Group.REFINE] = Field(
        default_factory=list,
        description="after the method, on each linear layer's Hessian: resolve (re-fit the kept weights by "
        "least squares, mask fixed; conjugate gradients as ALPS), swaps (exchange a kept and a pruned weight "
        "of a row, or N:M group, while the error drops; SparseSwaps); both: resolve, swaps, resolve",
    )
    refine_iterations: Annotated[Count, Group.REFINE] = Field(
        20, ge=1, description="--refine resolve: conjugate-gradient iterations per linear layer"
    )
    swap_rounds: Annotated[Count, Group.REFINE] = Field(
        100, ge=1, description="--refine swaps: at most this many swaps per row"
    )
    reconstruct_steps: Annotated[Count, Group.REFINE] = Field(
        8, ge=1, description="--reconstruct layer/dense/sublayer: optimiser steps per decoder layer"
    )
    reconstruct_lr: Annotated[float, Group.REFINE] = Field(
        3e-3, gt=0.0, description="--reconstruct layer/dense/sublayer: Adam learning rate"
    )
    preset: Literal["none", "best"] = Field(
        "none",
        description="a tested combination of options (best: the recommended setting, see the README); "
        "options given explicitly override it",
    )
    magnitude_scope: Literal["matrix", "row"] = Field(
        "matrix", description="magnitude: one threshold per matrix or per output row"
    )
    units: Annotated[list[Literal["heads", "channels", "layers"]], Group.STRUCTURED] = Field(
        default_factory=lambda: ["heads", "channels"],
        description="structured: what to remove (attention heads, MLP channels, whole decoder layers)",
    )
    unit_score: Annotated[Literal["magnitude", "wanda", "flap"], Group.STRUCTURED] = Field(
        "flap",
        validation_alias=AliasChoices("unit_score", "score"),  # its name in 0.1 (--score) still works
        description="structured: unit score: weight magnitude, |W|·||X|| (Wanda-style), or FLAP fluctuation",
    )
    reconstruct: Reconstruct = Field(
        "auto",
        description="after each decoder layer is pruned: refit (structured: o_proj/down_proj re-fitted by "
        "least squares), or, unstructured and N:M, a few optimiser steps on its kept weights so that its "
        "output matches the dense layer's on the same inputs (layer), the dense model's hidden state "
        "(dense), or attention and MLP matched separately (sublayer); none; auto = refit for structured, "
        "none otherwise",
    )
    head_mode: Annotated[Literal["queries", "groups"], Group.STRUCTURED] = Field(
        "queries",
        description="structured, grouped-query attention: remove query heads within each key/value group, "
        "or whole groups",
    )
    widths: Annotated[Literal["uniform", "adaptive"], Group.STRUCTURED] = Field(
        "uniform",
        description="structured: the same heads/MLP width in every layer (a plain checkpoint), or per-layer "
        "widths from a global ranking of calibration scores (FLAP; load the result with llmprune.load)",
    )
    batch_size: Count = Field(4, ge=1, description="calibration samples per forward pass")
    error_tokens: Count = Field(
        256, ge=1, description="calibration tokens sampled to measure each layer's reconstruction error"
    )

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: Any) -> str:
        return str(Pattern.parse(str(value)))

    @model_validator(mode="before")
    @classmethod
    def _preset_and_older_reconstruct(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        if isinstance(values.get("reconstruct"), bool):  # 0.x: a structured on/off switch
            values = {**values, "reconstruct": "refit" if values["reconstruct"] else "none"}
        preset = values.get("preset", "none")
        if isinstance(preset, str) and preset in PRESETS:
            chosen = dict(PRESETS[preset])
            with contextlib.suppress(ValueError):  # a bad pattern is the pattern field's to refuse
                if not Pattern.parse(str(values.get("pattern", "unstructured"))).is_nm:
                    chosen.update(PRESETS_UNSTRUCTURED[preset])
            for name, parent in _PRESET_DEPENDS.items():
                if parent in values:
                    chosen.pop(name, None)
            values = {**chosen, **values}  # what is given explicitly wins
        return values

    @field_validator("include", "exclude", "units", "refine", mode="before")
    @classmethod
    def _globs(cls, value: Any) -> list[str]:
        return names_list(value)

    @field_validator("refine")
    @classmethod
    def _refine(cls, value: list[str]) -> list[str]:
        return sorted(set(value), key=["swaps", "resolve"].index)  # the order they run in

    @field_validator("units")
    @classmethod
    def _units(cls, value: list[str]) -> list[str]:
        return sorted(set(value), key=["layers", "heads", "channels"].index)

    @field_validator("layer_sparsity", mode="before")
    @classmethod
    def _overrides(cls, value: Any) -> dict[str, float]:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            pairs = {}
            for item in value:
                regex, sep, number = str(item).rpartition("=")
                if not isinstance(item, str) or not sep or not regex:
                    raise ValueError(f"expected REGEX=SPARSITY, got {item!r}")
                pairs[regex] = number
            value = pairs
        if not isinstance(value, dict):
            raise ValueError(f"expected REGEX=SPARSITY items or a mapping of regex: sparsity, got {value!r}")
        result = {}
        for regex, number in value.items():
            regex = str(regex)
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"bad regex {regex!r}: {exc}") from None
            result[regex] = _fraction(number, f"sparsity for {regex!r}")
        return result

    @model_validator(mode="after")
    def _consistent(self) -> PruneOptions:
        pattern = self.pattern_spec
        if pattern.structured:
            if self.refine or self.preset != "none":  # before --method: the preset sets one
                what = f"--preset {self.preset}" if self.preset != "none" else "--refine"
                raise ValueError(f"{what} applies to unstructured and N:M pruning")
            if self.method != "wanda":  # the default
                raise ValueError("--method does not apply to structured pruning; choose a --unit-score")
            if self.layer_sparsity or self.schedule != "uniform" or self.true_sequential:
                raise ValueError(
                    "per-layer sparsity, schedules and true-sequential apply to unstructured and N:M pruning"
                )
            if not self.units:
                raise ValueError("structured pruning needs --units: heads, channels and/or layers")
            if self.widths == "adaptive" and self.units == ["layers"]:
                raise ValueError("--widths adaptive needs --units heads and/or channels")
            if self.reconstruct in BLOCK_RECONSTRUCTION:
                raise ValueError(
                    f"--reconstruct {self.reconstruct} applies to unstructured and N:M pruning; "
                    "structured pruning takes refit or none"
                )
        elif self.widths != "uniform":
            raise ValueError("--widths applies to structured pruning (--pattern structured)")
        elif self.reconstruct == "refit":
            raise ValueError(
                "--reconstruct refit applies to structured pruning; unstructured and N:M take "
                f"{', '.join(BLOCK_RECONSTRUCTION)} or none"
            )
        self._check_refinement()
        if pattern.is_nm:
            if self.sparsity is not None and abs(self.sparsity - pattern.implied_sparsity) > 1e-9:
                raise ValueError(
                    f"pattern {pattern} fixes sparsity at {pattern.implied_sparsity:g}; "
                    f"drop --sparsity {self.sparsity:g}"
                )
            if self.schedule == "owl":
                raise ValueError(
                    "--schedule owl would give each layer its own N; mixed N:M patterns are not supported"
                )
            if self.layer_sparsity or self.schedule != "uniform":
                raise ValueError("per-layer sparsity and schedules apply to unstructured pruning only")
        if self.schedule == "depth":
            low, high = (
                self.target_sparsity - self.schedule_spread,
                self.target_sparsity + self.schedule_spread,
            )
            if low < 0 or high >= 1:
                raise ValueError(f"depth schedule would span [{low:g}, {high:g}], outside [0, 1)")
        if self.schedule == "owl":
            mean, spread = self.target_sparsity, self.owl_lambda
            if spread >= mean or mean + spread >= 1:
                raise ValueError(
                    f"--owl-lambda {spread:g} must be below the sparsity {mean:g} and below 1 - sparsity "
                    f"(layers would span [{mean - spread:g}, {mean + spread:g}])"
                )
        return self

    def _check_refinement(self) -> None:
        """Options of a refinement that was not asked for are refused: they would do nothing."""
        given = self.model_fields_set
        orphans = {
            "refine_iterations": "resolve" in self.refine,
            "swap_rounds": "swaps" in self.refine,
            "reconstruct_steps": self.reconstruct in BLOCK_RECONSTRUCTION,
            "reconstruct_lr": self.reconstruct in BLOCK_RECONSTRUCTION,
        }
        unused = [name for name, applies in orphans.items() if name in given and not applies]
        if unused:
            needs = {"refine_iterations": "--refine resolve", "swap_rounds": "--refine swaps"}
            flags = ", ".join("--" + name.replace("_", "-") for name in unused)
            need = needs.get(unused[0], "--reconstruct layer, dense or sublayer")
            raise ValueError(f"{flags} appl{'ies' if len(unused) == 1 else 'y'} only with {need}")
        if self.schedule != "owl":
            unused = [name for name in ("owl_threshold", "owl_lambda") if name in given]
            if unused:
                flags = ", ".join("--" + name.replace("_", "-") for name in unused)
                raise ValueError(f"{flags} appl{'ies' if len(unused) == 1 else 'y'} only with --schedule owl")

    @property
    def refits(self) -> bool:
        """Whether structured pruning re-fits the consumers by least squares (``reconstruct``)."""
        return self.reconstruct in ("auto", "refit")

    @property
    def pattern_spec(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """Requested mean sparsity: explicit, implied by N:M, or the default 0.5."""
        implied = self.pattern_spec.implied_sparsity
        if implied is not None:
            return implied
        return 0.5 if self.sparsity is None else self.sparsity


class RunConfig(PruneOptions):
    """A whole ``llmprune prune`` run: the algorithm's options plus model, data and output."""

    model: ModelName = "smollm2"
    calibration: DataSource = "embedded"
    nsamples: Count = Field(32, ge=1, description="calibration windows")
    seqlen: WindowLength = Field(256, description="tokens per calibration window")
    seed: Seed = Field(0, description="seed for drawing calibration windows")
    dtype: DType = "auto"
    device: Device = "auto"
    output: Annotated[str | None, Group.OUTPUT] = Field(
        None, description="output directory (default: ./pruned-<model>-<method>-<pattern>)"
    )
    overwrite: Annotated[bool, Group.OUTPUT] = Field(
        False, description="replace --output if it is an llmprune output (or empty)"
    )
    save_format: Annotated[Literal["dense", "compressed"], Group.OUTPUT] = Field(
        "dense",
        description="dense: a plain checkpoint; compressed: sparse weights packed (non-zeros plus a bitmask "
        "or N:M positions), read by llmprune.load, made plain again by llmprune decompress",
    )
    resume: Annotated[bool, Group.OUTPUT] = Field(
        False, description="continue an interrupted run from its last finished layer"
    )
    offload: Annotated[bool, Group.OUTPUT] = Field(
        False,
        description="stream decoder layers from the checkpoint's safetensors shards, one at a time, and "
        "write each pruned layer at once (automatic when the model would not fit in memory)",
    )
    max_memory: Annotated[str | None, Group.OUTPUT] = Field(
        None,
        description="RAM for calibration activations, e.g. 4GiB or 500MB; past it they are kept on disk",
    )
    eval_data: Annotated[DataSource, Group.EVALUATION] = "embedded"
    eval_nsamples: Annotated[Count, Group.EVALUATION] = Field(
        16, ge=0, description="evaluation windows for perplexity (0 skips it)"
    )
    eval_seqlen: Annotated[EvalSeqlen, Group.EVALUATION] = 512

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("max_memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    def windows(self) -> dict[str, int]:
        """The token windows the run feeds the model, by the flag that sets them (each must fit in the
        model's context)."""
        windows = {"--seqlen": self.seqlen}
        if self.eval_nsamples:
            windows["--eval-seqlen"] = self.eval_seqlen
        return windows

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_size(self.max_memory)

    def prune_options(self) -> PruneOptions:
        chosen = self.model_fields_set & set(PruneOptions.model_fields)  # the rest: the same defaults
        return PruneOptions(**{name: getattr(self, name) for name in chosen})

    def pruning_recipe(self) -> dict[str, Any]:
        """The options that shape the pruned weights: all but where they go and how they are evaluated."""
        elsewhere = fields_in(type(self), Group.OUTPUT, Group.EVALUATION)
        recipe = self.model_dump(mode="json", exclude=set(elsewhere))
        recipe["sparsity"] = self.target_sparsity  # the default and an explicit 0.5 are the same recipe
        return recipe

    def output_path(self) -> Path:
        if self.output is not None:  # an empty --output is refused, not the default
            return Path(self.output)
        stem = Path(self.model.rstrip("/")).name.removesuffix(".gguf")
        pattern = self.pattern.replace(":", "of")
        tag = f"{self.target_sparsity:g}" if pattern == "unstructured" else pattern
        return Path(f"pruned-{stem}-{self.method}-{tag}")


class EvalConfig(StrictModel):
    """``llmprune eval``: perplexity of a model, and lm-eval tasks."""

    model: ModelName = "smollm2"
    data: DataSource = "embedded"
    nsamples: Count = Field(16, ge=0, description="evaluation windows (0 = every window of the data)")
    seqlen: EvalSeqlen = 512
    dtype: DType = "auto"
    device: Device = "auto"
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks, e.g. arc_easy,hellaswag (needs: pip install 'llmprune[eval]')",
    )
    task_dir: list[str] = Field(default_factory=list, description="directories of extra lm-eval task YAMLs")
    num_fewshot: Count | None = Field(None, ge=0, description="examples in each prompt (default: the task's)")
    limit: Count | None = Field(None, ge=1, description="examples per task (a quick look, not comparable)")
    batch_size: Count = Field(1, ge=1, description="task requests per forward pass")
    perplexity: bool = Field(True, description="measure perplexity on --data (--no-perplexity: tasks only)")

    @field_validator("tasks", "task_dir", mode="before")
    @classmethod
    def _names(cls, value: Any) -> list[str]:
        return names_list(value)

    def windows(self) -> dict[str, int]:
        """The token windows fed to the model for perplexity, by flag (lm-eval tasks bring their own)."""
        return {"--seqlen": self.seqlen} if self.perplexity else {}

    @model_validator(mode="after")
    def _something(self) -> EvalConfig:
        if not self.perplexity and not self.tasks:
            raise ValueError("--no-perplexity leaves nothing to measure; give --tasks")
        return self


def describe_validation_error(error: ValidationError) -> str:
    """One line out of a pydantic error: 'field: problem; field: problem'."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown option"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def build(model_class: type[StrictModel], values: dict[str, Any]) -> Any:
    """Validate values into a config, turning validation errors into one-line UsageErrors."""
    try:
        return model_class.model_validate(values)
    except ValidationError as exc:
        raise UsageError(describe_validation_error(exc)) from None


class _RecipeLoader(yaml.SafeLoader):
    """A recipe's YAML: ``2:4`` stays text (YAML 1.1 would read the base-60 integer 124), and a key given
    twice in one mapping is refused (plain YAML keeps the last value without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice", key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep)


def _number_or_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    if ":" in node.value:
        return loader.construct_scalar(node)
    if node.tag.endswith(":int"):
        return loader.construct_yaml_int(node)
    return loader.construct_yaml_float(node)


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _number_or_text)
_RecipeLoader.add_constructor("tag:yaml.org,2002:float", _number_or_text)


def read_recipe(path: str | Path, config_class: type[BaseModel] = RunConfig) -> dict[str, Any]:
    """Load a YAML recipe (a mapping of option names, with - or _) for ``config_class``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader) or {}
    except UnicodeDecodeError:
        raise UsageError(f"recipe {path} is not UTF-8 text (a YAML file is expected)") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of option: value")
    names = field_names(config_class)
    unknown = [str(key) for key in data if str(key).replace("-", "_") not in names]
    if unknown:
        raise UsageError(f"recipe {path}: unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)}")
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        name = names[str(key).replace("-", "_")]
        if name in values:
            raise UsageError(f"recipe {path}: option {name} is given twice (as {spelled[name]} and {key})")
        values[name], spelled[name] = value, str(key)
    return values


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where (line N, column M), in one line."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{error.problem}{where}"
    return str(error).splitlines()[0]
