"""The pruning methods checked against first principles: definitions of the scores, the N:M constraint,
reconstruction error computed directly, and a naive float64 OBS reference for SparseGPT."""

from __future__ import annotations

import pytest
import torch

from llmprune.methods import METHODS, LayerTask, Pattern, magnitude_mask, wanda_mask
from llmprune.methods.sparsegpt import (
    CholeskyError,
    _cholesky_,
    _invert_lower_,
    factor_hessian,
    inverse_hessian_cholesky,
    sparsegpt_prune_factored,
)
from llmprune.pipeline.statistics import InputStatistics, error_from_terms, error_terms

METHOD_NAMES = ["magnitude", "wanda", "sparsegpt"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """X = (Z (I + A)) · s: mixed (correlated) features whose scales vary over about an order of magnitude."""
    g = _gen(seed)
    z = torch.randn(tokens, features, generator=g)
    mixing = torch.eye(features) + torch.randn(features, features, generator=g) / features**0.5
    scales = torch.exp(torch.randn(features, generator=g))
    return (z @ mixing) * scales


def _layer(out_features: int, in_features: int, tokens: int, seed: int):
    """A weight, its calibration inputs, and both statistics computed here from their definitions."""
    x = _correlated_inputs(tokens, in_features, seed)
    weight = torch.randn(out_features, in_features, generator=_gen(seed + 1000))
    hessian = (2.0 / tokens) * (x.t() @ x)
    sq_norms = (x**2).sum(dim=0)
    return weight, x, {"magnitude": None, "wanda": sq_norms, "sparsegpt": hessian}


def _run(name: str, weight: torch.Tensor, stats: dict, sparsity: float, pattern: str, **options):
    task = LayerTask(sparsity, Pattern.parse(pattern), **options)
    method = METHODS[name]
    return method.prune([weight], method.prepare(stats[name], task), [task])[0]


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    damp: float = 0.01,
):
    """One weight pruned from its Hessian: factored, then SparseGPT's column loop."""
    return sparsegpt_prune_factored(weight, factor_hessian(hessian, damp), sparsity, pattern, blocksize)


def relative_error(dense: torch.Tensor, pruned: torch.Tensor, samples: torch.Tensor) -> float:
    """||W X - W' X||_F / ||W X||_F over sample tokens, as the driver reports it."""
    return error_from_terms(error_terms(dense, pruned, samples))


def test_registry_statistics() -> None:
    assert {name: method.statistic for name, method in METHODS.items()} == {
        "magnitude": "none",
        "wanda": "input_norms",
        "sparsegpt": "hessian",
    }
    assert all(method.name == name for name, method in METHODS.items())


# --- Wanda -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize(("rows", "cols"), [(16, 64), (7, 50), (32, 96)])
def test_wanda_prunes_lowest_scores_of_each_row(sparsity: float, rows: int, cols: int) -> None:
    g = _gen(rows * 1000 + cols)
    weight = torch.randn(rows, cols, generator=g)
    sq_norms = torch.exp(4 * torch.randn(cols, generator=g))  # positive, spread over orders of magnitude
    mask = wanda_mask(weight, sq_norms, sparsity, Pattern())

    assert mask.dtype == torch.bool and mask.shape == weight.shape
    k = round(cols * sparsity)
    assert mask.sum(dim=1).tolist() == [k] * rows

    # S_ij = |W_ij| · ||X_j||_2, computed here in float64.
    scores = weight.double().abs() * sq_norms.double().sqrt()
    for row in range(rows):
        pruned, kept = scores[row][mask[row]], scores[row][~mask[row]]
        assert pruned.max() <= kept.min() * (1 + 1e-6)


def test_wanda_uses_input_norms() -> None:
    # Column 0 has the smallest weights but a huge input norm: Wanda keeps it, magnitude prunes it.
    g = _gen(5)
    weight = torch.randn(4, 8, generator=g).abs() + 1.0
    weight[:, 0] = 0.01
    sq_norms = torch.ones(8)
    sq_norms[0] = 1e8
    wanda = wanda_mask(weight, sq_norms, 0.5, Pattern())
    magnitude = magnitude_mask(weight, 0.5, Pattern(), scope="row")
    assert not wanda[:, 0].any()
    assert magnitude[:, 0].all()


