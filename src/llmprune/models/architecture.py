"""Where things are in a causal LM, described by data rather than by copied per-family code.

Every supported family is a stack of decoder layers; the table says where that stack and the final norm
live. Unknown families fall back to the largest ``ModuleList`` of identical blocks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmprune.errors import UsageError

if TYPE_CHECKING:
    from llmprune.methods.patterns import Pattern


@dataclass(frozen=True)
class Architecture:
    """Module paths (dotted, from the CausalLM root) of the parts the pipeline needs."""

    layers: str
    final_norm: str | None
    attention: str | None = None
    """The attention sublayer's name inside a decoder layer (None: unknown)."""
    mlp: str | None = None
    """The MLP sublayer's name inside a decoder layer (None: no MLP module, e.g. OPT's fc1/fc2 sit on the
    layer itself, or unknown)."""


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("model.layers", "model.norm", "self_attn", "mlp"),
    "mistral": Architecture("model.layers", "model.norm", "self_attn", "mlp"),
    "qwen2": Architecture("model.layers", "model.norm", "self_attn", "mlp"),
    "qwen3": Architecture("model.layers", "model.norm", "self_attn", "mlp"),
    "gemma": Architecture("model.layers", "model.norm", "self_attn", "mlp"),
    "gemma2": Architecture("model.layers", "model.norm", "self_attn", "mlp"),
    "gemma3_text": Architecture("model.layers", "model.norm", "self_attn", "mlp"),
    "phi3": Architecture("model.layers", "model.norm", "self_attn", "mlp"),
    "opt": Architecture("model.decoder.layers", "model.decoder.final_layer_norm", "self_attn", None),
    "gpt2": Architecture("transformer.h", "transformer.ln_f", "attn", "mlp"),
    "gpt_neox": Architecture("gpt_neox.layers", "gpt_neox.final_layer_norm", "attention", "mlp"),
}

PRUNABLE_TYPES = (nn.Linear, Conv1D)

# Config fields that state the longest sequence a model takes, by family (GPT-2's n_positions is also
# reachable as max_position_embeddings through its attribute map; older configs name it n_ctx).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config: Any) -> int | None:
    """The longest sequence a model's config allows, in tokens (None when it states none)."""
    if hasattr(config, "get_text_config"):  # a multimodal config keeps the language model's apart
        config = config.get_text_config()
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_window(name: str, config: Any, tokens: int, what: str) -> None:
    """A window of ``tokens`` (``what`` sets it, e.g. ``--seqlen 512``) must fit in the context of the
    model ``name``, checked on its config before the model is loaded. Past its learned positions GPT-2
    fails with an IndexError, and a RoPE model runs without a word on positions it was never trained on:
    both are refused."""
    limit = context_length(config)
    if limit is not None and tokens > limit:
        raise UsageError(f"{what} is longer than the context of {name} ({limit} positions)")


def check_windows(name: str, config: Any, windows: dict[str, int]) -> None:
    """``check_window`` for each of ``windows`` (``{"--seqlen": 512, ...}``: the flag, its tokens)."""
    for flag, tokens in windows.items():
        check_window(name, config, tokens, f"{flag} {tokens}")


def describe(model: nn.Module) -> Architecture:
    """The architecture record for a model: from the table, else found by structure."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    candidates = [
        (len(module), name)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise UsageError(f"cannot find a stack of decoder layers in model type {model_type!r}")
    _, layers = max(candidates)
    return Architecture(layers, None)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the ``ModuleList`` of decoder layers."""
    path = describe(model).layers
    return path, model.get_submodule(path)


def sublayer_names(model: nn.Module) -> tuple[str | None, str | None]:
    """The attention and MLP sublayers' names inside each decoder layer of ``model`` (None where the
    family has no such module or is not in the table)."""
    arch = describe(model)
    return arch.attention, arch.mlp


def prunable_modules(layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Linear (and GPT-2 ``Conv1D``) modules of one decoder layer, by full dotted name."""
    return {
        f"{prefix}.{name}": module
        for name, module in layer.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
    }


def linear_layers(
    model: nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = ()
) -> list[dict[str, nn.Module]]:
    """Per decoder layer, its linear modules by full dotted name that the globs select (``selects``)."""
    path, layers = decoder_layers(model)
    include, exclude = list(include), list(exclude)
    return [
        {
            name: module
            for name, module in prunable_modules(layer, f"{path}.{index}").items()
            if selects(name, include, exclude)
        }
        for index, layer in enumerate(layers)
    ]


def selects(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Whether the globs (``--include``/``--exclude``) leave the linear layer ``name`` to be pruned: it
    matches one of ``include`` (if any are given) and none of ``exclude``."""
    include = list(include)
    if include and not any(fnmatch.fnmatchcase(name, glob) for glob in include):
        return False
    return not any(fnmatch.fnmatchcase(name, glob) for glob in exclude)


def check_pattern_fits(modules: dict[str, nn.Module], pattern: Pattern) -> None:
    """Refuse an N:M pattern whose M does not divide the input width of one of ``modules``."""
    if not pattern.is_nm:
        return
    for name, module in modules.items():
        if input_width(module) % pattern.m:
            raise UsageError(
                f"{name}: input width {input_width(module)} is not divisible by M={pattern.m} "
                f"of pattern {pattern}"
            )


def input_width(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features


def stored_layout(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """An ``[out, in]`` tensor (a weight, a mask) in the layout of ``module``'s own weight, or the reverse:
    GPT-2's ``Conv1D`` stores ``[in, out]`` (a transposed view), every other linear layer ``[out, in]``."""
    return tensor.t() if isinstance(module, Conv1D) else tensor


def read_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a transposed view for ``Conv1D``)."""
    return stored_layout(module, module.weight.data)


def write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Store an ``[out, in]`` weight back in the module's own layout and dtype."""
    module.weight.data.copy_(stored_layout(module, weight))


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head): running it is cheaper than running the CausalLM."""
    body = getattr(model, "base_model", model)
    return body if body is not None else model
