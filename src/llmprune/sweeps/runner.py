"""Run a sweep: every cell of the grid on one loaded model, each finished cell recorded atomically.

What is shared between cells, and why no more: the model is loaded once and its dense weights are put back
from a CPU copy before each cell; the calibration and evaluation tokens are tokenized once; the dense
perplexity is measured once (and kept in the output, so a resumed sweep does not measure it again).
Calibration *statistics* are not shared: the driver is sequential (SparseGPT §3.5, Wanda §3), so the
inputs of decoder layer i, hence its statistics, depend on how layers 0..i-1 were pruned, which differs
from cell to cell; only layer 0's would be common, which saves one layer's forward pass out of dozens.
Magnitude needs no calibration statistics at all (the driver still passes the calibration data through
the model, to measure each layer's reconstruction error for the report).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.data.text import calibration_data, evaluation_data
from llmprune.errors import UsageError
from llmprune.evaluation.perplexity import perplexity
from llmprune.export.save import save_pruned
from llmprune.jobs import calibration_record, configured, perplexity_record, preflight, run_metadata
from llmprune.models.loading import fits_in_memory, load_plain_model, load_tokenizer, models_checked_once
from llmprune.pruning import ProgressCallback, check_plan, prune_model
from llmprune.storage import is_own_output, library_versions, output_lock, write_atomically
from llmprune.sweeps.config import Cell, SweepConfig
from llmprune.sweeps.report import write_report

SWEEP_FILE = "sweep.json"
CELLS_DIR = "cells"
MODELS_DIR = "models"

CellCallback = Callable[[int, int, Cell, bool], None]
"""``(index, total, cell, skipped)``, called as each cell starts (or is found finished)."""


@dataclass
class SweepReport:
    """What ``sweep`` produced: one record per cell (grid order) and the files written."""

    config: SweepConfig
    output: Path
    dense_perplexity: float
    cells: list[dict[str, Any]]
    computed: list[str] = field(default_factory=list)
    """Keys of the cells pruned by this call (the others were found finished)."""
    files: dict[str, Path] = field(default_factory=dict)


def _write_json(path: Path, data: Any) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if there is no such file; ValueError if it cannot be read or parsed."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSON and UTF-8 decoding errors are ValueErrors
        raise ValueError(str(exc) or type(exc).__name__) from None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def existing_state(config: SweepConfig) -> dict[str, Any] | None:
    """The ``sweep.json`` state of a sweep to resume in ``config.output`` (None for a new sweep). A
    directory holding a sweep with other options is refused, as is one that is not a sweep."""
    output = Path(config.output)
    if not output.exists():
        return None
    if not output.is_dir():
        raise UsageError(f"sweep output {output} exists and is not a directory")
    if not is_own_output(output, SWEEP_FILE):
        raise UsageError(f"sweep output {output} exists and is not a sweep (no {SWEEP_FILE})")
    path = output / SWEEP_FILE
    try:
        state = _read_json(path)
        if state is not None and not (isinstance(state, dict) and isinstance(state.get("config", {}), dict)):
            raise ValueError("not the object a sweep writes")
    except ValueError as exc:
        raise UsageError(
            f"{path} is damaged ({exc}); delete {output} to start the sweep over, or choose another --output"
        ) from None
    if state is None:  # an empty directory
        return None
    changed = _differences(state.get("config", {}), config.identity())
    if changed:
        raise UsageError(
            f"{output} holds a sweep with other options ({', '.join(changed)} differ); rerun it with the "
            "same options to resume, or choose another --output"
        )
    return state


def _create_output(config: SweepConfig) -> dict[str, Any]:
    output = Path(config.output)
    (output / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    state = {"config": config.identity(), "dense_perplexity": None, "versions": library_versions()}
    _write_json(output / SWEEP_FILE, state)
    return state


def finished_cells(config: SweepConfig) -> dict[str, dict[str, Any]]:
    """Records of the cells a previous run finished (each written atomically, so complete or absent)."""
    directory = Path(config.output) / CELLS_DIR
    records = {}
    for cell in config.cells():
        try:
            record = _read_json(directory / f"{cell.key}.json")
        except ValueError:  # not written by a sweep (each record is written atomically): run the cell again
            record = None
        if isinstance(record, dict) and record.get("key") == cell.key:
            records[cell.key] = record
    return records


def _check_cheaply(config: SweepConfig) -> None:
    """Every cell's layer plan (N:M widths, --include/--exclude) on a weightless skeleton, before loading."""
    sources = [config.calibration, config.eval_data]
    checked = preflight(config.model, config.device, config.dtype, sources=sources, windows=config.windows())
    for cell in config.cells():
        check_plan(checked.skeleton, config.cell_config(cell).prune_options())
    if not fits_in_memory(2 * checked.model_bytes, torch.device("cpu")):
        raise UsageError("a sweep keeps the model and a CPU copy of its dense weights in memory; too large")
    checked.check_activations(config.nsamples, config.seqlen)


