"""Sparsity patterns and the shared mask selections, checked against their definitions."""

from __future__ import annotations

import pytest
import torch

from llmprune.methods.patterns import (
    _HISTOGRAM_MIN,
    Pattern,
    _kth_key,
    _order_keys,
    lowest_in_matrix,
    lowest_per_row,
    mark_lowest,
    mark_lowest_per_column,
    n_m_mask,
    prune_count,
    select_mask,
)


@pytest.mark.parametrize(
    ("text", "n", "m"),
    [
        ("unstructured", None, None),
        (" Unstructured ", None, None),
        ("2:4", 2, 4),
        ("4:8", 4, 8),
        ("1:4", 1, 4),
        ("3:8", 3, 8),
        (" 2 : 4 ", 2, 4),
    ],
)
def test_parse_accepts(text: str, n: int | None, m: int | None) -> None:
    pattern = Pattern.parse(text)
    assert (pattern.n, pattern.m) == (n, m)
    assert pattern.is_nm == (m is not None)
    # str() gives back a canonical spelling that parses to the same pattern.
    assert Pattern.parse(str(pattern)) == pattern


def test_parse_passes_a_pattern_through() -> None:
    pattern = Pattern(2, 4)
    assert Pattern.parse(pattern) is pattern


@pytest.mark.parametrize(
    "text", ["4:4", "5:4", "8:4", "0:4", "0:0", "2-4", "2/4", "abc", "", ":4", "2:", "-1:4", "2:4:8", "2.0:4"]
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Pattern.parse(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75), ("3:8", 0.625), ("1:2", 0.5), ("7:8", 0.125)],
)
def test_implied_sparsity(text: str, expected: float) -> None:
    assert Pattern.parse(text).implied_sparsity == pytest.approx(expected)


def test_unstructured_has_no_implied_sparsity() -> None:
    assert Pattern.parse("unstructured").implied_sparsity is None
    assert not Pattern.parse("unstructured").is_nm


@pytest.mark.parametrize(
    ("total", "sparsity", "expected"),
    [(100, 0.5, 50), (100, 0.3, 30), (100, 0.7, 70), (10, 0.26, 3), (10, 0.24, 2), (7, 0.0, 0), (7, 1.0, 7)],
)
def test_prune_count(total: int, sparsity: float, expected: int) -> None:
    assert prune_count(total, sparsity) == expected


def _random_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_lowest_per_row(sparsity: float) -> None:
    scores = _random_scores(9, 40, seed=1)
    mask = lowest_per_row(scores, sparsity)
    k = round(40 * sparsity)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert mask.sum(dim=1).tolist() == [k] * 9
    for row in range(9):
        pruned, kept = scores[row][mask[row]], scores[row][~mask[row]]
        if 0 < k < 40:
            assert pruned.max() < kept.min()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 1.0])
def test_lowest_in_matrix(sparsity: float) -> None:
    # Rows on very different scales: one matrix-wide threshold prunes them unevenly.
    scores = _random_scores(8, 30, seed=2) * torch.logspace(-2, 2, 8).unsqueeze(1)
    mask = lowest_in_matrix(scores, sparsity)
    k = round(scores.numel() * sparsity)
    assert int(mask.sum()) == k
    if 0 < k < scores.numel():
        assert scores[mask].max() < scores[~mask].min()
        assert len(set(mask.sum(dim=1).tolist())) > 1


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_n_m_mask_prunes_lowest_of_every_group(n: int, m: int) -> None:
    scores = _random_scores(6, 8 * m, seed=3)
    mask = n_m_mask(scores, n, m)
    groups, group_mask = scores.reshape(6, 8, m), mask.reshape(6, 8, m)
    assert (group_mask.sum(dim=2) == m - n).all()
    for row in range(6):
        for g in range(8):
            pruned, kept = groups[row, g][group_mask[row, g]], groups[row, g][~group_mask[row, g]]
            assert pruned.max() < kept.min()


def test_n_m_mask_rejects_indivisible_width() -> None:
    with pytest.raises(ValueError, match="divisible"):
        n_m_mask(_random_scores(2, 10, seed=0), 2, 4)


