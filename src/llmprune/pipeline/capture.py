"""Capture what each decoder layer is called with, so layers can then be run one at a time.

The model body is run once per calibration batch with every decoder layer's ``forward`` swapped for a
recorder that returns its input unchanged: that records layer 0's hidden states plus every argument each
layer receives (attention masks, position ids, rotary ``position_embeddings``; per layer, since e.g.
Gemma 2 alternates sliding-window and full masks) without computing any layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmprune.models.architecture import base_model


class _StopForward(Exception):
    pass


@dataclass
class LayerCall:
    """Positional arguments after the hidden states, and keyword arguments, of one layer call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CapturedInputs:
    hidden: list[torch.Tensor]
    """Hidden states entering decoder layer 0, one tensor per batch."""
    calls: list[list[LayerCall]]
    """``calls[layer][batch]``: the other arguments of that layer's call."""


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    kwargs = dict(kwargs)
    if args:
        hidden, rest = args[0], tuple(args[1:])
    else:
        hidden, rest = kwargs.pop("hidden_states"), ()
    kwargs["use_cache"] = False
    return hidden, LayerCall(rest, kwargs)


@contextlib.contextmanager
def _forwards_replaced(layers: nn.ModuleList, make: Callable[[int], Callable[..., torch.Tensor]]):
    """Swap each decoder layer's ``forward`` for ``make(index)`` inside the block, restoring it after."""
    originals = [layer.__dict__.get("forward") for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = make(index)
        yield
    finally:
        for layer, original in zip(layers, originals, strict=True):
            if original is None:
                del layer.forward
            else:
                layer.forward = original


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]
) -> CapturedInputs:
    """Record layer 0's inputs and every layer's call arguments for each batch of token ids."""
    body = base_model(model)
    device = model_device(model)
    captured = CapturedInputs(hidden=[], calls=[[] for _ in layers])

    def recorder(index: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden, call = _split(args, kwargs)
            captured.calls[index].append(call)
            if index == 0:
                captured.hidden.append(hidden)
            if index == len(layers) - 1:
                raise _StopForward
            return hidden

        return forward

    with _forwards_replaced(layers, recorder):
        for batch in batches:
            with contextlib.suppress(_StopForward):
                body(input_ids=batch.to(device), use_cache=False)
    return captured


@contextlib.contextmanager
def replaying(layers: nn.ModuleList, outputs: Iterable[torch.Tensor]):
    """Inside the block, a model forward skips its decoder layers and takes ``outputs`` (one per call, in
    order) as the last layer's hidden states; the model's own final norm and head then apply as usual."""
    pending = iter(outputs)

    def replay(index: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden, _ = _split(args, kwargs)
            return next(pending) if index == 0 else hidden

        return forward

    with _forwards_replaced(layers, replay):
        yield


def model_device(model: nn.Module) -> torch.device:
    """Where token ids go: the device of the first parameter that is not on the meta device."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """Run one decoder layer on captured arguments; returns its output hidden states."""
    output = layer(hidden, *call.args, **call.kwargs)
    return output[0] if isinstance(output, tuple | list) else output
