"""Block-wise reconstruction: after a decoder layer is pruned, a few optimiser steps on its remaining weights
so that its output matches a target on the calibration inputs, with the mask fixed and exact.

The idea is that of layer-wise / block-wise reconstruction after pruning (e.g. "Fast and Optimal Weight
Update for Pruned LLMs", Boža, arXiv 2401.02938 §4, and arXiv 2510.14444, which reconstructs attention and
MLP separately). Three targets (``Mode``):

- ``layer``: the dense layer's own output on the same (pruned-stream) inputs the pruned layer receives;
- ``dense``: the dense model's hidden state at that depth, from a second stream of activations carried
  from layer 0 through the dense layers (``dense_in[i+1] = dense_layer_i(dense_in[i])``);
- ``sublayer``: attention and MLP matched separately, each to the dense sublayer applied to the very input
  the pruned sublayer receives (its input detached, so each term trains only its own sublayer).

Optimiser (``fit_layer``): Adam on fp32 master copies of the trained weights and biases (even when the
layer is bf16/fp16: the forward runs in the layer's dtype with the masters cast, the gradient reaches the
masters), learning rate on a cosine schedule from ``lr`` down to 0 (``cosine_lr``); the zero pattern
``weight == 0`` captured at the start is held exactly: gradients are masked and the masters re-masked
after every step. One step per calibration batch in a global order (step t uses global batch t mod total);
the process holding that batch computes the gradient, and a sum over processes gives every process the
same gradient, so all take the same step. The loss of a batch is Σ over terms ‖f − target‖² / ‖target‖².
If the gradient turns non-finite or the error ends above where it started, the start weights are restored
and the report says so.

The walk runs ``ReconstructionSteps.before`` (before the pruning step: keeps what the target needs from the
dense layer) and ``.after`` (after it: fits the layer), both ``timing="after"`` with no targets, so neither
costs a statistics pass. Memory: at most one dense copy of a layer (``sublayer``) or one extra activation
buffer (``layer``: the targets; ``dense``: the dense stream) at a time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.models.architecture import prunable_modules, sublayer_names
from llmprune.pipeline.capture import LayerCall, run_layer
from llmprune.pipeline.distributed import Communicator
from llmprune.pipeline.report import BlockReport
from llmprune.pipeline.statistics import Collected, InputStatistics
from llmprune.pipeline.walk import LayerContext, Timing

Mode = Literal["layer", "dense", "sublayer"]
RECONSTRUCTION_MODES: tuple[str, ...] = ("layer", "dense", "sublayer")


class Objective(Protocol):
    """What a layer's output is matched to."""

    def terms(
        self, layer: nn.Module, output: Callable[[], torch.Tensor], batch: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the layer on local batch ``batch`` (``output()`` does, returning its output) and return the
        (prediction, target) pairs to match; predictions carry the gradient when it is enabled."""
        ...


class OutputTargets:
    """The layer's output against one target tensor per local batch (``layer`` and ``dense`` modes)."""

    def __init__(self, targets: Sequence[torch.Tensor]) -> None:
        self.targets = targets

    def terms(
        self, layer: nn.Module, output: Callable[[], torch.Tensor], batch: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(output(), self.targets[batch])]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _detached_inputs(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: the sublayer's inputs cut from the graph, so its loss trains only itself."""
    return tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}


class SublayerTargets:
    """Each named sublayer's output against the dense copy of that sublayer applied to the same call
    (``sublayer`` mode; forward hooks with kwargs on the sublayers of the layer being fitted)."""

    def __init__(self, dense: nn.Module, names: Sequence[str]) -> None:
        self.dense, self.names = dense, list(names)

    def terms(
        self, layer: nn.Module, output: Callable[[], torch.Tensor], batch: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def record(dense: nn.Module):
            def hook(_module: nn.Module, args: tuple, kwargs: dict, result: Any) -> None:
                with torch.no_grad():
                    target = _first(dense(*args, **kwargs))
                pairs.append((_first(result), target))

            return hook

        handles = []
        try:
            for name in self.names:
                module = layer.get_submodule(name)
                handles.append(module.register_forward_pre_hook(_detached_inputs, with_kwargs=True))
                handles.append(
                    module.register_forward_hook(record(self.dense.get_submodule(name)), with_kwargs=True)
                )
            output()
        finally:
            for handle in handles:
                handle.remove()
        if len(pairs) != len(self.names):
            raise UsageError(f"the sublayers {', '.join(self.names)} were not each called once by the layer")
        return pairs


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """The learning rate of step ``step`` of ``steps``: cosine from ``lr`` (step 0) towards 0."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))


class _Trained:
    """The trained tensors of a layer: fp32 masters, the fixed zero masks, the start values."""

    def __init__(self, layer: nn.Module, modules: Sequence[nn.Module]) -> None:
        names = {id(module): name for name, module in layer.named_modules()}
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []  # the modules' own parameters' data
        self.masks: list[torch.Tensor | None] = []  # True where the weight is pruned (None: a bias)
        seen: set[int] = set()
        for module in modules:
            if id(module) not in names:
                raise UsageError(f"{type(module).__name__} to reconstruct is not part of the decoder layer")
            if id(module) in seen:
                continue
            seen.add(id(module))
            prefix = names[id(module)]
            for attr in ("weight", "bias"):
                parameter = getattr(module, attr, None)
                if isinstance(parameter, torch.Tensor):
                    self.names.append(f"{prefix}.{attr}" if prefix else attr)
                    self.tensors.append(parameter.data)
                    self.masks.append(parameter.data == 0 if attr == "weight" else None)
        self.start = [tensor.clone() for tensor in self.tensors]
        self.masters = [tensor.float().clone().requires_grad_(True) for tensor in self.tensors]

    def run(self, layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """The layer's output with the masters (cast to the layer's dtypes) in place of its parameters."""
        values = {
            name: master.to(tensor.dtype)
            for name, master, tensor in zip(self.names, self.masters, self.tensors, strict=True)
        }
        return _first(torch.func.functional_call(layer, values, (hidden, *call.args), call.kwargs))

    def mask_gradients(self) -> None:
        for master, mask in zip(self.masters, self.masks, strict=True):
            if master.grad is None:
                master.grad = torch.zeros_like(master)
            elif mask is not None:
                master.grad.masked_fill_(mask, 0.0)

    @torch.no_grad()
    def mask_masters(self) -> None:
        for master, mask in zip(self.masters, self.masks, strict=True):
            if mask is not None:
                master.masked_fill_(mask, 0.0)

    @torch.no_grad()
    def write_back(self) -> None:
        """Store the masters in the layer, cast to its dtypes, pruned weights exactly zero."""
        for tensor, master, mask in zip(self.tensors, self.masters, self.masks, strict=True):
            tensor.copy_(master)
            if mask is not None:
                tensor.masked_fill_(mask, 0)

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, start in zip(self.tensors, self.start, strict=True):
            tensor.copy_(start)


@contextmanager
def _frozen(layer: nn.Module) -> Iterator[None]:
    """No gradient for the layer's own parameters inside the block (the masters get them instead)."""
    flags = [(parameter, parameter.requires_grad) for parameter in layer.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _batch_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ over the pairs of ‖prediction − target‖² / ‖target‖², in fp32."""
    loss = torch.zeros((), device=pairs[0][0].device)
    for prediction, target in pairs:
        target = target.float()
        loss = loss + (prediction.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)
    return loss


ERROR_EVERY = 4
"""The error before and after fitting is measured on every ``ERROR_EVERY``-th calibration batch (global
index), which costs a quarter of a pass each instead of two whole passes over the batches."""


@torch.no_grad()
def block_error(
    layer: nn.Module,
    inputs: Sequence[torch.Tensor],
    calls: Sequence[LayerCall],
    objective: Objective,
    comm: Communicator,
    first_batch: int = 0,
    every: int = 1,
) -> float:
    """‖f(x) − target‖ / ‖target‖ over every term of every ``every``-th batch (by global index,
    ``first_batch`` being the first local batch's), summed over processes (float64)."""
    device = inputs[0].device if len(inputs) else next(layer.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for b, (hidden, call) in enumerate(zip(inputs, calls, strict=True)):
        if (first_batch + b) % every:
            continue
        for prediction, target in objective.terms(layer, lambda h=hidden, c=call: run_layer(layer, h, c), b):
            target = target.double()
            sums[0] += (prediction.double() - target).pow(2).sum()
            sums[1] += target.pow(2).sum()
    comm.all_reduce(sums)
    return math.sqrt(float(sums[0]) / max(float(sums[1]), 1e-300))


def check_fit_options(steps: int, lr: float) -> None:
    """Refuse a non-positive step count or learning rate (before anything is loaded)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"reconstruction steps must be a positive integer, got {steps!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"reconstruction learning rate must be a positive number, got {lr!r}")


def fit_layer(
    layer: nn.Module,
    inputs: Sequence[torch.Tensor],
    calls: Sequence[LayerCall],
    objective: Objective,
    modules: Sequence[nn.Module],
    steps: int,
    lr: float,
    comm: Communicator | None = None,
    first_batch: int = 0,
    total_batches: int | None = None,
) -> BlockReport:
    """Fit the weights and biases of ``modules`` (linear layers inside ``layer``) so that the layer's
    output on ``inputs``/``calls`` (this process's batches, ``first_batch`` the first one's global index of
    ``total_batches``) matches ``objective``; everything else stays frozen and every zero weight stays
    exactly zero. ``steps`` Adam steps, step t on global batch t mod total, on a cosine schedule from
    ``lr``; the gradient of each step is summed over processes so that every process takes the same step.
    Returns the error before and after (on every ``ERROR_EVERY``-th batch); the start weights are restored
    if the fit failed or did not help.
    """
    comm = comm or Communicator()
    check_fit_options(steps, lr)
    local = len(inputs)
    total = local if total_batches is None else total_batches
    if not 0 <= first_batch <= total - local:
        raise UsageError(f"batches {first_batch}..{first_batch + local} are not among {total} batches")
    trained = _Trained(layer, modules)
    with _frozen(layer):
        every = ERROR_EVERY  # read at call time (the tests measure on every batch)
        before = block_error(layer, inputs, calls, objective, comm, first_batch, every)
        if not math.isfinite(before):
            return BlockReport(before, before, 0, "the error before fitting is not finite")
        optimiser = torch.optim.Adam(trained.masters, lr=lr)
        taken, reason = 0, None
        for step in range(steps):
            for group in optimiser.param_groups:
                group["lr"] = cosine_lr(lr, step, steps)
            optimiser.zero_grad(set_to_none=True)
            batch = step % total - first_batch
            if 0 <= batch < local:  # this process holds the step's batch
                hidden, call = inputs[batch], calls[batch]
                with torch.enable_grad():
                    pairs = objective.terms(layer, lambda h=hidden, c=call: trained.run(layer, h, c), batch)
                    _batch_loss(pairs).backward()
                del pairs
            trained.mask_gradients()
            if comm.world_size > 1:
                flat = torch.cat([master.grad.reshape(-1) for master in trained.masters])
                comm.all_reduce(flat)
                start = 0
                for master in trained.masters:
                    master.grad.copy_(flat[start : start + master.numel()].view_as(master))
                    start += master.numel()
                del flat
            if not bool(torch.stack([torch.isfinite(master.grad).all() for master in trained.masters]).all()):
                reason = f"the gradient of step {step + 1} is not finite"
                break
            optimiser.step()
            trained.mask_masters()
            taken += 1
        del optimiser
        if reason is None:
            trained.write_back()
            after = block_error(layer, inputs, calls, objective, comm, first_batch, every)
            if not math.isfinite(after):
                reason = "the error after fitting is not finite"
            elif after > before:
                reason = f"the error rose from {before:.4g} to {after:.4g}"
            else:
                return BlockReport(before, after, taken)
        trained.restore()
        return BlockReport(before, before, taken, reason)


def check_reconstruction(model: nn.Module, mode: str) -> tuple[str, ...]:
    """The sublayers ``mode`` matches separately (none but for ``sublayer``); refuses a mode the model's
    family cannot do."""
    if mode not in RECONSTRUCTION_MODES:
        choices = ", ".join(RECONSTRUCTION_MODES)
        raise UsageError(f"unknown reconstruction mode {mode!r} (choose from {choices})")
    if mode != "sublayer":
        return ()
    attention, mlp = sublayer_names(model)
    if attention is None or mlp is None:
        family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        what = "its MLP is not a module of its own" if attention is not None else "its sublayers are unknown"
        raise UsageError(f"--reconstruct sublayer does not apply to {family}: {what}; use layer or dense")
    return attention, mlp


class _Step:
    """One of the two walk steps of ``ReconstructionSteps`` (``timing="after"``, no targets)."""

    statistic: Collected = "none"
    timing: Timing = "after"

    def __init__(self, owner: ReconstructionSteps, after: bool) -> None:
        self.owner, self.is_after = owner, after

    def targets(self, index: int, prefix: str, layer: nn.Module) -> dict[str, nn.Module] | None:
        if not self.is_after and self.owner.mode == "dense":
            return {}  # the dense stream goes on through every layer
        return {} if self.owner.trained_modules(index, prefix, layer) else None

    def carried(self) -> dict[str, torch.Tensor]:
        """``dense``: the dense stream, checkpointed by the walk with each layer (``walk.Carrying``)."""
        stream = self.owner._stream if not self.is_after else None
        return {} if stream is None else {str(b): hidden for b, hidden in enumerate(stream)}

    def restore_carried(self, next_layer: int, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            self.owner._stream = [tensors[str(b)] for b in range(len(tensors))]
            self.owner._next = next_layer

    def apply(self, layer: nn.Module, stats: dict[str, InputStatistics], context: LayerContext) -> nn.Module:
        if self.is_after:
            self.owner.fit(layer, context)
        else:
            self.owner.keep(layer, context)
        return layer


def _every_linear(index: int, prefix: str, layer: nn.Module) -> list[nn.Module]:
    return list(prunable_modules(layer, prefix).values())


class ReconstructionSteps:
    """Block-wise reconstruction as two walk steps around a pruning step:
    ``walk_layers(model, batches, [recon.before, pruning_step, recon.after], ...)``.

    ``modules(index, prefix, layer)`` names the linear layers to train in decoder layer ``index`` (the
    pruned ones; default: every linear layer of the layer). Each fitted layer's ``BlockReport`` goes to the
    walk's ``WalkContext.blocks``, in order (checkpointed with the layer).
    """

    def __init__(
        self,
        model: nn.Module,
        mode: Mode,
        steps: int,
        lr: float,
        modules: Callable[[int, str, nn.Module], Sequence[nn.Module]] | None = None,
    ) -> None:
        self.sublayers = check_reconstruction(model, mode)
        check_fit_options(steps, lr)
        self.mode, self.steps, self.lr = mode, steps, lr
        self._modules = modules or _every_linear
        self.before = _Step(self, after=False)
        self.after = _Step(self, after=True)
        self._dense: nn.Module | None = None  # sublayer: the dense layer
        self._targets: list[torch.Tensor] | None = None  # layer: the dense layer's outputs
        self._stream: list[torch.Tensor] | None = None  # dense: the dense model's hidden states
        self._next = 0  # dense: the layer the stream enters next

    def trained_modules(self, index: int, prefix: str, layer: nn.Module) -> list[nn.Module]:
        return list(self._modules(index, prefix, layer))

    def keep(self, layer: nn.Module, context: LayerContext) -> None:
        """Before pruning: keep what the target needs from the still dense ``layer``."""
        inputs, calls = context.inputs, context.calls
        if self.mode == "dense":
            if self._stream is None:
                if context.index != 0:
                    raise UsageError("--reconstruct dense needs its dense stream: a walk from layer 0, or a "
                                     "checkpoint that holds it")
                self._stream = list(inputs)
            elif context.index != self._next:
                raise UsageError(f"--reconstruct dense: layer {context.index} reached, {self._next} expected")
            for b, call in enumerate(calls):
                self._stream[b] = run_layer(layer, self._stream[b], call)
            self._next = context.index + 1
        elif self.mode == "layer":
            self._targets = [run_layer(layer, h, c) for h, c in zip(inputs, calls, strict=True)]
        else:
            for name in self.sublayers:
                try:
                    layer.get_submodule(name)
                except AttributeError:
                    raise UsageError(f"decoder layer {context.index} has no sublayer {name!r}") from None
            self._dense = copy.deepcopy(layer).requires_grad_(False)

    def fit(self, layer: nn.Module, context: LayerContext) -> None:
        """After pruning: fit the layer to the target, record the report, drop what ``keep`` kept."""
        objective: Objective
        if self.mode == "dense":
            targets = self._stream
        elif self.mode == "layer":
            targets, self._targets = self._targets, None
        else:
            targets = None
        if self.mode == "sublayer":
            if self._dense is None:
                raise RuntimeError("ReconstructionSteps.after ran without .before on the same layer")
            objective = SublayerTargets(self._dense, self.sublayers)
        else:
            if targets is None:
                raise RuntimeError("ReconstructionSteps.after ran without .before on the same layer")
            objective = OutputTargets(targets)
        walk = context.walk
        try:
            report = fit_layer(
                layer,
                context.inputs,
                context.calls,
                objective,
                self.trained_modules(context.index, context.prefix, layer),
                self.steps,
                self.lr,
                walk.comm,
                walk.first_batch,
                walk.total_batches,
            )
        finally:
            self._dense = None
            del objective, targets
        report.layer = context.index
        walk.blocks.append(report)
