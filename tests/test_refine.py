"""Re-solve on a fixed mask and 1-swap mask refinement, checked against first principles: a direct
least-squares solve per row on its support, brute-force search of the best swap, exact per-row and
per-group counts, and errors computed from the calibration inputs themselves."""

from __future__ import annotations

import pytest
import torch

from llmprune.methods import refine
from llmprune.methods.patterns import Pattern, max_per_group
from llmprune.methods.refine import (
    ResolveError,
    layer_error,
    resolve_weights,
    row_errors,
    swap_mask,
)

DEAD = (3, 17, 30)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(out_features: int = 12, in_features: int = 40, tokens: int = 200, seed: int = 0):
    """A weight, correlated calibration inputs X = Z A · s with a few dead features, and H = 2/N XᵀX."""
    g = _gen(seed)
    z = torch.randn(tokens, in_features, generator=g)
    mixing = torch.randn(in_features, in_features, generator=g) * (0.8 / in_features**0.5)
    mixing += torch.eye(in_features)
    x = (z @ mixing) * torch.exp(0.5 * torch.randn(in_features, generator=g))
    x[:, [c for c in DEAD if c < in_features]] = 0.0
    weight = torch.randn(out_features, in_features, generator=g)
    return weight, x, (2.0 / tokens) * (x.t() @ x)


