"""OWL (arXiv 2310.05175): outlier ratios against a brute-force count on the concatenated Wanda scores, the
dense scoring pass against hooks on the dense model, and the per-layer sparsities' mean, band and order."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_calibration, tiny_model
from llmprune.config import PruneOptions
from llmprune.methods.owl import outlier_ratio, owl_sparsities
from llmprune.models.architecture import read_weight
from llmprune.pipeline.distributed import Communicator
from llmprune.pipeline.owl import outlier_ratios
from llmprune.pipeline.steps import plan_targets
from llmprune.pipeline.walk import calibration_batches


def brute_force_ratio(weights, sq_norms, threshold):
    """The reference's ``check_outlier_mean`` on the concatenated scores, in float64."""
    pairs = zip(weights, sq_norms, strict=True)
    scores = torch.cat([(w.double().abs() * n.double().sqrt()).flatten() for w, n in pairs])
    return (scores > threshold * scores.mean()).sum().item() / scores.numel()


def heavy_tailed(shape, generator):
    return torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator).pow(-0.7)


@pytest.mark.parametrize("threshold", [1.0, 2.0, 5.0])
def test_outlier_ratio_counts_the_concatenated_scores_above_m_times_their_mean(threshold):
    generator = torch.Generator().manual_seed(1)
    shapes = [(24, 16), (8, 16), (16, 40)]  # different shapes: a per-matrix mean would differ
    weights = [heavy_tailed(shape, generator) for shape in shapes]
    weights[1] *= 6  # one matrix far above the others: many of its scores above the shared mean
    sq_norms = [heavy_tailed((shape[1],), generator).square() * 50 for shape in shapes]
    expected = brute_force_ratio(weights, sq_norms, threshold)
    assert 0 < expected < 1
    assert outlier_ratio(weights, sq_norms, threshold) == expected
    # The mean is over all scores together, not per matrix.
    pairs = zip(weights, sq_norms, strict=True)
    per_matrix = sum(brute_force_ratio([w], [n], threshold) * w.numel() for w, n in pairs)
    assert per_matrix / sum(w.numel() for w in weights) != expected
    # Σx² or its mean over tokens: the same ratio.
    assert outlier_ratio(weights, [n / 37 for n in sq_norms], threshold) == expected


def test_outlier_ratio_of_constant_scores_is_zero_and_bad_input_is_refused():
    assert outlier_ratio([torch.ones(4, 4)], [torch.ones(4)], 1.0) == 0.0
    assert outlier_ratio([torch.zeros(4, 4)], [torch.ones(4)], 5.0) == 0.0
    with pytest.raises(ValueError):
        outlier_ratio([torch.ones(4, 4)], [], 5.0)


def reference_sparsities(ratios, mean, spread):
    """OWL's own mapping (prune_wanda_outlier): min-max to [0, 2λ], centred, keep ratio 1 − s + that."""
    r = torch.tensor(ratios, dtype=torch.float64)
    scaled = (r - r.min()) / (r.max() - r.min()) * 2 * spread
    return (1 - (scaled - scaled.mean() + 1 - mean)).tolist()


def test_owl_sparsities_rescale_the_reference_mapping_into_the_band_around_the_mean():
    ratios = [0.010, 0.012, 0.011, 0.030, 0.009, 0.010]  # one layer far from the others
    mean, spread = 0.6, 0.08
    ours = owl_sparsities(ratios, mean, spread)
    reference = reference_sparsities(ratios, mean, spread)
    assert max(abs(s - mean) for s in reference) > spread + 0.03  # the reference leaves the band here
    assert sum(ours) / len(ours) == pytest.approx(mean, abs=1e-12)
    assert max(abs(s - mean) for s in ours) == pytest.approx(spread, abs=1e-12)
    factor = spread / max(abs(s - mean) for s in reference)
    assert ours == pytest.approx([mean + (s - mean) * factor for s in reference], abs=1e-12)
    # Two layers: the reference's own map.
    two = [0.02, 0.05]
    assert owl_sparsities(two, 0.5, 0.1) == pytest.approx(reference_sparsities(two, 0.5, 0.1))


