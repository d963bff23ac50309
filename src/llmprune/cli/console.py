"""Where the commands write: ``console`` (stderr: progress, notes, errors) and ``out`` (stdout: results),
and the one-line ends of a command: an error (``fail``) or a Ctrl-C (``Interrupted``, ``interrupted``)."""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console

console = Console(stderr=True)
out = Console() if sys.stdout.isatty() else Console(width=160)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the command kept and how to go on; ``main`` prints it in one line (exit 130)."""

    def __init__(self, note: str = "no output was written") -> None:
        super().__init__(note)
        self.note = note


def fail(message: str, code: int) -> NoReturn:
    """Print ``llmprune: error: MESSAGE`` as one unwrapped line and exit with ``code``."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    console.print(f"llmprune: error: {line}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def interrupted(exc: BaseException | None) -> NoReturn:
    """Print ``llmprune: interrupted; NOTE`` (what an ``Interrupted`` kept) and exit 130."""
    note = exc.note if isinstance(exc, Interrupted) else "no output was written"
    console.print(f"llmprune: interrupted; {note}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(130)