def _random_mask(shape: tuple[int, int], pattern: Pattern, seed: int) -> torch.Tensor:
    """A random mask: a random count per row (unstructured), or M − N random entries per N:M group."""
    rows, cols = shape
    g = _gen(seed)
    ranks = torch.rand(rows, cols, generator=g).argsort(dim=1).argsort(dim=1)
    if pattern.is_nm:
        groups = torch.rand(rows, cols // pattern.m, pattern.m, generator=g).argsort(-1).argsort(-1)
        return (groups < pattern.m - pattern.n).view(rows, cols)
    counts = torch.randint(cols // 4, 3 * cols // 4, (rows, 1), generator=g)
    return ranks < counts


def _wanda_mask(weight: torch.Tensor, x: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    from llmprune.methods.wanda import wanda_mask

    return wanda_mask(weight, (x**2).sum(0), 0.5, pattern)


def _least_squares(weight: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, argmin ‖X_S w'_S − X w‖ over the support S (float64, minimum norm where X_S is singular)."""
    xd, solved = x.double(), torch.zeros_like(weight, dtype=torch.float64)
    for r in range(len(weight)):
        support = (~mask[r]).nonzero().flatten()
        target = (xd @ weight[r].double())[:, None]
        solved[r, support] = torch.linalg.lstsq(xd[:, support], target, driver="gelsd").solution[:, 0]
    return solved


def _exact_errors(dense: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row ‖w X − w' X‖² · 2/N from the inputs themselves, float64 (= (w − w')ᵀ H (w − w'))."""
    return (2.0 / len(x)) * ((dense.double() - pruned.double()) @ x.double().t()).square().sum(dim=1)


def _exactly_zero(weight: torch.Tensor, mask: torch.Tensor) -> bool:
    return bool((weight[mask].view(torch.int32) == 0).all())  # +0.0: all bits clear


PATTERNS = ["unstructured", "2:4", "4:8"]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_resolve_equals_least_squares_on_the_support(pattern):
    dense, x, hessian = _layer()
    mask = _random_mask(dense.shape, Pattern.parse(pattern), seed=1)
    start = dense.masked_fill(mask, 0.0)
    given = (start.clone(), mask.clone(), hessian.clone())
    result = resolve_weights(dense, start, mask, hessian, iterations=300)
    expected = _least_squares(dense, x, mask)
    live = torch.ones(dense.shape[1], dtype=torch.bool)
    live[list(DEAD)] = False
    got, want = result.weight[:, live].double(), expected[:, live]
    assert float((got - want).norm() / want.norm()) < 1e-4
    # The objective: at the optimum to ~1e-4 relative, and below the start in every row.
    after, optimum, before = (_exact_errors(dense, w, x) for w in (result.weight, expected, start))
    assert torch.all(after <= optimum * (1 + 1e-4) + 1e-9)
    assert torch.all(after < before)
    # Nothing outside the support moved; dead inputs (no signal) keep the start's weights.
    assert _exactly_zero(result.weight, mask)
    assert torch.equal(result.weight[:, ~live], start[:, ~live])
    assert all(torch.equal(a, b) for a, b in zip(given, (start, mask, hessian), strict=True))
    assert result.damp == 0.0 and 0 < result.iterations < 300 and result.rows_kept == 0


def test_resolve_is_never_worse_than_its_start_per_row():
    dense, x, hessian = _layer(seed=2)
    mask = _random_mask(dense.shape, Pattern(), seed=3)
    start = dense.masked_fill(mask, 0.0)
    before = row_errors(dense, start, hessian)
    few = resolve_weights(dense, start, mask, hessian, iterations=2)
    assert few.iterations == 2 and torch.all(row_errors(dense, few.weight, hessian) <= before)
    # From the undamped optimum, a damped solve lands above it in (nearly) every row: those rows keep the
    # start, bit for bit.
    optimum = _least_squares(dense, x, mask).float()
    optimum[:, list(DEAD)] = start[:, list(DEAD)]
    damped = resolve_weights(dense, optimum, mask, hessian, iterations=100, damp=0.5)
    assert damped.rows_kept > 0 and damped.damp == 0.5
    assert torch.all(row_errors(dense, damped.weight, hessian) <= row_errors(dense, optimum, hessian))
    kept = (damped.weight == optimum).all(dim=1)
    assert int(kept.sum()) == damped.rows_kept


def test_resolve_with_a_singular_hessian_stays_finite_and_optimal():
    dense, x, hessian = _layer(in_features=40, tokens=24, seed=4)  # rank 24 < 40, and dead inputs
    mask = _random_mask(dense.shape, Pattern(), seed=5)
    start = dense.masked_fill(mask, 0.0)
    result = resolve_weights(dense, start, mask, hessian, iterations=200)
    assert bool(result.weight.isfinite().all()) and _exactly_zero(result.weight, mask)
    after, before = _exact_errors(dense, result.weight, x), _exact_errors(dense, start, x)
    optimum = _exact_errors(dense, _least_squares(dense, x, mask), x)
    assert torch.all(after <= before)
    assert float((after - optimum).sum() / before.sum()) < 1e-3


def test_resolve_raises_damping_when_a_solve_is_not_finite(monkeypatch):
    dense, _, hessian = _layer(seed=6)
    mask = _random_mask(dense.shape, Pattern(), seed=7)
    start = dense.masked_fill(mask, 0.0)
    solve, lams = refine._pcg, []

    def flaky(*args):
        lams.append(args[5])  # λ
        x, steps = solve(*args)
        return (x.fill_(float("nan")) if len(lams) < 3 else x), steps

    monkeypatch.setattr(refine, "_pcg", flaky)
    result = resolve_weights(dense, start, mask, hessian, iterations=50, damp=0.01)
    assert result.damp == pytest.approx(1.0) and len(lams) == 3
    assert bool(result.weight.isfinite().all())
    lams.clear()
    assert resolve_weights(dense, start, mask, hessian, iterations=5).damp == pytest.approx(1e-5)
    monkeypatch.setattr(refine, "_pcg", lambda *a: (a[1].clone().fill_(float("nan")), 0))
    with pytest.raises(ResolveError, match="not finite even with damping"):
        resolve_weights(dense, start, mask, hessian, iterations=5)
    with pytest.raises(ResolveError, match="not finite"):
        resolve_weights(dense, start, mask, hessian.clone().fill_(float("inf")), iterations=5)


def _check_swapped(dense, start, mask, result, hessian, pattern):
    """Counts per row (and per N:M group) as at the start, masked weights +0.0, error never up per row,
    and every kept weight either unchanged or restored to its dense value."""
    assert torch.equal(result.mask.sum(dim=1), mask.sum(dim=1))
    if pattern.is_nm:
        shape = (len(mask), -1, pattern.m)
        assert torch.equal(result.mask.view(shape).sum(-1), mask.view(shape).sum(-1))
        assert max_per_group(result.weight != 0, pattern.m) <= pattern.n
    assert _exactly_zero(result.weight, result.mask)
    assert torch.all(row_errors(dense, result.weight, hessian) <= row_errors(dense, start, hessian))
    restored = mask & ~result.mask
    assert torch.equal(result.weight[restored], dense[restored])
    kept = ~result.mask  # a weight pruned in one round may come back in a later one, at its dense value
    assert bool(((result.weight == start) | (result.weight == dense))[kept].all())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_swaps_improve_a_poor_mask_and_keep_it_valid(pattern):
    pattern = Pattern.parse(pattern)
    dense, _, hessian = _layer(seed=8)
    mask = _random_mask(dense.shape, pattern, seed=9)
    start = dense.masked_fill(mask, 0.0)
    result = swap_mask(dense, start, mask, hessian, pattern, rounds=50)
    assert result.swaps > len(dense)  # a random mask is far from the best: several swaps per row
    _check_swapped(dense, start, mask, result, hessian, pattern)
    assert layer_error(dense, result.weight, hessian) < 0.9 * layer_error(dense, start, hessian)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_one_round_makes_the_best_swap_of_each_row(pattern):
    """Against brute force: every (pruned i, kept j) pair allowed by the pattern, its error recomputed."""
    pattern = Pattern.parse(pattern)
    dense, _, hessian = _layer(out_features=6, in_features=16, seed=10)
    mask = _random_mask(dense.shape, pattern, seed=11)
    start = dense.masked_fill(mask, 0.0)
    result = swap_mask(dense, start, mask, hessian, pattern, rounds=1, candidates=16)
    h = hessian.double()
    for r in range(len(dense)):
        best = float((dense[r] - start[r]).double() @ h @ (dense[r] - start[r]).double())
        for i in mask[r].nonzero().flatten().tolist():
            for j in (~mask[r]).nonzero().flatten().tolist():
                if pattern.is_nm and i // pattern.m != j // pattern.m:
                    continue
                row = start[r].clone()
                row[i], row[j] = dense[r, i], 0.0
                diff = (dense[r] - row).double()
                best = min(best, float(diff @ h @ diff))
        got = (dense[r] - result.weight[r]).double()
        assert float(got @ h @ got) == pytest.approx(best, rel=1e-5)
    assert result.swaps == len(dense) and result.rounds == 1


def test_refitted_swaps_are_never_worse_than_dense_value_swaps():
    pattern = Pattern(2, 4)
    dense, _, hessian = _layer(seed=12)
    mask = _random_mask(dense.shape, pattern, seed=13)
    start = dense.masked_fill(mask, 0.0)
    plain = swap_mask(dense, start, mask, hessian, pattern, rounds=1)
    refit = swap_mask(dense, start, mask, hessian, pattern, rounds=1, refit=True)
    assert torch.equal(refit.mask.sum(1), mask.sum(1)) and _exactly_zero(refit.weight, refit.mask)
    better = row_errors(dense, refit.weight, hessian) <= row_errors(dense, plain.weight, hessian) * (1 + 1e-5)
    assert bool(better.all()) and refit.swaps > 0


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_swaps_between_resolves_beat_resolve_alone_on_a_wanda_start(pattern):
    pattern = Pattern.parse(pattern)
    dense, x, hessian = _layer(seed=14)
    mask = _wanda_mask(dense, x, pattern)
    start = dense.masked_fill(mask, 0.0)
    resolved = resolve_weights(dense, start, mask, hessian, iterations=100).weight
    swapped = swap_mask(dense, resolved, mask, hessian, pattern, rounds=20)
    _check_swapped(dense, resolved, mask, swapped, hessian, pattern)
    again = resolve_weights(dense, swapped.weight, swapped.mask, hessian, iterations=100).weight
    assert swapped.swaps > 0 and _exactly_zero(again, swapped.mask)
    errors = [layer_error(dense, w, hessian) for w in (start, resolved, again)]
    assert errors[0] > errors[1] > errors[2]


def test_layer_error_is_the_relative_output_error():
    dense, x, hessian = _layer(seed=15)
    pruned = dense.masked_fill(_random_mask(dense.shape, Pattern(), seed=16), 0.0)
    direct = float(((dense - pruned) @ x.t()).double().norm() / (dense @ x.t()).double().norm())
    assert layer_error(dense, pruned, hessian) == pytest.approx(direct, rel=1e-5)
    assert layer_error(dense, dense, hessian) == 0.0
    assert layer_error(torch.zeros_like(dense), pruned, hessian) == 0.0  # no signal
    assert layer_error(dense, pruned, torch.zeros_like(hessian)) == 0.0


def test_bad_arguments_are_refused():
    dense, _, hessian = _layer(out_features=4, in_features=10)
    mask = torch.zeros_like(dense, dtype=torch.bool)
    with pytest.raises(ValueError, match="share one"):
        resolve_weights(dense, dense[:, :8], mask, hessian, 5)
    with pytest.raises(ValueError, match="hessian must be"):
        resolve_weights(dense, dense, mask, hessian[:8, :8], 5)
    with pytest.raises(ValueError, match="iterations"):
        resolve_weights(dense, dense, mask, hessian, -1)
    with pytest.raises(ValueError, match="not divisible by M=4"):
        swap_mask(dense, dense, mask, hessian, Pattern(2, 4), 5)
    with pytest.raises(ValueError, match="structured"):
        swap_mask(dense, dense, mask, hessian, Pattern(structured=True), 5)


def test_a_row_whose_swaps_raised_its_error_is_reverted(monkeypatch):
    """With the acceptance threshold pushed above zero, swaps that raise the error are made; the final
    check must put every such row back to its start (mask and weights) and not count its swaps."""
    pattern = Pattern(2, 4)
    dense, x, hessian = _layer(seed=17)
    mask = _wanda_mask(dense, x, pattern)
    start = resolve_weights(dense, dense.masked_fill(mask, 0.0), mask, hessian, iterations=100).weight
    monkeypatch.setattr(refine, "_MIN_GAIN", -0.5)  # accept Δ < 0.5·e_r: also swaps that make it worse
    result = swap_mask(dense, start, mask, hessian, pattern, rounds=3)
    _check_swapped(dense, start, mask, result, hessian, pattern)
    reverted = (result.weight == start).all(dim=1) & (result.mask == mask).all(dim=1)
    assert bool(reverted.any()) and result.swaps <= 3 * int((~reverted).sum())
