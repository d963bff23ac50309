"""Structured pruning: whole attention heads, MLP channels and decoder layers, for a model that is actually
smaller. ``step.StructuredStep`` is the per-layer step the walk runs (``pipeline/walk.py``); before the walk
it splits the parameter budget, removes whole layers by block influence (ShortGPT, arXiv 2403.03853) and
plans each layer's removal.

Budget: ``sparsity`` is the fraction of the decoder layers' parameters removed. With layers and widths
both requested, each kind of unit takes an equal share. With uniform widths (the default), every layer
loses the same units, heads and channels removing the same fraction of the attention's and of the MLP's
parameters; with ``widths="adaptive"`` one dense scoring pass measures every layer's units and a global
ranking (FLAP's, ``allocate.py``) decides how many each layer loses before the pruning walk.
"""

from llmprune.structured.step import StructuredStep, decoder_parameters

__all__ = ["StructuredStep", "decoder_parameters"]
