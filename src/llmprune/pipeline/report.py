"""What a pruning run did, layer by layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LinearReport:
    name: str
    layer: int
    """Index of the decoder layer holding this linear layer."""
    shape: tuple[int, int]
    target_sparsity: float
    achieved_sparsity: float
    relative_error: float
    """||W X - W' X|| / ||W X|| on sampled calibration inputs of this layer."""
    damp: float | None = None
    """SparseGPT: relative damping used."""
    damp_raised: bool = False
    """SparseGPT: Cholesky failed at the requested damping and was retried with more."""
    refined_from: float | None = None
    """``--refine``: relative error ||W X - W' X|| / ||W X|| over every calibration token (from the
    Hessian) of the method's weights, before refinement."""
    refined_to: float | None = None
    """``--refine``: the same after refinement."""
    swaps: int | None = None
    """``--refine swaps``: kept and pruned weights exchanged."""


@dataclass
class BlockReport:
    """``--reconstruct``: one decoder layer's output error before and after its optimiser steps."""

    error_before: float
    """‖f(x) − target‖ / ‖target‖ over every calibration batch of every process, before fitting."""
    error_after: float
    """The same after fitting (equal to ``error_before`` when the start weights were restored)."""
    steps: int
    """Optimiser steps taken."""
    restored: str | None = None
    """Why the start weights were put back (None: the fit was kept)."""
    layer: int | None = None
    """Index of the decoder layer."""


@dataclass
class PruneReport:
    method: str
    pattern: str
    sparsity: float
    layers: list[LinearReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    parameters_before: int | None = None
    """Structured pruning: parameters of the decoder layers before and after."""
    parameters_after: int | None = None
    removed_layers: list[int] = field(default_factory=list)
    """Structured pruning: original indices of the decoder layers removed."""
    layer_sparsities: list[float] | None = None
    """Target sparsity of each decoder layer, when a schedule (depth, owl) gives them their own."""
    outlier_ratios: list[float] | None = None
    """``--schedule owl``: each decoder layer's share of outlier Wanda scores, from the dense model."""
    blocks: list[BlockReport] = field(default_factory=list)
    """``--reconstruct``: each decoder layer's output error before and after reconstruction."""

    @property
    def achieved_sparsity(self) -> float:
        """Zeros over weights across every pruned linear layer; for structured pruning, the fraction of
        the decoder layers' parameters removed."""
        if self.parameters_before:
            return 1 - (self.parameters_after or 0) / self.parameters_before
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.achieved_sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    @property
    def damping_raised(self) -> list[str]:
        """Layers whose Hessian needed more damping than requested."""
        return [r.name for r in self.layers if r.damp_raised]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["achieved_sparsity"] = self.achieved_sparsity
        data["damping_raised"] = self.damping_raised
        return data
