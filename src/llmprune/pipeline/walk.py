"""The one sequential walk over a model's decoder layers, and the per-layer steps it runs.

``walk_layers`` captures what decoder layer 0 receives for each calibration batch, then for each decoder
layer in turn: loads it (``LayerSource``), runs the steps on it, computes its outputs, keeps them as the
next layer's inputs (``ActivationStore``), checkpoints it (``LayerCheckpoint``) and hands it back. Every
pass over the layers goes through it: pruning (SparseGPT §3.5; Wanda §3: each layer is pruned on the
outputs of the already pruned layers before it), the dense scoring passes of structured pruning, and
streamed perplexity (no steps).

A step (``LayerStep``) says which linear layers' inputs it needs (``targets``), what to accumulate about
them (``statistic``) and when it works (``timing``):

- ``after``: the layer runs on every batch, feeding the statistics (stopping early once they are fed;
  not at all when the step names no targets); ``apply`` then works on the layer (and may return a new,
  smaller one), whose outputs are computed after;
- ``during``: ``apply`` runs inside the layer's own forward, in a pre-forward hook, for each target as
  soon as every batch has fed its statistics (true-sequential: each linear layer is pruned from the inputs
  it actually receives, after the pruned sublayers before it); the outputs are those of that forward;
- ``observe``: the layer runs on every batch, feeding the statistics; ``apply`` sees its inputs and
  outputs (``LayerContext.outputs``) and leaves it as it is.

Across processes every process walks its own share of the batches; statistics are summed over processes
(``reduce``) before a step reads them, so every process reaches the same steps in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from llmprune.errors import NonFiniteError, UsageError
from llmprune.models.architecture import decoder_layers
from llmprune.pipeline.capture import LayerCall, capture_layer_inputs, model_device, run_layer
from llmprune.pipeline.distributed import Communicator
from llmprune.pipeline.lockstep import Lockstep
from llmprune.pipeline.offload import ActivationStore, LayerSource
from llmprune.pipeline.report import BlockReport, LinearReport
from llmprune.pipeline.resume import LayerCheckpoint
from llmprune.pipeline.statistics import Collected, InputStatistics

ProgressCallback = Callable[[int, int], None]

Timing = Literal["after", "during", "observe"]


@dataclass
class WalkContext:
    """What every layer of one walk shares."""

    comm: Communicator = field(default_factory=Communicator)
    stride: int | None = None
    """Every ``stride``-th calibration token is kept to measure reconstruction error (None: none kept)."""
    offset: int = 0
    """Index of this process's first calibration token."""
    first_batch: int = 0
    """Index of this process's first calibration batch among all processes' batches."""
    total_batches: int | None = None
    """Calibration batches of all processes together (None: this process's are all of them)."""
    rows: list[LinearReport] = field(default_factory=list)
    """Report rows of the layers done so far (checkpointed with each layer, restored on resuming)."""
    blocks: list[BlockReport] = field(default_factory=list)
    """Block reconstruction of the layers done so far (checkpointed and restored as ``rows``)."""


@dataclass
class LayerContext:
    """What a step is told about the decoder layer it works on."""

    index: int
    prefix: str
    """The layer's dotted name (e.g. ``model.layers.3``): its linear layers' names start with it."""
    inputs: Sequence[torch.Tensor]
    """The hidden states entering the layer, one tensor per calibration batch."""
    outputs: list[torch.Tensor] | None
    """``observe``: the layer's outputs, one per batch (None otherwise)."""
    position: int
    """``during``: how many of this layer's targets were applied before this one (0 otherwise)."""
    walk: WalkContext
    calls: Sequence[LayerCall] = ()
    """The layer's other call arguments, one per batch (``run_layer(layer, inputs[b], calls[b])``)."""


