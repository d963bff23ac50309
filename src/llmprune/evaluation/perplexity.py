"""Perplexity: exp of the mean next-token negative log-likelihood over non-overlapping windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.data.text import evaluation_windows


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int = 512, batch_size: int = 2) -> float:
    """Perplexity on ``token_ids``: ``[k, seqlen]`` windows, or a 1-D stream cut into ``seqlen`` windows."""
    windows = token_ids if token_ids.dim() == 2 else evaluation_windows(token_ids, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    model.train(was_training)
    return math.exp(nll / count)
