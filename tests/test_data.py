"""Calibration and evaluation windows (llmprune.data.text) with the embedded model's real tokenizer."""

from __future__ import annotations

import pytest
import torch

from llmprune.data import text
from llmprune.data.text import (
    CALIBRATION_FRACTION,
    EVALUATION_FRACTION,
    calibration_data,
    calibration_windows,
    check_source,
    embedded_text,
    evaluation_data,
    evaluation_windows,
    tokens_for,
)
from llmprune.errors import DataUnavailableError, UsageError


@pytest.fixture(scope="module")
def embedded_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer(embedded_text())["input_ids"], dtype=torch.long)


def find(haystack: torch.Tensor, needle: torch.Tensor) -> list[int]:
    """Start positions of ``needle`` in the 1-D ``haystack``."""
    if len(needle) > len(haystack):
        return []
    windows = haystack.unfold(0, len(needle), 1)
    return torch.nonzero((windows == needle).all(dim=1)).flatten().tolist()


def test_embedded_text_is_long_and_stable():
    first = embedded_text()
    assert len(first) > 400_000
    assert first == embedded_text()  # fixed (sorted) order, so windows are reproducible


def test_embedded_calibration_and_evaluation_ranges_are_disjoint(tokenizer, embedded_ids):
    total = len(embedded_ids)
    calibration = tokens_for(tokenizer, "embedded", "calibration")
    evaluation = tokens_for(tokenizer, "embedded", "evaluation")
    assert len(calibration) == int(total * CALIBRATION_FRACTION)
    # The public protocol's cut: tokens from int(0.8 * total) on (its dense perplexity, 12.13, needs it).
    assert torch.equal(evaluation, embedded_ids[int(total * (1 - EVALUATION_FRACTION)) :])
    assert torch.equal(calibration, embedded_ids[: len(calibration)])
    assert len(calibration) + len(evaluation) < total  # a gap of ~10 % between the two


def test_calibration_windows_come_from_the_first_70_percent(tokenizer, embedded_ids):
    windows = calibration_data(tokenizer, "embedded", nsamples=8, seqlen=64, seed=3)
    assert windows.shape == (8, 64)
    assert windows.dtype == torch.long
    limit = int(len(embedded_ids) * CALIBRATION_FRACTION)
    for window in windows:
        starts = find(embedded_ids, window)
        assert starts, "every window is a contiguous slice of the tokenized text"
        assert any(start + 64 <= limit for start in starts)


def test_evaluation_windows_come_from_the_last_20_percent_in_order(tokenizer, embedded_ids):
    windows = evaluation_data(tokenizer, "embedded", seqlen=128, nsamples=5)
    assert windows.shape == (5, 128)
    begin = int(len(embedded_ids) * (1 - EVALUATION_FRACTION))
    # consecutive, non-overlapping windows from the start of the evaluation range
    assert torch.equal(windows.flatten(), embedded_ids[begin : begin + 5 * 128])
    assert begin >= int(len(embedded_ids) * CALIBRATION_FRACTION)


def test_calibration_windows_are_deterministic_per_seed():
    tokens = torch.arange(10_000)
    first = calibration_windows(tokens, 16, 32, seed=0)
    assert torch.equal(first, calibration_windows(tokens, 16, 32, seed=0))
    assert not torch.equal(first, calibration_windows(tokens, 16, 32, seed=1))
    for window in first:  # contiguous slices of the stream
        assert torch.equal(window, torch.arange(int(window[0]), int(window[0]) + 32))


def test_calibration_windows_may_span_the_whole_stream():
    tokens = torch.arange(40)
    windows = calibration_windows(tokens, 200, 40)
    assert torch.equal(windows, tokens.expand(200, 40))
    starts = calibration_windows(torch.arange(50), 500, 10, seed=5)[:, 0]
    # Starts cover [0, len - seqlen): as the Wanda/SparseGPT repos' randint(0, len - seqlen - 1).
    assert int(starts.min()) == 0 and int(starts.max()) == 39


def test_calibration_shorter_than_a_window_is_a_usage_error():
    with pytest.raises(UsageError, match="shorter than one window of 64"):
        calibration_windows(torch.arange(63), 4, 64)


def test_evaluation_windows_are_non_overlapping_and_in_order():
    tokens = torch.arange(1000)
    windows = evaluation_windows(tokens, 64)
    assert windows.shape == (1000 // 64, 64)
    assert torch.equal(windows.flatten(), tokens[: windows.numel()])
    assert evaluation_windows(tokens, 64, nsamples=3).shape == (3, 64)
    assert evaluation_windows(tokens, 64, nsamples=100).shape == (15, 64)  # no more than there are
    with pytest.raises(UsageError, match="shorter than one window of 2000"):
        evaluation_windows(tokens, 2000)


def test_text_file_source(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(embedded_text()[:5000], encoding="utf-8")
    ids = tokens_for(tokenizer, str(path), "calibration")
    assert torch.equal(ids, tokens_for(tokenizer, str(path), "evaluation"))  # a file is used whole
    assert len(ids) > 500
    assert calibration_data(tokenizer, str(path), 4, 16).shape == (4, 16)
    (tmp_path / "short.txt").write_text("two words")
    with pytest.raises(UsageError, match=r"calibration text has \d+ tokens, shorter than one window"):
        calibration_data(tokenizer, str(tmp_path / "short.txt"), 4, 16)


def test_binary_file_is_a_usage_error(tokenizer, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UsageError, match="not UTF-8 text"):
        tokens_for(tokenizer, str(path), "calibration")


@pytest.mark.parametrize("source", ["nope.txt", "/abs/nope.txt", "wikitext103"])
def test_check_source_rejects_what_cannot_exist(source, tmp_path):
    with pytest.raises(UsageError, match="neither a text file nor one of"):
        check_source(source)
    with pytest.raises(UsageError):
        check_source(str(tmp_path))  # a directory is not a text file
    for ok in ("embedded", "wikitext2", "c4"):
        check_source(ok)


def test_hub_dataset_offline_names_what_to_download(monkeypatch, tmp_path):
    """With the Hub unreachable and nothing cached, the error is immediate and says what to download."""
    datasets_config = pytest.importorskip("datasets.config")
    from huggingface_hub import constants

    monkeypatch.setattr("llmprune.models.loading.hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    offline = constants.HF_HUB_OFFLINE, datasets_config.HF_HUB_OFFLINE
    with pytest.raises(DataUnavailableError) as raised:
        text._hub_text("wikitext2", "evaluation")
    message = str(raised.value)
    assert "wikitext/wikitext-2-raw-v1" in message and "\n" not in message
    with pytest.raises(DataUnavailableError, match="allenai/c4"):
        text._hub_text("c4", "calibration")
    assert offline == (constants.HF_HUB_OFFLINE, datasets_config.HF_HUB_OFFLINE)  # switched back


def test_heldout_windows_share_no_token_with_calibration():
    from llmprune.data.text import calibration_windows, heldout_windows

    tokens = torch.arange(5000)  # each token id is its position
    calibration = calibration_windows(tokens, 16, 64, seed=3)
    heldout = heldout_windows(tokens, 16, 64, seed=3, window=128, count=6)
    assert heldout.shape == (6, 128)
    assert not set(calibration.flatten().tolist()) & set(heldout.flatten().tolist())
    starts = heldout[:, 0].tolist()
    assert all(s % 128 == 0 for s in starts) and len(set(starts)) == 6  # aligned, non-overlapping
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 128)) for row in heldout)
    with pytest.raises(UsageError, match="no 128-token window"):
        heldout_windows(torch.arange(300), 64, 64, seed=0, window=128)
