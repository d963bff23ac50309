"""Errors the library raises on purpose. The CLI turns each into a one-line message."""


class LlmpruneError(Exception):
    """Base class of every error llmprune raises on purpose."""

    exit_code = 1


class UsageError(LlmpruneError):
    """Bad input from the user: options, paths, data. The CLI exits with status 2."""

    exit_code = 2


class NonFiniteError(UsageError):
    """NaN or Inf in weights or activations; the message names the layer."""


class DataUnavailableError(UsageError):
    """A dataset or model could not be loaded (often: offline); the message says what to fetch."""
