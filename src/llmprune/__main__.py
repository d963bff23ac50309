"""The ``llmprune`` command (console script and ``python -m llmprune``).

Importing the command line takes seconds (torch, transformers); a Ctrl-C meanwhile exits 130 with one
line instead of a traceback. This module and ``llmprune/__init__.py`` import nothing heavy themselves.
"""

import sys


def main() -> None:
    """Import the command line, then run it (``llmprune.cli.main.main``)."""
    try:
        from llmprune.cli.main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("llmprune: interrupted; no output was written\n")
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