# --- Magnitude -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73])
def test_magnitude_matrix_scope(sparsity: float) -> None:
    g = _gen(11)
    # Rows on different scales so that a per-matrix threshold prunes them unevenly.
    weight = torch.randn(12, 40, generator=g) * torch.logspace(-1, 1, 12).unsqueeze(1)
    outcome = _run("magnitude", weight, {"magnitude": None}, sparsity, "unstructured")
    zeros = outcome.weight == 0
    assert int(zeros.sum()) == round(weight.numel() * sparsity)
    assert torch.equal(zeros, outcome.mask)
    assert weight.abs()[zeros].max() <= weight.abs()[~zeros].min()
    assert len(set(zeros.sum(dim=1).tolist())) > 1  # not per row
    assert torch.equal(outcome.weight[~zeros], weight[~zeros])  # survivors unchanged


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73])
def test_magnitude_row_scope(sparsity: float) -> None:
    g = _gen(12)
    weight = torch.randn(12, 40, generator=g) * torch.logspace(-1, 1, 12).unsqueeze(1)
    outcome = _run("magnitude", weight, {"magnitude": None}, sparsity, "unstructured", magnitude_scope="row")
    zeros = outcome.weight == 0
    assert zeros.sum(dim=1).tolist() == [round(40 * sparsity)] * 12
    assert torch.equal(zeros, outcome.mask)
    for row in range(12):
        assert weight[row].abs()[zeros[row]].max() <= weight[row].abs()[~zeros[row]].min()


