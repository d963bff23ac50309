"""Every option, defined and validated once. The CLI flags, YAML recipes and the Python API all read these.

``PruneOptions`` are the algorithm's options (``llmprune.prune``); ``RunConfig`` adds what a whole run
needs (model, data, output). The CLI builds one flag per field from these definitions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
EvalSeqlen = Annotated[int, Field(ge=2, description="tokens per evaluation window")]


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


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    layer_sparsity: dict[str, float] = Field(
        default_factory=dict,
        description="per-layer sparsity: REGEX=SPARSITY on module names (first match wins)",
    )
    schedule: Literal["uniform", "depth"] = Field(
        "uniform", description="depth: sparsity rises linearly over decoder layers, same mean"
    )
    schedule_spread: float = Field(
        0.1, ge=0.0, lt=1.0, description="depth schedule: first layer at mean-spread, last at mean+spread"
    )
    true_sequential: bool = Field(
        False, description="prune each sublayer from inputs that went through the pruned sublayers before it"
    )
    blocksize: int = Field(128, ge=1, description="SparseGPT: columns per lazy-update block")
    damp: float = Field(0.01, gt=0.0, description="SparseGPT: damping as a fraction of mean(diag H)")
    magnitude_scope: Literal["matrix", "row"] = Field(
        "matrix", description="magnitude: one threshold per matrix or per output row"
    )
    units: list[Literal["heads", "channels", "layers"]] = Field(
        default_factory=lambda: ["heads", "channels"],
        description="structured: what to remove (attention heads, MLP channels, whole decoder layers)",
    )
    score: Literal["magnitude", "wanda", "flap"] = Field(
        "flap",
        description="structured: unit score: weight magnitude, |W|·||X|| (Wanda-style), or FLAP fluctuation",
    )
    reconstruct: bool = Field(
        True, description="structured: re-fit o_proj/down_proj by least squares on the calibration inputs"
    )
    head_mode: Literal["queries", "groups"] = Field(
        "queries",
        description="structured, grouped-query attention: remove query heads within each key/value group, "
        "or whole groups",
    )
    widths: Literal["uniform", "adaptive"] = Field(
        "uniform",
        description="structured: the same heads/MLP width in every layer (a plain checkpoint), or per-layer "
        "widths from a global ranking of calibration scores (FLAP; load the result with llmprune.load)",
    )
    batch_size: int = Field(4, ge=1, description="calibration samples per forward pass")
    error_tokens: int = Field(
        256, ge=1, description="calibration tokens sampled to measure each layer's reconstruction error"
    )

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: Any) -> str:
        return str(Pattern.parse(str(value)))

    @field_validator("include", "exclude", "units", mode="before")
    @classmethod
    def _globs(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        return [part.strip() for item in value or [] for part in str(item).split(",") if part.strip()]

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
                if not sep or not regex:
                    raise ValueError(f"expected REGEX=SPARSITY, got {item!r}")
                pairs[regex] = number
            value = pairs
        result = {}
        for regex, number in dict(value).items():
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"bad regex {regex!r}: {exc}") from None
            number = float(number)
            if not 0.0 <= number < 1.0:
                raise ValueError(f"sparsity for {regex!r} must be in [0, 1), got {number}")
            result[regex] = number
        return result

    @model_validator(mode="after")
    def _consistent(self) -> PruneOptions:
        pattern = self.pattern_spec
        if pattern.structured:
            if self.method != "wanda":  # the default
                raise ValueError("--method does not apply to structured pruning; choose a unit --score")
            if self.layer_sparsity or self.schedule != "uniform" or self.true_sequential:
                raise ValueError(
                    "per-layer sparsity, schedules and true-sequential apply to unstructured and N:M pruning"
                )
            if not self.units:
                raise ValueError("structured pruning needs --units: heads, channels and/or layers")
            if self.widths == "adaptive" and self.units == ["layers"]:
                raise ValueError("--widths adaptive needs --units heads and/or channels")
        elif self.widths != "uniform":
            raise ValueError("--widths applies to structured pruning (--pattern structured)")
        if pattern.is_nm:
            if self.sparsity is not None and abs(self.sparsity - pattern.implied_sparsity) > 1e-9:
                raise ValueError(
                    f"pattern {pattern} fixes sparsity at {pattern.implied_sparsity:g}; "
                    f"drop --sparsity {self.sparsity:g}"
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
        return self

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
    nsamples: int = Field(32, ge=1, description="calibration windows")
    seqlen: int = Field(256, ge=2, description="tokens per calibration window")
    seed: int = Field(0, description="seed for drawing calibration windows")
    dtype: DType = "auto"
    device: Device = "auto"
    output: str | None = Field(
        None, description="output directory (default: ./pruned-<model>-<method>-<pattern>)"
    )
    overwrite: bool = Field(False, description="replace --output if it exists")
    save_format: Literal["dense", "compressed"] = Field(
        "dense",
        description="dense: a plain checkpoint; compressed: sparse weights packed (non-zeros plus a bitmask "
        "or N:M positions), read by llmprune.load, made plain again by llmprune decompress",
    )
    resume: bool = Field(False, description="continue an interrupted run from its last finished layer")
    offload: bool = Field(
        False,
        description="stream decoder layers from the checkpoint's safetensors shards, one at a time, and "
        "write each pruned layer at once (automatic when the model would not fit in memory)",
    )
    max_memory: str | None = Field(
        None,
        description="RAM for calibration activations, e.g. 4GiB or 500MB; past it they are kept on disk",
    )
    eval_data: DataSource = "embedded"
    eval_nsamples: int = Field(16, ge=0, description="evaluation windows for perplexity (0 skips it)")
    eval_seqlen: EvalSeqlen = 512

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

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_size(self.max_memory)

    def prune_options(self) -> PruneOptions:
        chosen = self.model_fields_set & set(PruneOptions.model_fields)  # the rest: the same defaults
        return PruneOptions(**{name: getattr(self, name) for name in chosen})

    def pruning_recipe(self) -> dict[str, Any]:
        """The options that shape the pruned weights: all but where they go and how they are evaluated."""
        recipe = {
            name: value
            for name, value in self.model_dump(mode="json").items()
            if name not in ("output", "overwrite", "save_format", "resume", "offload", "max_memory")
            and not name.startswith("eval_")
        }
        recipe["sparsity"] = self.target_sparsity  # the default and an explicit 0.5 are the same recipe
        return recipe

    def output_path(self) -> Path:
        if self.output:
            return Path(self.output)
        stem = Path(self.model.rstrip("/")).name.removesuffix(".gguf")
        pattern = self.pattern.replace(":", "of")
        tag = f"{self.target_sparsity:g}" if pattern == "unstructured" else pattern
        return Path(f"pruned-{stem}-{self.method}-{tag}")


class EvalConfig(StrictModel):
    """``llmprune eval``: perplexity of a model, and lm-eval tasks."""

    model: ModelName = "smollm2"
    data: DataSource = "embedded"
    nsamples: int = Field(16, ge=0, description="evaluation windows (0 = every window of the data)")
    seqlen: EvalSeqlen = 512
    dtype: DType = "auto"
    device: Device = "auto"
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks, e.g. arc_easy,hellaswag (needs: pip install 'llmprune[eval]')",
    )
    task_dir: list[str] = Field(default_factory=list, description="directories of extra lm-eval task YAMLs")
    num_fewshot: int | None = Field(None, ge=0, description="examples in each prompt (default: the task's)")
    limit: int | None = Field(None, ge=1, description="examples per task (a quick look, not comparable)")
    batch_size: int = Field(1, ge=1, description="task requests per forward pass")
    perplexity: bool = Field(True, description="measure perplexity on --data (--no-perplexity: tasks only)")

    @field_validator("tasks", "task_dir", mode="before")
    @classmethod
    def _names(cls, value: Any) -> list[str]:
        return PruneOptions._globs(value)

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
    """YAML 1.1 reads ``2:4`` as the base-60 integer 124; a recipe means the N:M pattern, so keep it text."""


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
        data = yaml.load(path.read_text(), Loader=_RecipeLoader) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of option: value")
    unknown = [str(key) for key in data if str(key).replace("-", "_") not in config_class.model_fields]
    if unknown:
        raise UsageError(f"recipe {path}: unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}
