"""Sweeps: a grid of methods × patterns × sparsities on one model, with results, plots and a report."""

from llmprune.sweeps.config import Cell, SweepConfig
from llmprune.sweeps.runner import SweepResult, run_sweep, sweep

__all__ = ["Cell", "SweepConfig", "SweepResult", "run_sweep", "sweep"]
