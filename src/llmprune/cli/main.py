"""The ``llmprune`` command line: the command group, one module per command, and ``main``, which turns
every error into one line and an exit code."""

from __future__ import annotations

import sys

import click

from llmprune.errors import LlmpruneError

from .bench import bench
from .checkpoints import compress, decompress, inspect
from .console import Interrupted, fail, interrupted
from .evaluate import evaluate
from .finetune import finetune
from .prune import prune
from .sweep import sweep

__all__ = ["Interrupted", "cli", "main"]

# click >= 8.2 raises this for a bare `llmprune` (older versions print the help themselves)
NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmprune")
def cli() -> None:
    """Compress Hugging Face causal language models by pruning: one-shot (magnitude, Wanda, SparseGPT;
    unstructured, N:M or structured heads, channels and layers), sparse fine-tuning and gradual pruning,
    sweeps, evaluation, compressed checkpoints and 2:4 sparse kernels."""


for command in (prune, evaluate, compress, decompress, inspect, sweep, bench, finetune):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit 2 for usage errors, 130 on Ctrl-C."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # ours is the one over decoder layers
        code = cli.main(args=argv, prog_name="llmprune", standalone_mode=False)
    except click.exceptions.Abort as exc:  # click's wrapper of KeyboardInterrupt
        interrupted(exc.__cause__)
    except NoArgsIsHelp as exc:  # plain `llmprune`: the help, not an error line
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except LlmpruneError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        interrupted(exc)
    if isinstance(code, int) and code:  # click's ctx.exit(code) in non-standalone mode
        sys.exit(code)
