"""Perplexity: exp of the mean next-token negative log-likelihood over non-overlapping windows."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.data.text import evaluation_windows
from llmprune.models.architecture import decoder_layers
from llmprune.pipeline.capture import model_device, replaying
from llmprune.pipeline.offload import LayerSource
from llmprune.pipeline.walk import walk_layers


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 512,
    batch_size: int = 2,
    layers_from: LayerSource | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Perplexity on ``token_ids``: ``[k, seqlen]`` windows, or a 1-D stream cut into ``seqlen`` windows.

    With ``layers_from`` (a model whose decoder layers are streamed from disk) the windows go through the
    decoder layers one layer at a time, each layer loaded once, before the model's own head scores them.
    ``progress(done, total)`` is called after each scored batch of windows.
    """
    windows = token_ids if token_ids.dim() == 2 else evaluation_windows(token_ids, seqlen)
    batches = [windows[start : start + batch_size] for start in range(0, len(windows), batch_size)]
    was_training = model.training
    model.eval()
    if layers_from is None:
        device = next(model.parameters()).device
        logits = (model(input_ids=batch.to(device), use_cache=False).logits for batch in batches)
        nll, count = _negative_log_likelihood(logits, batches, progress)
    else:
        _, layers = decoder_layers(model)
        hidden = walk_layers(model, batches, layers_from=layers_from).hidden
        layers_from.load_outside(head=True)
        device = model_device(model)
        with replaying(layers, hidden):
            logits = (model(input_ids=batch.to(device), use_cache=False).logits for batch in batches)
            nll, count = _negative_log_likelihood(logits, batches, progress)
        layers_from.release_outside()
    model.train(was_training)
    return math.exp(nll / count)


def _negative_log_likelihood(
    logits, batches: list[torch.Tensor], progress: Callable[[int, int], None] | None = None
) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens."""
    nll, count = 0.0, 0
    for done, (batch_logits, batch) in enumerate(zip(logits, batches, strict=True), start=1):
        shifted = batch_logits[:, :-1].float()
        targets = batch[:, 1:].to(shifted.device)
        loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")
        nll += loss.item()
        count += targets.numel()
        if progress is not None:
            progress(done, len(batches))
    return nll, count
