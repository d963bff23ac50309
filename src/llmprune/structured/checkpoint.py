"""Saving and loading a model whose decoder layers have different widths (``--widths adaptive``).

One Hugging Face config cannot describe such a model, so it is saved as an ordinary safetensors checkpoint
whose ``config.json`` keeps the dense widths, and ``llmprune.json`` records every layer's widths under
``layer_widths`` (query heads, key/value heads, MLP width). ``llmprune.load`` builds the model from the
config with empty (meta) weights, replaces each decoder layer by one of its recorded widths
(``removal.config_with_widths``), then reads every tensor from the checkpoint: each one must match.
Plain ``from_pretrained`` fails on such a checkpoint with a size-mismatch error.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from llmprune.errors import UsageError
from llmprune.models.architecture import decoder_layers, read_weight
from llmprune.structured.layout import LAYOUTS, UnitLayout
from llmprune.structured.removal import attention_shape, config_widths, config_with_widths

WIDTHS_KEY = "layer_widths"
"""Key of the per-layer widths in ``llmprune.json``."""


def _layout(config) -> UnitLayout | None:
    return LAYOUTS.get(getattr(config, "model_type", None))


def layer_widths(model: nn.Module) -> list[dict[str, int]] | None:
    """Each decoder layer's widths as its modules have them, or None when all match the model's config
    (then ``from_pretrained`` loads the saved model as it is)."""
    layout = _layout(model.config)
    if layout is None:
        return None
    _, layers = decoder_layers(model)
    expected = config_widths(model.config, layout)
    widths = []
    for layer in layers:
        found = {"intermediate": read_weight(layer.get_submodule(layout.mlp_output)).shape[1]}
        if layout.attention is not None:
            head_dim = attention_shape(model.config).head_dim
            q, k = (read_weight(layer.get_submodule(name)) for name in layout.attention[:2])
            found.update(heads=q.shape[0] // head_dim, kv_heads=k.shape[0] // head_dim)
        widths.append(found)
    return None if all(found == expected for found in widths) else widths


def load_with_widths(path: str | Path, widths: list[dict[str, int]], dtype: str, device: str) -> nn.Module:
    """The model saved at ``path`` with decoder layer i built to ``widths[i]``, in eval mode on ``device``."""
    from accelerate import init_empty_weights

    from llmprune.models.loading import resolve_device, resolve_dtype
    from llmprune.models.shards import checkpoint_names, streaming_skeleton, tied_names

    target = resolve_device(device)
    model, shards = streaming_skeleton(path, resolve_dtype(dtype, target))
    layout = _layout(model.config)
    _, layers = decoder_layers(model)
    keys = set(config_widths(model.config, layout)) if layout is not None else set()
    if layout is None or len(widths) != len(layers) or any(set(entry) != keys for entry in widths):
        raise UsageError(
            f"{path}: {WIDTHS_KEY} in llmprune.json does not describe this model ({len(widths)} entries "
            f"of {', '.join(sorted(keys))} expected for {len(layers)} decoder layers of type "
            f"{model.config.model_type!r})"
        )
    with init_empty_weights(include_buffers=False):
        for index, layer in enumerate(layers):
            layers[index] = type(layer)(config_with_widths(model.config, layout, widths[index]), index)
    model.tie_weights()  # an LM head tied to the embeddings shares their (meta) tensor from here on
    names = checkpoint_names(model)
    tied = tied_names(model) - set(shards.weight_map)  # an LM head sharing the embeddings' tensor
    missing = [name for name in names if name not in shards.weight_map and name not in tied]
    unexpected = sorted(set(shards.weight_map) - set(names))
    if missing or unexpected:
        raise UsageError(f"{path}: weights do not match the recorded widths: {(missing or unexpected)[0]}")
    try:
        shards.load_into(model, [n for n in names if n not in tied], target, resolve_dtype(dtype, target))
    except ValueError as exc:  # accelerate refuses a tensor of another shape
        raise UsageError(f"{path}: weights do not match the recorded widths: {exc}") from None
    if tied:
        model.tie_weights()
    return model.to(target).eval()

