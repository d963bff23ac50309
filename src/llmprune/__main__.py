"""The ``llmprune`` command (console script and ``python -m llmprune``).

Importing the command line takes seconds (torch, transformers). A Ctrl-C meanwhile exits at once, 130 with
one line: raised as a KeyboardInterrupt inside those imports it can be swallowed, turned into an ImportError
by a library, or abort the process from C++ (pybind11), and CPython may kill itself with SIGINT at exit after
one went through an extension's embedded code. Nothing has been written by then. This module and
``llmprune/__init__.py`` import nothing heavy themselves.
"""

import os
import signal
import sys

INTERRUPTED = "llmprune: interrupted; no output was written\n"


def _exit_at_once(signum: int, frame: object) -> None:
    os.write(sys.stderr.fileno(), INTERRUPTED.encode())
    os._exit(130)


def main() -> None:
    """Import the command line (Ctrl-C: exit 130 at once), then run it (``llmprune.cli.main.main``)."""
    previous = signal.getsignal(signal.SIGINT)
    guarded = previous is signal.default_int_handler  # not when the parent made us ignore SIGINT
    if guarded:
        signal.signal(signal.SIGINT, _exit_at_once)
    try:
        from llmprune.cli.main import main as run
    finally:
        if guarded:
            signal.signal(signal.SIGINT, previous)
    run()


if __name__ == "__main__":
    main()
