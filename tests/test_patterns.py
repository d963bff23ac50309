"""Sparsity patterns and the shared mask selections, checked against their definitions."""

from __future__ import annotations

import pytest
import torch

from llmprune.methods.patterns import (
    Pattern,
    lowest_in_matrix,
    lowest_per_row,
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