def test_select_mask_dispatch() -> None:
    scores = _random_scores(5, 16, seed=4) * torch.logspace(-1, 1, 5).unsqueeze(1)
    assert torch.equal(select_mask(scores, 0.5, Pattern(), per_row=True), lowest_per_row(scores, 0.5))
    assert torch.equal(select_mask(scores, 0.5, Pattern(), per_row=False), lowest_in_matrix(scores, 0.5))
    # N:M ignores the sparsity argument and the comparison group.
    for per_row in (True, False):
        assert torch.equal(select_mask(scores, 0.1, Pattern(1, 4), per_row=per_row), n_m_mask(scores, 1, 4))


# --- Fast selections: the same choice as a stable sort ----------------------------------------------


def _stable_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the first ``k`` of a stable sort of the flattened scores."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.sort(scores.reshape(-1).double(), stable=True).indices[:k]] = True
    return mask.view(scores.shape)


def _scores(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(shape, generator=g)
    if kind == "ties":  # a handful of distinct values: the k-th is tied with thousands of others
        return torch.randint(0, 5, shape, generator=g).float()
    if kind == "equal":
        return torch.full(shape, 0.25)
    if kind == "signed":  # negatives, both zeros, infinities, subnormals, huge and tiny magnitudes
        values = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 20)
        flat = values.view(-1)
        flat[::7] = 0.0
        flat[3::7] = -0.0
        flat[5::101] = float("inf")
        flat[6::103] = -float("inf")
        flat[1::11] = 1e-40
        return values
    raise ValueError(kind)


