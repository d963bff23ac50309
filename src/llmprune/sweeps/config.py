"""``SweepConfig``: a grid of methods × patterns × sparsities sharing one model, data and evaluation.

Its shared fields are ``RunConfig``'s own (same names, types, help and checks), so a sweep recipe reads
like a run recipe; each cell's full ``RunConfig`` is built and validated up front, before any loading.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from llmprune.config import (
    Count,
    Group,
    PruneOptions,
    RunConfig,
    StrictModel,
    describe_validation_error,
    fields_in,
)
from llmprune.methods.patterns import Pattern


class _Grid(StrictModel):
    methods: list[Literal["magnitude", "wanda", "sparsegpt"]] = Field(
        default_factory=lambda: ["wanda", "sparsegpt", "magnitude"], description="pruning methods to compare"
    )
    sparsities: list[float] = Field(
        default_factory=lambda: [0.3, 0.5, 0.6, 0.7],
        description="sparsities of the unstructured cells (N:M cells have their own: 1 - N/M)",
    )
    patterns: list[str] = Field(
        default_factory=lambda: ["unstructured", "2:4"], description="'unstructured' and/or N:M patterns"
    )
    output: Annotated[str, Group.OUTPUT] = Field(
        "sweep", description="directory of the sweep's results (rerun it to resume)"
    )
    save_models: Annotated[bool, Group.OUTPUT] = Field(
        False, description="also save every cell's pruned model under OUTPUT/models"
    )
    eval_nsamples: Count = Field(16, ge=1, description="evaluation windows for perplexity")

    @field_validator("methods", "patterns", "sparsities", mode="before")
    @classmethod
    def _split(cls, value: Any) -> list[str]:
        if isinstance(value, str | float | int):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str | float | int) for v in value):
            raise ValueError(f"expected a list or a comma-separated string, got {value!r}")
        items = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        if not items:
            raise ValueError("give at least one value")
        return list(dict.fromkeys(items))

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, value: list[float]) -> list[float]:
        for number in value:
            if not 0.0 <= number < 1.0:
                raise ValueError(f"sparsity must be in [0, 1), got {number:g}")
        return sorted(set(value))

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        parsed = [Pattern.parse(item) for item in value]
        if any(pattern.structured for pattern in parsed):
            raise ValueError("structured pruning cannot be swept (use llmprune prune --pattern structured)")
        return list(dict.fromkeys(str(pattern) for pattern in parsed))


class Cell(StrictModel):
    """One point of the grid."""

    method: str
    pattern: str
    sparsity: float
    """Target sparsity: the requested one, or 1 - N/M for an N:M pattern."""

    @property
    def key(self) -> str:
        """File-name-safe identifier, e.g. ``wanda-unstructured-0.5`` or ``sparsegpt-2of4``."""
        pattern = self.pattern.replace(":", "of")
        return f"{self.method}-{pattern}" + (f"-{self.sparsity:g}" if self.pattern == "unstructured" else "")


def _shared_names() -> tuple[str, ...]:
    """``RunConfig`` fields every cell shares, the run's own then the algorithm's. Left out: the cell's own
    (``Cell``'s fields) and those the grid defines itself; where one run's output goes and streaming, which a
    sweep cannot use (it keeps the dense weights in memory to restore them between cells); structured-only
    options; and per-layer schedules, which do not apply to N:M cells."""
    left_out = {*Cell.model_fields, *_Grid.model_fields}
    left_out.update(fields_in(RunConfig, Group.OUTPUT, Group.STRUCTURED, Group.UNSTRUCTURED))
    run_own = [name for name in RunConfig.model_fields if name not in PruneOptions.model_fields]
    return tuple(name for name in [*run_own, *PruneOptions.model_fields] if name not in left_out)


SHARED_FIELDS = _shared_names()


def _shared_fields() -> dict[str, Any]:
    fields = RunConfig.model_fields
    return {name: (fields[name].annotation, fields[name]) for name in SHARED_FIELDS}


class SweepConfig(create_model("_SweepBase", __base__=_Grid, **_shared_fields())):
    """A sweep: the grid (methods, sparsities, patterns), what every cell shares, and the output."""

    @model_validator(mode="after")
    def _cells_valid(self) -> SweepConfig:
        try:  # the shared options' own checks first, so that their errors do not name a cell
            RunConfig.model_validate(self._shared_values())
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None
        for cell in self.cells():
            self.cell_config(cell)
        return self

    def cells(self) -> list[Cell]:
        """Every cell: pattern by pattern, sparsity by sparsity, every method at each, so that an interrupted
        sweep has compared the methods on what it did finish. An N:M pattern fixes the sparsity, so it is
        one cell per method."""
        cells = []
        for pattern in self.patterns:
            spec = Pattern.parse(pattern)
            sparsities = [spec.implied_sparsity] if spec.is_nm else self.sparsities
            for sparsity in sparsities:
                cells.extend(Cell(method=m, pattern=pattern, sparsity=sparsity) for m in self.methods)
        return cells

    def cell_config(self, cell: Cell) -> RunConfig:
        """The ``RunConfig`` a standalone ``llmprune prune`` of this cell would use."""
        values = self._shared_values()
        values.update(method=cell.method, pattern=cell.pattern, eval_nsamples=self.eval_nsamples)
        if cell.pattern == "unstructured":
            values["sparsity"] = cell.sparsity
        try:
            return RunConfig.model_validate(values)
        except ValidationError as exc:
            raise ValueError(f"cell {cell.key}: {describe_validation_error(exc)}") from None

    def windows(self) -> dict[str, int]:
        """The token windows fed to the model, by flag; each must fit in its context."""
        return {"--seqlen": self.seqlen, "--eval-seqlen": self.eval_seqlen}

    def _shared_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SHARED_FIELDS if name in self.model_fields_set}

    def identity(self) -> dict[str, Any]:
        """What a resumed sweep must share with the one it continues: every option but where the models
        go and whether they are saved."""
        return self.model_dump(mode="json", exclude=set(fields_in(type(self), Group.OUTPUT)))