class LayerStep(Protocol):
    """Per-layer work of a walk (see the module's docstring)."""

    statistic: Collected
    timing: Timing

    def targets(self, index: int, prefix: str, layer: nn.Module) -> dict[str, nn.Module] | None:
        """The linear layers of decoder layer ``index`` whose inputs the step needs, by full dotted name
        (``prefix.`` + their name in the layer); None: the step leaves this layer alone."""
        ...

    def apply(
        self, layer: nn.Module, stats: dict[str, InputStatistics], context: LayerContext
    ) -> nn.Module:
        """Do the work on ``layer`` from the statistics of its targets' inputs (``during``: of one target;
        summed over processes); returns the layer to go on with (``after``: possibly a new one)."""
        ...


@runtime_checkable
class Carrying(Protocol):
    """A step that carries tensors from one decoder layer to the next (e.g. a second, dense stream of
    activations): the walk checkpoints them with each layer and hands them back on resuming."""

    def carried(self) -> dict[str, torch.Tensor]:
        """The tensors to carry past the layer just finished, by name."""
        ...

    def restore_carried(self, next_layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Resuming at ``next_layer``: the tensors ``carried`` gave after the layer before it."""
        ...


@dataclass
class Walked:
    """The outcome of a walk."""

    hidden: Sequence[torch.Tensor]
    """The hidden states leaving the last decoder layer, one tensor per batch."""
    device: torch.device
    """Where the walk computed (the device of the model's first loaded parameter)."""


def calibration_rows(calibration: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The calibration sequences as a list of 1-D LongTensors, validated."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise UsageError("calibration must be a LongTensor [n, seqlen] or an iterable of 1-D LongTensors")
        rows = list(calibration)
    else:
        rows = [torch.as_tensor(row) for row in calibration]
    if not rows:
        raise UsageError("calibration data is empty")
    for row in rows:
        if row.dim() != 1 or row.dtype != torch.long:
            raise UsageError("each calibration sequence must be a 1-D LongTensor of token ids")
    return rows


def calibration_batches(
    calibration: torch.Tensor | Iterable[torch.Tensor], batch_size: int
) -> list[torch.Tensor]:
    """Group calibration sequences into batches of equal-length rows."""
    batches: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    for row in calibration_rows(calibration):
        if run and (len(run) == batch_size or run[0].shape != row.shape):
            batches.append(torch.stack(run))
            run = []
        run.append(row)
    batches.append(torch.stack(run))
    return batches


class StopLayer(Exception):
    """Raised by a statistics hook once a dense pass has fed every statistic: the rest is not needed."""


class _StatisticsHooks:
    """Pre-forward hooks that feed each target's input into statistics shared by identity of the input.

    Linear layers reading the very same tensor (q/k/v, gate/up) share one accumulator, so a Hessian or a
    norm is computed once per distinct input. ``on_ready`` (``during``) is called as soon as stats exist;
    with ``stop``, a dense pass stops once every statistic is fed (``StopLayer``).
    """

    def __init__(
        self,
        targets: dict[str, nn.Module],
        statistic: Collected,
        walk: WalkContext,
        stop: bool = False,
        on_ready: Callable[[str, InputStatistics], None] | None = None,
    ) -> None:
        self.statistic, self.walk, self.stop, self.on_ready = statistic, walk, stop, on_ready
        self.stats: dict[str, InputStatistics] = {}
        self._leaders: set[str] = set()
        self._seen: dict[int, tuple[torch.Tensor, InputStatistics]] = {}
        # Calls seen in the first batch; afterwards a dense pass can stop at the last one (it has what it
        # needs: nothing after the last linear layer feeds a statistic).
        self._calls: list[str] = []
        self._stop_after: tuple[str, int] | None = None
        self._count: dict[str, int] = {}
        self._handles = [module.register_forward_pre_hook(self._hook(n)) for n, module in targets.items()]

    def _hook(self, name: str):
        def pre_forward(_module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if name not in self.stats:
                seen = self._seen.get(id(inputs))
                if seen is not None and seen[0] is inputs:
                    self.stats[name] = seen[1]
                else:
                    width, walk = inputs.shape[-1], self.walk
                    stats = InputStatistics(width, self.statistic, walk.stride, inputs.device, walk.offset)
                    stats.update(inputs)
                    self.stats[name] = stats
                    self._leaders.add(name)
                    self._seen[id(inputs)] = (inputs, stats)
            elif name in self._leaders:
                self.stats[name].update(inputs)
            if self.on_ready is not None:
                self.on_ready(name, self.stats[name])
            elif not self.stop:
                return
            elif self._stop_after is None:
                self._calls.append(name)
            else:
                self._count[name] = self._count.get(name, 0) + 1
                if (name, self._count[name]) == self._stop_after:
                    raise StopLayer

        return pre_forward

    def next_batch(self) -> None:
        self._seen.clear()
        self._count.clear()
        if self._stop_after is None and self._calls:
            last = self._calls[-1]
            self._stop_after = (last, self._calls.count(last))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise ``NonFiniteError`` if ``tensor`` holds a NaN or an Inf."""
    # A sum is NaN/Inf if any element is; only then (or on overflow) look element by element.
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"NaN or Inf in {what}")


def _checked(outputs: Iterable[torch.Tensor], what: str) -> Iterator[torch.Tensor]:
    for tensor in outputs:
        check_finite(tensor, what)
        yield tensor


def _never_called(targets: Iterable[str], reached: Iterable[str]) -> None:
    reached = set(reached)
    missing = [name for name in targets if name not in reached]
    if missing:
        raise UsageError(f"never called during the forward pass: {', '.join(missing)}")


def _statistics_pass(
    step: LayerStep,
    layer: nn.Module,
    targets: dict[str, nn.Module],
    hidden: Sequence[torch.Tensor],
    calls: list[LayerCall],
    walk: WalkContext,
) -> tuple[dict[str, InputStatistics], list[torch.Tensor] | None]:
    """Statistics of the targets' inputs while the layer runs on every batch, summed over processes (in
    the same order on every process; statistics shared by several targets once); with ``observe``, the
    layer's outputs too."""
    observe = step.timing == "observe"
    hooks = _StatisticsHooks(targets, step.statistic, walk, stop=not observe)
    outputs: list[torch.Tensor] = []
    try:
        for h, c in zip(hidden, calls, strict=True):
            if observe:
                outputs.append(run_layer(layer, h, c))
            else:
                with contextlib.suppress(StopLayer):
                    run_layer(layer, h, c)
            hooks.next_batch()
    finally:
        hooks.remove()
    _never_called(targets, hooks.stats)
    for name in targets:
        hooks.stats[name].reduce(walk.comm)
    return hooks.stats, outputs if observe else None


def _apply_during(
    step: LayerStep,
    layer: nn.Module,
    targets: dict[str, nn.Module],
    context: LayerContext,
    calls: list[LayerCall],
) -> list[torch.Tensor]:
    """Run the layer with ``step.apply`` called on each target just before it runs, from the inputs it
    receives; return the outputs.

    Batches run in lockstep: each stops at a target's pre-hook until all batches have fed its statistics,
    then the step applies once and every batch runs the target as it is then.
    """
    done: list[str] = []
    lockstep = Lockstep()

    def apply_now(name: str, stats: InputStatistics) -> None:
        # Every process reaches the same targets in the same order, so the collectives match up.
        if name not in done:
            context.position = len(done)
            done.append(name)
            stats.reduce(context.walk.comm)
            if step.apply(layer, {name: stats}, context) is not layer:
                raise TypeError("a step applied during the layer's forward must keep the layer")

    def ready(name: str, stats: InputStatistics) -> None:
        lockstep.meet(name, lambda: apply_now(name, stats))

    hooks = _StatisticsHooks(targets, step.statistic, context.walk, on_ready=ready)
    try:
        hidden = list(context.inputs)
        tasks = [lambda h=h, c=c: run_layer(layer, h, c) for h, c in zip(hidden, calls, strict=True)]
        outputs = lockstep.run(tasks)
    finally:
        hooks.remove()
    _never_called(targets, done)
    return outputs


def _run_step(
    step: LayerStep,
    layer: nn.Module,
    targets: dict[str, nn.Module],
    calls: list[LayerCall],
    context: LayerContext,
) -> tuple[nn.Module, list[torch.Tensor] | None]:
    """One step on one layer: the layer to go on with, and its outputs if the step computed them."""
    if step.timing == "during":
        return layer, _apply_during(step, layer, targets, context, calls)
    if step.timing == "after" and not targets:  # nothing to collect: no pass over the batches
        stats, context.outputs = {}, None
    else:
        stats, context.outputs = _statistics_pass(step, layer, targets, context.inputs, calls, context.walk)
    result = step.apply(layer, stats, context)
    if step.timing == "observe" and result is not layer:
        raise TypeError("an observing step must keep the layer")
    return result, context.outputs


@torch.no_grad()
def walk_layers(
    model: nn.Module,
    batches: list[torch.Tensor],
    steps: Sequence[LayerStep] = (),
    context: WalkContext | None = None,
    *,
    layers_from: LayerSource | None = None,
    activations: ActivationStore | None = None,
    checkpoint: LayerCheckpoint | None = None,
    progress: ProgressCallback | None = None,
    check_outputs: bool = False,
) -> Walked:
    """Run the batches of token ids through every decoder layer in turn, ``steps`` working on each layer.

    ``layers_from`` loads each decoder layer just before it is needed and takes it back once done
    (streaming, see ``pipeline/offload.py``); ``activations`` keeps the hidden states between layers, in
    RAM or on disk. With a ``checkpoint``, progress is saved after every layer, and a walk finding progress
    saved there restores the finished layers (and their report rows, into ``context.rows``) and goes on
    from the next one. ``progress(done, total)`` is called before the first layer and after each.
    ``check_outputs``: refuse NaN or Inf in the embeddings' output and every layer's outputs.
    """
    context = context or WalkContext()
    layers_from = layers_from or LayerSource()
    activations = activations or ActivationStore()
    path, layers = decoder_layers(model)
    layers_from.load_outside(head=False)
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    captured = capture_layer_inputs(model, layers, batches)  # every layer's call arguments, even if resuming
    layers_from.release_outside()
    if check_outputs:
        for batch in captured.hidden:
            check_finite(batch, "the embeddings' output")
    first = 0
    restored = None
    if checkpoint is not None:
        restored = checkpoint.restore(layers, device, lambda i, w: layers_from.restore(i, layers[i], w))
    if restored is not None:
        first, captured.hidden = restored.next_layer, restored.hidden
        context.rows.extend(restored.rows)
        context.blocks.extend(restored.blocks)
        for k, step in enumerate(steps):
            if isinstance(step, Carrying):
                prefix = f"{k}/"
                mine = {n[len(prefix) :]: t for n, t in restored.carried.items() if n.startswith(prefix)}
                step.restore_carried(first, mine)
    hidden = activations.start(captured.hidden)
    captured.hidden = []  # the store holds them now
    if progress is not None:
        progress(first, len(layers))
    for index in range(first, len(layers)):
        layer, calls = layers[index], captured.calls[index]
        layers_from.load(index, layer)
        prefix = f"{path}.{index}"
        outputs: Iterable[torch.Tensor] | None = None  # the layer's outputs, once a step has computed them
        for step in steps:
            targets = step.targets(index, prefix, layer)
            if targets is None:
                continue
            layer_context = LayerContext(index, prefix, hidden, None, 0, context, calls)
            changed, outputs = _run_step(step, layer, targets, calls, layer_context)
            if changed is not layer:
                layer = layers[index] = changed
        if outputs is None:
            outputs = (run_layer(layer, h, c) for h, c in zip(hidden, calls, strict=True))
        if check_outputs:
            outputs = _checked(outputs, f"the outputs of decoder layer {index}")
        hidden = activations.keep(outputs)
        if checkpoint is not None:
            carried = {
                f"{k}/{name}": tensor
                for k, step in enumerate(steps)
                if isinstance(step, Carrying)
                for name, tensor in step.carried().items()
            }
            checkpoint.save(index, layer, list(hidden), context.rows, context.blocks, carried)
        layers_from.finish(index, layer)
        if progress is not None:
            progress(index + 1, len(layers))
    return Walked(hidden, device)