LARGE = (2 * _HISTOGRAM_MIN // 256 + 1, 256)  # above the size where the histograms take over


@pytest.mark.parametrize("kind", ["uniform", "ties", "equal", "signed"])
@pytest.mark.parametrize("shape", [LARGE, (9, 13)])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("out_dtype", [torch.bool, torch.float32])
def test_mark_lowest_is_a_stable_selection(
    kind: str, shape: tuple[int, int], fraction: float, out_dtype: torch.dtype
) -> None:
    scores = _scores(kind, shape, seed=5)
    k = round(scores.numel() * fraction)
    out = mark_lowest(scores, k, torch.empty(shape, dtype=out_dtype))
    assert out.dtype == out_dtype
    assert torch.equal(out.bool(), _stable_lowest(scores, k))


def _marked(scores: torch.Tensor, k: int) -> torch.Tensor:
    return mark_lowest(scores, k, torch.empty(scores.shape, dtype=torch.bool))


@pytest.mark.parametrize("k", [1, 2, 1000, LARGE[0] * LARGE[1] // 2 + 1, LARGE[0] * LARGE[1] - 1])
@pytest.mark.parametrize("kind", ["uniform", "ties", "signed"])
def test_mark_lowest_edge_counts(k: int, kind: str) -> None:
    scores = _scores(kind, LARGE, seed=6)
    assert torch.equal(_marked(scores, k), _stable_lowest(scores, k))


@pytest.mark.parametrize("kind", ["uniform", "ties", "signed"])
def test_mark_lowest_strided_scores_and_out(kind: str) -> None:
    # As SparseGPT uses it: a column slice of the scores into a column slice of a float mask.
    scores = _scores(kind, (LARGE[0], 2 * LARGE[1]), seed=7)[:, 100 : 100 + LARGE[1]]
    out = torch.full((LARGE[0], 3 * LARGE[1]), 7.0)
    k = scores.numel() // 3
    mark_lowest(scores, k, out[:, 50 : 50 + LARGE[1]])
    assert torch.equal(out[:, 50 : 50 + LARGE[1]].bool(), _stable_lowest(scores, k))
    assert (out[:, :50] == 7).all() and (out[:, 50 + LARGE[1] :] == 7).all()


@pytest.mark.parametrize("kind", ["uniform", "ties", "signed"])
def test_mark_lowest_transposed_scores(kind: str) -> None:
    scores = _scores(kind, LARGE[::-1], seed=11).t()  # dense, but not in row-major order
    k = scores.numel() // 2
    assert torch.equal(_marked(scores, k), _stable_lowest(scores, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_mark_lowest_other_dtypes(dtype: torch.dtype) -> None:
    scores = _scores("uniform", LARGE, seed=8).to(dtype)  # 16-bit floats: many exact ties
    k = scores.numel() // 2
    assert torch.equal(_marked(scores, k), _stable_lowest(scores, k))


@pytest.mark.parametrize("kind", ["uniform", "ties"])
def test_lowest_in_matrix_matches_stable_sort_when_large(kind: str) -> None:
    scores = _scores(kind, LARGE, seed=9)
    mask = lowest_in_matrix(scores, 0.5)
    assert torch.equal(mask, _stable_lowest(scores, round(scores.numel() * 0.5)))


@pytest.mark.parametrize("m", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("kind", ["uniform", "ties", "equal"])
@pytest.mark.parametrize("out_dtype", [torch.bool, torch.float32])
def test_mark_lowest_per_column_is_a_stable_selection(m: int, kind: str, out_dtype: torch.dtype) -> None:
    scores = _scores(kind, (m, 300), seed=m)
    for k in sorted({0, 1, m // 2, m - 1, m}):
        out = mark_lowest_per_column(scores, k, torch.empty(m, 300, dtype=out_dtype))
        expected = torch.stack([_stable_lowest(column, k) for column in scores.t()], dim=1)
        assert torch.equal(out.bool(), expected), k


@pytest.mark.parametrize("kind", ["uniform", "ties", "signed"])
def test_order_keys_and_kth_key(kind: str) -> None:
    scores = _scores(kind, LARGE, seed=10)
    keys = _order_keys(scores).view(-1)
    flat = scores.view(-1)
    # Keys compare as the scores do (-0.0 == +0.0 included).
    order = torch.sort(flat, stable=True).indices
    assert torch.equal(torch.sort(keys, stable=True).indices, order)
    assert torch.equal(keys[order][1:] == keys[order][:-1], flat[order][1:] == flat[order][:-1])
    for k in [1, 2, keys.numel() // 3, keys.numel() - 1, keys.numel()]:
        key, below, up_to = _kth_key(keys, k)
        assert key == int(keys[order[k - 1]])
        assert (below, up_to) == (int((keys < key).sum()), int((keys <= key).sum()))


@pytest.mark.parametrize("m", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("kind", ["uniform", "ties", "equal", "signed"])
def test_n_m_mask_selects_the_lowest_of_every_group_ties_included(m: int, kind: str) -> None:
    # Ties may fall either way (topk's order), but never above a kept score, and never more or fewer
    # than m - n per group; -0.0 and +0.0 are equal.
    scores = _scores(kind, (5, 6 * m), seed=m + 1)
    for n in sorted({1, m // 2, m - 1}):
        mask = n_m_mask(scores, n, m).reshape(-1, m)
        assert (mask.sum(dim=1) == m - n).all(), n
        groups = scores.reshape(-1, m)
        pruned_max = groups.masked_fill(~mask, -float("inf")).amax(dim=1)
        kept_min = groups.masked_fill(mask, float("inf")).amin(dim=1)
        assert (pruned_max <= kept_min).all(), n
        assert torch.equal(mask, n_m_mask(scores, n, m).reshape(-1, m)), "not deterministic"


def test_n_m_mask_breaks_ties_as_the_reference_repos_do() -> None:
    # Both reference implementations select N:M groups with torch.topk(largest=False) and scatter.
    scores = _scores("ties", (64, 64), seed=3)
    reference = torch.zeros(64, 64, dtype=torch.bool)
    for start in range(0, 64, 4):
        lowest = torch.topk(scores[:, start : start + 4], 2, dim=1, largest=False)[1]
        reference.scatter_(1, start + lowest, True)
    assert torch.equal(n_m_mask(scores, 2, 4), reference)


@pytest.mark.parametrize("kind", ["uniform", "ties", "equal", "signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lowest_per_row_is_a_stable_selection(kind: str, dtype: torch.dtype) -> None:
    scores = _scores(kind, (7, 50), seed=12).to(dtype)
    for sparsity in (0.1, 0.5, 0.9):
        k = round(50 * sparsity)
        expected = torch.stack([_stable_lowest(row, k) for row in scores])
        assert torch.equal(lowest_per_row(scores, sparsity), expected), sparsity
