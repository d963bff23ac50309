"""Where the removable units of a decoder layer live, per family, as data.

An attention head is a slice of ``head_dim`` rows of q/k/v and the same columns of the output projection;
an MLP channel is one row of each input projection (gate and up) and one column of the output projection.
The config fields that give the widths are named here too, so a pruned model's config can be rewritten and
plain ``from_pretrained`` builds the smaller shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from llmprune.errors import UsageError
from llmprune.models.architecture import describe


@dataclass(frozen=True)
class UnitLayout:
    """Module paths inside one decoder layer, and the config fields holding its widths."""

    mlp_inputs: tuple[str, ...]
    """Projections whose output rows are MLP channels (gate and up)."""
    mlp_output: str
    """Projection whose input columns are MLP channels (down)."""
    mlp_width: str
    """Config field of the MLP width."""
    attention: tuple[str, str, str, str] | None = None
    """q, k, v and output projections, when heads can be removed (separate q/k/v, explicit head size)."""
    bias_flags: tuple[str, str] | None = None
    """Config flags giving the attention and MLP projections biases, if the family has them (for FLAP's
    bias compensation where the output projection has no bias of its own)."""


_LLAMA = UnitLayout(
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    mlp_output="mlp.down_proj",
    mlp_width="intermediate_size",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
)

LAYOUTS: dict[str, UnitLayout] = {
    "llama": dataclasses.replace(_LLAMA, bias_flags=("attention_bias", "mlp_bias")),
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    # OPT and GPT-2 derive the head size from hidden_size / heads, so a model with fewer heads would not
    # load in transformers: for them, MLP channels and whole layers only.
    "opt": UnitLayout(mlp_inputs=("fc1",), mlp_output="fc2", mlp_width="ffn_dim"),
    "gpt2": UnitLayout(mlp_inputs=("mlp.c_fc",), mlp_output="mlp.c_proj", mlp_width="n_inner"),
    "gpt_neox": UnitLayout(
        mlp_inputs=("mlp.dense_h_to_4h",), mlp_output="mlp.dense_4h_to_h", mlp_width="intermediate_size"
    ),
}


def unit_layout(model: nn.Module, units: list[str]) -> UnitLayout | None:
    """The layout of ``model``'s decoder layers, checked against the units to remove (None: layers only)."""
    model_type = getattr(model.config, "model_type", None)
    widths = [unit for unit in units if unit != "layers"]
    if not widths:
        describe(model)  # a stack of decoder layers is all that layer removal needs
        return None
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise UsageError(
            f"removing {' and '.join(widths)} is not supported for model type {model_type!r} "
            f"(supported: {', '.join(sorted(LAYOUTS))}); whole layers can be removed from any model"
        )
    if "heads" in widths and layout.attention is None:
        raise UsageError(
            f"attention heads of {model_type} models cannot be removed into a model transformers can load "
            "(its head size is hidden_size / heads); use --units channels,layers"
        )
    return layout