def dense_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every weight and buffer (tied tensors copied once), to undo pruning between cells."""
    copies: dict[tuple, torch.Tensor] = {}
    snapshot = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        snapshot[name] = copies[key]
    return snapshot


def _layer_rows(report) -> list[dict[str, Any]]:
    return [
        {
            "name": r.name,
            "layer": r.layer,
            "weights": r.shape[0] * r.shape[1],
            "target_sparsity": r.target_sparsity,
            "sparsity": r.achieved_sparsity,
        }
        for r in report.layers
    ]


def run_sweep(
    config: SweepConfig,
    *,
    on_cell: CellCallback | None = None,
    progress: ProgressCallback | None = None,
) -> SweepReport:
    """Run every cell not already finished in ``config.output``, then write the results and the report.

    ``on_cell(index, total, cell, skipped)`` is called as each cell starts; ``progress(done, total)`` over
    the decoder layers of the cell being pruned. The output is held (``output_lock``: locked against other
    runs, its parent proved writable) from before anything is read to the report.
    """
    with output_lock(config.output), models_checked_once():
        return _run_sweep(config, on_cell, progress)


def _run_sweep(
    config: SweepConfig, on_cell: CellCallback | None, progress: ProgressCallback | None
) -> SweepReport:
    output = Path(config.output)
    state = existing_state(config)
    cells = config.cells()
    done = finished_cells(config) if state is not None else {}
    pending = [cell for cell in cells if cell.key not in done]
    computed: list[str] = []
    if on_cell is not None:
        for index, cell in enumerate(cells):
            if cell.key in done:
                on_cell(index, len(cells), cell, True)
    if state is None or pending or state.get("dense_perplexity") is None:
        _check_cheaply(config)  # before anything is written
        state = state or _create_output(config)
        tokenizer = load_tokenizer(config.model)
        calibration = calibration_data(
            tokenizer, config.calibration, config.nsamples, config.seqlen, config.seed
        )
        evaluation = evaluation_data(tokenizer, config.eval_data, config.eval_seqlen, config.eval_nsamples)
        model = load_plain_model(config.model, config.dtype, config.device)
        if state.get("dense_perplexity") is None:
            state["dense_perplexity"] = perplexity(model, evaluation)
            state["eval_windows"] = len(evaluation)
            _write_json(output / SWEEP_FILE, state)
        dense = dense_snapshot(model) if len(pending) > 1 else None
        for cell in pending:
            if computed:
                model.load_state_dict(dense)
            index = cells.index(cell)
            if on_cell is not None:
                on_cell(index, len(cells), cell, False)
            done[cell.key] = _run_cell(
                config, cell, model, tokenizer, calibration, evaluation, state, progress
            )
            computed.append(cell.key)
        del model, dense
    records = [done[cell.key] for cell in cells]
    files = write_report(output, config, state, records)
    return SweepReport(config, output, state["dense_perplexity"], records, computed, files)


def _run_cell(config, cell, model, tokenizer, calibration, evaluation, state, progress) -> dict[str, Any]:
    run_config = config.cell_config(cell)
    report = prune_model(model, calibration, run_config.prune_options(), progress)
    started = time.perf_counter()
    value = perplexity(model, evaluation)
    record = {
        "key": cell.key,
        "method": cell.method,
        "pattern": cell.pattern,
        "target_sparsity": cell.sparsity,
        "achieved_sparsity": report.achieved_sparsity,
        "perplexity": value,
        "prune_seconds": report.seconds,
        "eval_seconds": time.perf_counter() - started,
        "damping_raised": report.damping_raised,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": run_config.pruning_recipe(),
        "layers": _layer_rows(report),
        "model": None,
    }
    if config.save_models:
        target = Path(config.output) / MODELS_DIR / cell.key
        measured = perplexity_record(
            config.eval_data, evaluation, config.eval_seqlen, dense=state["dense_perplexity"], pruned=value
        )
        metadata = run_metadata(
            run_config.model_dump(),
            calibration=calibration_record(run_config),
            perplexity=measured,
            report=report,
        )
        save_pruned(model, tokenizer, target, metadata, overwrite=True)  # a killed run's copy is replaced
        record["model"] = str(target)
    _write_json(Path(config.output) / CELLS_DIR / f"{cell.key}.json", record)
    return record


def sweep(
    config: SweepConfig | None = None,
    /,
    *,
    on_cell: CellCallback | None = None,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> SweepReport:
    """Run a sweep (``llmprune sweep``): ``config``, or a ``SweepConfig`` built from keyword options,
    e.g. ``sweep(methods=["wanda", "magnitude"], sparsities=[0.5, 0.7], output="sweep/")``. Rerun with
    the same options and output to resume an interrupted sweep."""
    config = configured(SweepConfig, config, options)
    return run_sweep(config, on_cell=on_cell, progress=progress)