@pytest.mark.parametrize("seed", range(4))
def test_owl_sparsities_have_the_weighted_mean_stay_in_the_band_and_order_inversely(seed):
    generator = torch.Generator().manual_seed(seed)
    ratios = torch.rand(12, generator=generator).pow(3).mul(0.05).tolist()
    sizes = torch.randint(1, 1000, (12,), generator=generator).tolist()
    mean, spread = 0.7, 0.08
    sparsities = owl_sparsities(ratios, mean, spread, sizes)
    weighted = sum(n * s for n, s in zip(sizes, sparsities, strict=True)) / sum(sizes)
    assert weighted == pytest.approx(mean, abs=1e-12)
    assert all(mean - spread - 1e-12 <= s <= mean + spread + 1e-12 for s in sparsities)
    assert max(abs(s - mean) for s in sparsities) == pytest.approx(spread, abs=1e-12)  # the band is used
    for i in range(12):
        for j in range(12):
            if ratios[i] > ratios[j]:
                assert sparsities[i] < sparsities[j]  # more outliers: pruned less
    unweighted = owl_sparsities(ratios, mean, spread)
    assert sum(unweighted) / 12 == pytest.approx(mean, abs=1e-12)
    assert unweighted != pytest.approx(sparsities)  # the sizes matter


def test_owl_sparsities_are_uniform_without_spread_or_differences_and_skip_empty_layers():
    assert owl_sparsities([0.01, 0.02, 0.03], 0.5, 0.0) == [0.5] * 3
    assert owl_sparsities([0.02] * 4, 0.5, 0.1) == [0.5] * 4
    assert owl_sparsities([], 0.5, 0.1) == []
    sparsities = owl_sparsities([0.01, math.nan, 0.03, 0.5], 0.5, 0.1, [10, 0, 10, 0])
    assert sparsities == pytest.approx([0.6, 0.5, 0.4, 0.5])  # NaN or nothing to prune: the mean, ignored
    with pytest.raises(ValueError):
        owl_sparsities([0.01, 0.02], 0.5, -0.1)
    with pytest.raises(ValueError):
        owl_sparsities([0.01, 0.02], 0.5, 0.1, [1])


def dense_sq_norms(model, batches, modules):
    """Σ_t x_t² of each module's input over every batch, from pre-forward hooks on the whole dense model."""
    sums = {name: torch.zeros(module.in_features, dtype=torch.float64) for name, module in modules.items()}

    def hook(name):
        def pre_forward(_module, args):
            sums[name] += args[0].detach().double().reshape(-1, args[0].shape[-1]).square().sum(dim=0)

        return pre_forward

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return sums


@pytest.mark.parametrize("threshold", [2.0, 5.0])
def test_outlier_ratios_of_a_tiny_llama_match_hooks_on_the_dense_model(threshold):
    model = tiny_model("llama")
    batches = calibration_batches(tiny_calibration(), 4)
    plan = [{t.name: t.module for t in targets} for targets in plan_targets(model, PruneOptions())]
    dense = {name: read_weight(module).clone() for layer in plan for name, module in layer.items()}
    ratios = outlier_ratios(model, batches, Communicator(), plan, threshold)
    assert len(ratios) == len(plan) == 3
    assert all(math.isfinite(r) for r in ratios)
    sums = dense_sq_norms(model, batches, {name: m for layer in plan for name, m in layer.items()})
    for ratio, layer in zip(ratios, plan, strict=True):
        count = sum(module.weight.numel() for module in layer.values())
        expected = brute_force_ratio([dense[n] for n in layer], [sums[n] for n in layer], threshold)
        assert abs(ratio - expected) <= 1 / count  # at most one score on the boundary after rounding
    assert all(torch.equal(read_weight(m), dense[n]) for layer in plan for n, m in layer.items())  # dense
    if threshold == 2.0:
        assert all(r > 0 for r in ratios)  # the comparison is not trivially 0 == 0


def test_outlier_ratios_leave_layers_without_targets_nan():
    model = tiny_model("llama")
    batches = calibration_batches(tiny_calibration(4, 16), 4)
    plan = [{t.name: t.module for t in targets} for targets in plan_targets(model, PruneOptions())]
    plan[1] = {}
    ratios = outlier_ratios(model, batches, Communicator(), plan, 2.0)
    assert math.isnan(ratios[1]) and math.isfinite(ratios[0]) and math.isfinite(ratios[2])
    with pytest.raises(ValueError):
        outlier_ratios(model, batches, Communicator(), plan[:2], 2.0)
