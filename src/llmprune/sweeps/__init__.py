"""Sweeps: a grid of methods × patterns × sparsities on one model, with results, plots and a report."""

from llmprune.sweeps.config import Cell, SweepConfig
from llmprune.sweeps.runner import SweepReport, run_sweep, sweep

__all__ = ["Cell", "SweepConfig", "SweepReport", "run_sweep", "sweep"]
