"""Calibration and evaluation token windows, from the embedded text, a local file, or a hub dataset.

The embedded text is the ~465k characters of English documentation that ship with Python
(``pydoc_data.topics``). Tokenized whole, its first 70 % feeds calibration and its last 20 % evaluation,
so the two never overlap.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmprune.errors import DataUnavailableError, UsageError
from llmprune.storage import free_memory

EMBEDDED = "embedded"
HUB_DATASETS = ("wikitext2", "c4")
CALIBRATION_FRACTION = 0.7
EVALUATION_FRACTION = 0.2


def embedded_text() -> str:
    """Python's bundled documentation topics, joined in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def check_source(source: str) -> None:
    """Fail fast on a data source that cannot exist (before any model is loaded)."""
    if source in (EMBEDDED, *HUB_DATASETS):
        return
    if not Path(source).is_file():
        raise UsageError(f"data source {source!r} is neither a text file nor one of: embedded, wikitext2, c4")


def _hub_rows(name: str, split: str) -> list[str]:
    from datasets import load_dataset

    if name == "wikitext2":
        rows = load_dataset(
            "wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test"
        )
        return rows["text"]
    shard = (
        "en/c4-train.00000-of-01024.json.gz"
        if split == "calibration"
        else "en/c4-validation.00000-of-00008.json.gz"
    )
    rows = load_dataset("allenai/c4", data_files={"data": shard}, split="data")
    return rows["text"][: 5000 if split == "calibration" else 1100]


def _hub_text(name: str, split: str) -> str:
    try:
        import datasets  # noqa: F401  (before hub_access, which may switch datasets to offline mode)
    except ImportError:
        raise DataUnavailableError(
            f"{name} needs the 'datasets' package: pip install 'llmprune[datasets]'"
        ) from None
    from llmprune.models.loading import hub_access

    try:
        with hub_access():
            return "\n\n".join(_hub_rows(name, split))
    except Exception as exc:  # datasets raises many types when offline
        what = (
            "wikitext/wikitext-2-raw-v1"
            if name == "wikitext2"
            else "allenai/c4 (shards en/c4-train.00000, en/c4-validation.00000)"
        )
        raise DataUnavailableError(
            f"cannot load {name} ({type(exc).__name__}); download the dataset {what} into the Hugging Face "
            "cache while online, or pass a local text file"
        ) from None


def tokens_for(tokenizer, source: str, split: str) -> torch.Tensor:
    """The 1-D token stream a source provides for ``split`` (``calibration`` or ``evaluation``)."""
    check_source(source)
    if source == EMBEDDED:
        ids = torch.tensor(tokenizer(embedded_text())["input_ids"], dtype=torch.long)
        if split == "calibration":
            return ids[: int(len(ids) * CALIBRATION_FRACTION)]
        return ids[int(len(ids) * (1 - EVALUATION_FRACTION)) :]  # as the public protocol cuts it
    if source in HUB_DATASETS:
        text = _hub_text(source, split)
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"data file {source} is not UTF-8 text") from None
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows starting at seeded random positions.

    Starts are ``torch.randint(0, len(tokens) - seqlen, (nsamples,))`` from a generator seeded with
    ``seed``: the public protocol's draw (with it our Wanda 2:4 on the embedded text reproduces the
    reference figure to the digit). The global random state is left alone.
    """
    if len(tokens) < seqlen:
        raise UsageError(f"calibration text has {len(tokens)} tokens, shorter than one window of {seqlen}")
    _check_memory(nsamples * seqlen * tokens.element_size(), f"{nsamples:,} windows of {seqlen} tokens")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, max(1, len(tokens) - seqlen), (nsamples,), generator=generator).tolist()
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def heldout_windows(
    tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0, window: int = 512, count: int = 8
) -> torch.Tensor:
    """Up to ``count`` non-overlapping ``window``-token windows of the calibration text that share no token
    with the ``nsamples`` × ``seqlen`` calibration windows drawn with ``seed``: data to choose
    hyperparameters on, never seen by calibration and apart from the evaluation text."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, max(1, len(tokens) - seqlen), (nsamples,), generator=generator)
    used = torch.zeros(len(tokens) + 1, dtype=torch.int32)  # +1 at each start, -1 past each end
    used.index_add_(0, starts, torch.ones(nsamples, dtype=torch.int32))
    ends = (starts + seqlen).clamp(max=len(tokens))
    used.index_add_(0, ends, torch.full((nsamples,), -1, dtype=torch.int32))
    covered = used.cumsum(0)[: len(tokens)] > 0
    free = [s for s in range(0, len(tokens) - window + 1, window) if not bool(covered[s : s + window].any())]
    if not free:
        raise UsageError(f"no {window}-token window of the calibration text is left out of calibration")
    return torch.stack([tokens[s : s + window] for s in free[:count]])


def heldout_data(
    tokenizer,
    source: str = EMBEDDED,
    nsamples: int = 32,
    seqlen: int = 256,
    seed: int = 0,
    window: int = 512,
    count: int = 8,
) -> torch.Tensor:
    """``heldout_windows`` of a source's calibration text (for tuning: not calibration, not evaluation)."""
    tokens = tokens_for(tokenizer, source, "calibration")
    return heldout_windows(tokens, nsamples, seqlen, seed, window, count)


def _check_memory(size: int, what: str) -> None:
    """Refuse to build ``size`` bytes of token ids past half the free memory (an absurd count would
    otherwise run for minutes, then be killed)."""
    free = free_memory()
    if size > free / 2:
        raise UsageError(
            f"{what} take {size / 2**30:,.1f} GiB as token ids alone, more than half the free memory "
            f"({free / 2**30:,.1f} GiB); ask for fewer windows"
        )


def evaluation_windows(tokens: torch.Tensor, seqlen: int, nsamples: int | None = None) -> torch.Tensor:
    """The first ``nsamples`` non-overlapping ``seqlen`` windows (all of them when None)."""
    count = len(tokens) // seqlen
    if count == 0:
        raise UsageError(f"evaluation text has {len(tokens)} tokens, shorter than one window of {seqlen}")
    if nsamples is not None:
        count = min(count, nsamples)
    return tokens[: count * seqlen].reshape(count, seqlen)


def calibration_data(
    tokenizer, source: str = EMBEDDED, nsamples: int = 32, seqlen: int = 256, seed: int = 0
) -> torch.Tensor:
    """Calibration token ids ``[nsamples, seqlen]`` from a source.

    More samples than the text has distinct windows are refused: they could only repeat windows, and an
    absurd count would otherwise fill the memory with copies before failing.
    """
    tokens = tokens_for(tokenizer, source, "calibration")
    starts = max(1, len(tokens) - seqlen)  # the starts calibration_windows draws from
    if len(tokens) >= seqlen and nsamples > starts:
        raise UsageError(
            f"--nsamples {nsamples} is more than the {starts:,} distinct windows of {seqlen} tokens in the "
            f"calibration text ({len(tokens):,} tokens); use fewer samples or a longer text"
        )
    return calibration_windows(tokens, nsamples, seqlen, seed)


def evaluation_data(
    tokenizer, source: str = EMBEDDED, seqlen: int = 512, nsamples: int | None = 16
) -> torch.Tensor:
    """Evaluation token ids ``[k, seqlen]`` (disjoint from calibration for the embedded text)."""
    return evaluation_windows(tokens_for(tokenizer, source, "evaluation"), seqlen, nsamples)