# --- N:M for every method --------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
@pytest.mark.parametrize("blocksize", [128, 20])
def test_n_m_constraint(name: str, n: int, m: int, blocksize: int) -> None:
    weight, _x, stats = _layer(24, 64, tokens=256, seed=n * 10 + m)
    outcome = _run(name, weight, stats, 0.5, f"{n}:{m}", blocksize=blocksize)
    assert outcome.weight.shape == weight.shape
    assert torch.isfinite(outcome.weight).all()

    nonzeros = (outcome.weight != 0).reshape(24, 64 // m, m).sum(dim=2)
    assert (nonzeros <= n).all()
    # Exactly M - N removed per group, and the zeros are exactly the mask.
    assert (outcome.mask.reshape(24, 64 // m, m).sum(dim=2) == m - n).all()
    assert torch.equal(outcome.weight == 0, outcome.mask)


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
def test_n_m_prunes_lowest_score_of_each_group(name: str) -> None:
    weight, _x, stats = _layer(10, 32, tokens=128, seed=3)
    outcome = _run(name, weight, stats, 0.5, "2:4")
    scores = weight.double().abs()
    if name == "wanda":
        scores = scores * stats["wanda"].double().sqrt()
    groups, mask = scores.reshape(10, 8, 4), outcome.mask.reshape(10, 8, 4)
    for row in range(10):
        for g in range(8):
            assert groups[row, g][mask[row, g]].max() <= groups[row, g][~mask[row, g]].min() * (1 + 1e-6)


# --- Reconstruction error ordering -----------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reconstruction_error_sparsegpt_wanda_magnitude(pattern: str) -> None:
    weight, x, stats = _layer(64, 128, tokens=2048, seed=0)
    dense_out = weight @ x.t()
    errors = {}
    for name in METHOD_NAMES:
        outcome = _run(name, weight, stats, 0.5, pattern)
        assert abs(float(outcome.mask.float().mean()) - 0.5) < 1e-9
        errors[name] = float(torch.linalg.norm(dense_out - outcome.weight @ x.t()))
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# --- SparseGPT against a naive float64 OBS reference -----------------------------------------------


def _naive_obs(weight: torch.Tensor, hessian: torch.Tensor, damp: float, mask: torch.Tensor, select):
    """Optimal Brain Surgeon column by column with an explicit inverse of the remaining Hessian.

    Removing the masked weights of column i from the remaining columns F = i.. updates the row by
    -w_i · [H_F⁻¹]_{0,:} / [H_F⁻¹]_{00}; the saliency of weight w_c is w_c² / [H_{c..}⁻¹]_{00}.
    ``select(start, saliency)`` is called before each selection window with the saliencies at that point.
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    cols = w.shape[1]
    inverses = [torch.linalg.inv(h[i:, i:]) for i in range(cols)]
    d = torch.tensor([inverses[i][0, 0] for i in range(cols)], dtype=torch.float64)
    for i in range(cols):
        select(i, w**2 / d)
        err = torch.where(mask[:, i], w[:, i], torch.zeros_like(w[:, i])) / d[i]
        w[:, i:] -= torch.outer(err, inverses[i][0])
    w[mask] = 0.0
    return w


@pytest.mark.parametrize(
    ("pattern", "blocksize"),
    [
        ("unstructured", 16),
        ("unstructured", 20),
        ("unstructured", 128),
        ("2:4", 16),
        ("2:4", 128),
        ("4:8", 24),
    ],
)
def test_sparsegpt_matches_naive_obs(pattern: str, blocksize: int) -> None:
    weight, _x, stats = _layer(16, 48, tokens=512, seed=7)
    parsed = Pattern.parse(pattern)
    result = sparsegpt_prune(weight, stats["sparsegpt"], 0.5, parsed, blocksize=blocksize, damp=0.01)
    assert result.damp == 0.01
    mask = result.mask

    def check_selection(start: int, saliency: torch.Tensor) -> None:
        # The mask of each window holds the lowest OBS saliencies as they stand when the window starts.
        window = parsed.m if parsed.is_nm else blocksize
        if start % window:
            return
        sal, sel = saliency[:, start : start + window], mask[:, start : start + window]
        if parsed.is_nm:
            sal, sel = sal.reshape(-1, parsed.m), sel.reshape(-1, parsed.m)
            assert (sel.sum(dim=1) == parsed.m - parsed.n).all()
            for row in range(sal.shape[0]):
                assert sal[row][sel[row]].max() <= sal[row][~sel[row]].min() * (1 + 1e-4)
        else:
            assert int(sel.sum()) == round(sel.numel() * 0.5)
            assert sal[sel].max() <= sal[~sel].min() * (1 + 1e-4)

    reference = _naive_obs(weight, stats["sparsegpt"], 0.01, mask, check_selection)
    torch.testing.assert_close(result.weight.double(), reference, rtol=1e-3, atol=1e-3)
    # OBS reconstruction must beat plain masking of the same weights on the calibration objective.
    h = stats["sparsegpt"].double()
    delta_obs = weight.double() - result.weight.double()
    delta_mask = weight.double() * mask
    assert torch.trace(delta_obs @ h @ delta_obs.t()) < torch.trace(delta_mask @ h @ delta_mask.t())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_joint_solve_equals_separate_solves(pattern: str) -> None:
    # q/k/v-like: three weights of one input, solved in one column loop with one sparsity each.
    _w, _x, stats = _layer(8, 64, tokens=512, seed=61)
    rows = [24, 8, 8]
    weights = [torch.randn(r, 64, generator=_gen(62 + i)) for i, r in enumerate(rows)]
    sparsities = [0.5, 0.3, 0.7] if pattern == "unstructured" else [0.5] * 3
    factor = factor_hessian(stats["sparsegpt"])
    parsed = Pattern.parse(pattern)
    joint = sparsegpt_prune_factored(torch.cat(weights), factor, sparsities, parsed, 16, rows)
    parts = zip(weights, sparsities, joint.weight.split(rows), joint.mask.split(rows), strict=True)
    for w, s, joint_weight, joint_mask in parts:
        alone = sparsegpt_prune_factored(w, factor, s, parsed, 16)
        assert torch.equal(joint_mask, alone.mask)
        torch.testing.assert_close(joint_weight, alone.weight, rtol=1e-5, atol=1e-5)
        if pattern == "unstructured":  # the adaptive mask removes its share of every block of each matrix
            assert joint_mask.view(len(w), 4, 16).sum(dim=(0, 2)).tolist() == [round(len(w) * 16 * s)] * 4


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_removed_weights_are_positive_zeros(pattern: str) -> None:
    weight, _x, stats = _layer(16, 48, tokens=256, seed=64)
    result = sparsegpt_prune(-weight.abs(), stats["sparsegpt"], 0.5, Pattern.parse(pattern), blocksize=16)
    assert result.mask.any()
    assert (result.weight[result.mask] == 0).all()
    assert not torch.signbit(result.weight[result.mask]).any()


def test_sparsegpt_row_splits_must_cover_the_rows() -> None:
    weight, _x, stats = _layer(16, 32, tokens=256, seed=65)
    factor = factor_hessian(stats["sparsegpt"])
    with pytest.raises(ValueError, match="row_splits"):
        sparsegpt_prune_factored(weight, factor, [0.5, 0.5], Pattern(), 16, [8, 4])


@pytest.mark.parametrize(("n", "leaf"), [(1, 1), (7, 2), (37, 4), (64, 16), (600, 256)])
def test_cholesky_and_triangular_inverse_by_halves(n: int, leaf: int) -> None:
    a = torch.randn(n, n, generator=_gen(63)) / n**0.5
    matrix = a @ a.t() + torch.eye(n)
    lower = matrix.clone()
    assert _cholesky_(lower, leaf)
    assert torch.equal(lower, lower.tril())
    expected = torch.linalg.cholesky(matrix.double())
    torch.testing.assert_close(lower.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    inverse = _invert_lower_(lower.clone(), leaf)
    assert torch.equal(inverse, inverse.tril())
    expected = torch.linalg.inv(lower.double())
    torch.testing.assert_close(inverse.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(("n", "leaf", "bad"), [(8, 8, 5), (37, 4, 2), (37, 4, 30)])
def test_cholesky_by_halves_detects_indefinite(n: int, leaf: int, bad: int) -> None:
    matrix = torch.eye(n)
    matrix[bad, bad] = -1.0
    assert not _cholesky_(matrix, leaf)


# --- Sparsity 0, dead inputs, Cholesky retry, determinism ------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_zero_sparsity_is_identity(name: str) -> None:
    weight, _x, stats = _layer(16, 32, tokens=64, seed=21)
    outcome = _run(name, weight, stats, 0.0, "unstructured")
    assert outcome.weight.dtype == torch.float32
    assert torch.equal(outcome.weight, weight)
    assert not outcome.mask.any()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_dead_inputs(pattern: str) -> None:
    x = _correlated_inputs(256, 32, seed=31)
    dead = [3, 17]
    x[:, dead] = 0.0
    hessian = (2.0 / 256) * (x.t() @ x)
    assert (hessian.diagonal()[dead] == 0).all()
    weight = torch.randn(8, 32, generator=_gen(32))
    outcome = _run("sparsegpt", weight, {"sparsegpt": hessian}, 0.5, pattern)
    assert torch.isfinite(outcome.weight).all()
    assert (outcome.weight[:, dead] == 0).all()
    assert outcome.mask[:, dead].all()
    alive = [c for c in range(32) if c not in dead]
    assert (outcome.weight[:, alive] != 0).any()


def test_sparsegpt_dead_inputs_need_no_damping() -> None:
    # With damp = 0 a dead input would make H singular; setting H_ii = 1 for it keeps H factorisable.
    x = torch.randn(512, 16, generator=_gen(33))
    x[:, 5] = 0.0
    hessian = (2.0 / 512) * (x.t() @ x)
    result = sparsegpt_prune(torch.randn(4, 16, generator=_gen(34)), hessian, 0.5, Pattern(), damp=0.0)
    assert result.damp == 0.0
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, 5] == 0).all()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_n_m_rejects_indivisible_width(name: str) -> None:
    weight, _x, stats = _layer(4, 10, tokens=64, seed=35)
    with pytest.raises(ValueError):
        _run(name, weight, stats, 0.5, "2:4")


def test_cholesky_retry_raises_damping() -> None:
    x = torch.randn(16, 128, generator=_gen(41))  # 16 tokens, 128 features: rank 16
    hessian = x.t() @ x
    assert (hessian.diagonal() > 0).all()
    requested = 1e-9
    damped = hessian.clone()
    damped.diagonal().add_(requested * hessian.diagonal().mean())
    assert torch.linalg.cholesky_ex(damped).info.item() != 0  # the retry really is needed

    upper, used = inverse_hessian_cholesky(hessian, requested, max_retries=4)
    assert used > requested
    steps = [requested * 10**k for k in range(1, 5)]
    assert any(used == pytest.approx(step, rel=1e-9) for step in steps)
    assert torch.isfinite(upper).all()
    assert torch.equal(upper, upper.triu())
    assert (upper.diagonal() > 0).all()

    weight = torch.randn(8, 128, generator=_gen(42))
    result = sparsegpt_prune(weight, hessian, 0.5, Pattern(), damp=requested)
    assert result.damp == used
    assert torch.isfinite(result.weight).all()
    outcome = _run("sparsegpt", weight, {"sparsegpt": hessian}, 0.5, "unstructured", damp=requested)
    assert outcome.damp == used


def test_cholesky_succeeds_without_retry_when_well_conditioned() -> None:
    x = torch.randn(512, 32, generator=_gen(43))
    hessian = (2.0 / 512) * x.t() @ x
    upper, used = inverse_hessian_cholesky(hessian, 0.01)
    assert used == 0.01
    # Uᵀ U = (H + λ I)⁻¹ with λ = 0.01 · mean(diag H).
    damped = hessian.double() + 0.01 * hessian.diagonal().double().mean() * torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(
        upper.double().t() @ upper.double() @ damped, torch.eye(32).double(), atol=1e-4, rtol=0
    )


def test_cholesky_factor_of_a_large_hessian() -> None:
    # 600 features: the Cholesky factorisation and the triangular inverse go by halves.
    x = _correlated_inputs(2400, 600, seed=45)
    hessian = (2.0 / 2400) * x.t() @ x
    upper, used = inverse_hessian_cholesky(hessian, 0.01)
    assert used == 0.01
    assert torch.equal(upper, upper.triu())
    eye = torch.eye(600, dtype=torch.float64)
    damped = hessian.double() + 0.01 * hessian.diagonal().double().mean() * eye
    torch.testing.assert_close(upper.double().t() @ upper.double() @ damped, eye, atol=1e-3, rtol=0)


def test_cholesky_error_when_never_positive_definite() -> None:
    with pytest.raises(CholeskyError):
        inverse_hessian_cholesky(-torch.eye(16), 0.01)
    with pytest.raises(CholeskyError):
        sparsegpt_prune(torch.randn(4, 16, generator=_gen(44)), -torch.eye(16), 0.5, Pattern())


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_determinism(name: str, pattern: str) -> None:
    weight, _x, stats = _layer(32, 64, tokens=256, seed=51)
    first = _run(name, weight, stats, 0.5, pattern, blocksize=32)
    second = _run(
        name,
        weight.clone(),
        {k: (v.clone() if v is not None else None) for k, v in stats.items()},
        0.5,
        pattern,
        blocksize=32,
    )
    assert torch.equal(first.mask, second.mask)
    assert torch.equal(first.weight, second.weight)
    assert first.damp == second.damp


# --- Input statistics ------------------------------------------------------------------------------


CHUNKS = [7, 1, 13, 5, 20, 2]  # token counts that cross stride boundaries at every offset


def _feed(statistic: str, stride: int, seed: int = 61):
    g = _gen(seed)
    chunks = [torch.randn(1, n, 12, generator=g) * 3 for n in CHUNKS]
    stats = InputStatistics(12, statistic, stride, torch.device("cpu"))
    for chunk in chunks:
        stats.update(chunk)
    x = torch.cat([c.reshape(-1, 12) for c in chunks])
    return stats, x


def test_statistics_hessian_over_chunks() -> None:
    stats, x = _feed("hessian", stride=1)
    assert stats.tokens == sum(CHUNKS)
    assert stats.sq_norms is None
    expected = (2.0 / x.shape[0]) * (x.double().t() @ x.double())
    torch.testing.assert_close(stats.statistic().double(), expected, rtol=1e-5, atol=1e-4)


def test_statistics_hessian_accepts_batched_3d_inputs() -> None:
    x = torch.randn(3, 5, 8, generator=_gen(62))
    stats = InputStatistics(8, "hessian", 1, torch.device("cpu"))
    stats.update(x)
    flat = x.reshape(15, 8).double()
    torch.testing.assert_close(stats.statistic().double(), (2.0 / 15) * flat.t() @ flat, rtol=1e-5, atol=1e-5)


def test_statistics_squared_norms_over_chunks() -> None:
    stats, x = _feed("input_norms", stride=1)
    assert stats.gram is None
    torch.testing.assert_close(stats.statistic().double(), (x.double() ** 2).sum(dim=0), rtol=1e-5, atol=1e-4)


def test_statistics_none() -> None:
    stats, _x = _feed("none", stride=2)
    assert stats.statistic() is None


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 7, 100])
def test_statistics_samples_keep_every_stride_th_token(stride: int) -> None:
    stats, x = _feed("none", stride=stride)
    expected_rows = list(range(0, x.shape[0], stride))
    samples = stats.samples()
    assert samples.shape == (len(expected_rows), 12)
    assert torch.equal(samples, x[expected_rows])


def test_relative_error() -> None:
    g = _gen(71)
    dense = torch.randn(6, 10, generator=g)
    pruned = dense * (torch.rand(6, 10, generator=g) > 0.5)
    samples = torch.randn(40, 10, generator=g)
    expected = torch.linalg.norm(dense @ samples.t() - pruned @ samples.t()) / torch.linalg.norm(
        dense @ samples.t()
    )
    assert relative_error(dense, pruned, samples) == pytest.approx(float(expected), rel=1e-5)
    assert relative_error(dense, dense, samples) == 0.0
    assert relative_error(dense, torch.zeros_like(dense), samples) == pytest.approx(1.0, rel=1e-6)
    assert relative_error(dense, 0.25 * dense, samples) == pytest.approx(0.75, rel=1e-5)
    assert relative_error(dense, pruned, torch.zeros(5, 10)) == 0.0
