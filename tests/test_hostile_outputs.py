"""Hostile outputs (issue 14, items 1, 2 and 5): what every command that writes an output (prune, compress,
decompress, finetune, sweep) does with an output it must not, or cannot, write.

- ``--overwrite`` replaces only an llmprune output (it holds ``llmprune.json``; compressed checkpoints too)
  or an empty directory; a directory of the user's files is refused in one line and left intact.
- Two runs on one output cannot collide: the first holds a lock beside it for the whole run, and the
  second exits 2 naming the first's pid, before loading anything.
- An output that cannot be written (its parent a file, a read-only directory or mount, ``/proc``, no name
  at all) is refused in one line before the model is loaded, leaving nothing behind (no ``.NAME.resume``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llmprune
import llmprune.api
from conftest import ERROR, invoke, save_text, save_tiny_llama
from llmprune import storage as save
from llmprune.storage import METADATA_FILE, output_lock

COMMANDS = ["prune", "compress", "decompress", "finetune", "sweep"]
OVERWRITING = [c for c in COMMANDS if c != "sweep"]  # a sweep resumes its own output instead


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    model = save_tiny_llama(root / "tiny", tokenizer)
    text = save_text(root / "text.txt")
    return {"model": model, "text": text, "compressed": llmprune.compress(model, root / "compressed")}


def command(files, name: str, output: Path | str, *extra: str) -> list[str]:
    """The fastest complete run of command ``name`` on the tiny model, writing ``output``."""
    model, text = str(files["model"]), str(files["text"])
    data = ["--calibration", text, "--nsamples", "2", "--seqlen", "16", "--eval-data", text]
    arguments = {
        "prune": ["prune", "--model", model, *data, "--eval-nsamples", "0", "-q"],
        "compress": ["compress", model, "--quiet"],
        "decompress": ["decompress", str(files["compressed"]), "--quiet"],
        "finetune": ["finetune", model, "--data", text, "--steps", "1", "--seqlen", "16", "--batch-size=1"],
        "sweep": ["sweep", "--model", model, *data, "--methods", "magnitude", "--patterns", "unstructured"],
    }[name]
    if name == "finetune":
        arguments += ["--eval-nsamples", "0", "-q"]
    if name == "sweep":
        arguments += ["--sparsities", "0.5", "--eval-nsamples", "1", "--eval-seqlen", "16", "-q"]
    return [*arguments, "--output", str(output), *extra]


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# 1. --overwrite never deletes the user's files -----------------------------------------------------------


@pytest.mark.parametrize("name", COMMANDS)
def test_a_foreign_directory_is_refused_and_kept(capsys, files, tmp_path, no_model_loading, name):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    (mine / "notes").mkdir()
    before = listing(tmp_path)
    overwrite = ["--overwrite"] if name != "sweep" else []
    line = invoke(capsys, *command(files, name, mine, *overwrite)).error_line
    if name == "sweep":
        assert line == f"{ERROR}sweep output {mine} exists and is not a sweep (no sweep.json)"
    else:
        assert line == (
            f"{ERROR}output {mine} is not an llmprune output (no {METADATA_FILE}) and not empty; --overwrite "
            "only replaces those: choose another --output, or remove it yourself"
        )
    assert listing(tmp_path) == before
    assert (mine / "thesis.txt").read_text() == "years of work"


@pytest.mark.parametrize("existing", ["empty", "llmprune output"])
@pytest.mark.parametrize("name", OVERWRITING)
def test_overwrite_replaces_an_llmprune_output_or_an_empty_directory(capsys, files, tmp_path, name, existing):
    output = tmp_path / "out"
    if existing == "empty":
        output.mkdir()
    else:  # an earlier compressed checkpoint: llmprune.json with its manifest
        shutil.copytree(files["compressed"], output)
        (output / "stale.txt").write_text("from the earlier run")
    result = invoke(capsys, *command(files, name, output, "--overwrite"))
    assert result.code == 0, result.err
    assert not (output / "stale.txt").exists()
    assert (output / "config.json").is_file()
    assert listing(tmp_path) == ["out", *(f"out/{f}" for f in listing(output))]  # no lock or staging left


# 2. two runs on one output cannot collide -----------------------------------------------------------------

HOLDER = """
import sys
from llmprune.storage import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """An output held by another process (what a run in progress does); yields (output, its pid)."""
    output = tmp_path_factory.mktemp("held") / "busy"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield output, holder.pid
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert list(output.parent.iterdir()) == []  # the holder removed its lock file


@pytest.mark.parametrize("name", COMMANDS)
def test_an_output_in_use_is_refused_naming_the_pid(capsys, files, held, no_model_loading, name):
    output, pid = held
    for overwrite in ([], ["--overwrite"]) if name != "sweep" else ([],):
        line = invoke(capsys, *command(files, name, output, *overwrite)).error_line
        assert line == f"{ERROR}output {output} is in use by another llmprune run (pid {pid})"
    assert [p.name for p in output.parent.iterdir()] == [".busy.lock"]  # the holder's: no .busy.resume


def _held_by_someone(output: Path) -> bool:
    """Whether another open of ``output``'s lock file cannot take it (as a second run would find)."""
    descriptor = os.open(output.with_name(f".{output.name}.lock"), os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


def test_the_lock_is_held_from_before_loading_to_after_the_rename(files, tmp_path, monkeypatch):
    output, seen = tmp_path / "out", []
    real_load, real_save = llmprune.api.load_plain_model, llmprune.api.save_pruned

    def load_plain_model(*args, **kwargs):
        seen.append(("load", _held_by_someone(output)))
        return real_load(*args, **kwargs)

    def save_pruned(*args, **kwargs):
        saved = real_save(*args, **kwargs)
        seen.append(("renamed", saved.is_dir() and _held_by_someone(output)))
        return saved

    monkeypatch.setattr(llmprune.api, "load_plain_model", load_plain_model)
    monkeypatch.setattr(llmprune.api, "save_pruned", save_pruned)
    model, text = str(files["model"]), str(files["text"])
    config = llmprune.RunConfig(
        model=model, calibration=text, nsamples=2, seqlen=16, eval_nsamples=0, output=str(output)
    )
    llmprune.run(config, progress=lambda done, total: seen.append(("layer", _held_by_someone(output))))
    assert seen and all(held for _, held in seen), seen
    assert seen[0][0] == "load" and seen[-1][0] == "renamed"
    assert listing(tmp_path) == ["out", *(f"out/{f}" for f in listing(output))]


def test_a_killed_runs_lock_file_is_taken_and_removed(tmp_path, monkeypatch):
    output = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("999999999\n")  # left by a SIGKILLed run: unlocked
    with output_lock(output):
        assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
        with output_lock(output):  # re-entrant within a run (its saving takes it again)
            assert _held_by_someone(output)
        assert _held_by_someone(output)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(save, "fcntl", None)  # Windows: no locking, but the writability check still runs
    with output_lock(output):
        assert (tmp_path / ".out.lock").is_file()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(llmprune.UsageError, match="cannot write to /proc/x"), output_lock("/proc/x"):
        pass


# 5. outputs that cannot be written are refused before loading ---------------------------------------------

UNWRITABLE = {
    "parent is a file": ("afile/sub", "cannot write to {tmp}/afile/sub: {tmp}/afile is not a directory"),
    "under /proc": ("/proc/x", "cannot write to /proc/x: [Errno 2] No such file or directory: '/proc/.x"),
    "read-only directory": ("ro/x", "cannot write to {tmp}/ro/x: [Errno "),
    "read-only mount": ("mount/x", "cannot write to {tmp}/mount/x: [Errno 30] Read-only file system"),
    "read-only output": ("ro/sub", "cannot write to {tmp}/ro/sub: {tmp}/ro/sub is read-only"),
    "empty": ("", "--output '.' names no directory to write"),
    "dot": (".", "--output '.' names no directory to write"),
    "dot-dot": ("..", "--output '..' names no directory to write"),
}


def chattr(flag: str, directory: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(directory)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def read_only(directory: Path):
    """``directory`` made read-only: mode 0o555, and for root (whom modes do not stop) immutable."""
    root = os.geteuid() == 0
    directory.chmod(0o555)
    if root and not chattr("+i", directory):
        directory.chmod(0o755)
        pytest.skip("root writes to read-only directories and chattr +i is refused here (see 'mount')")
    try:
        yield
    finally:
        if root:
            assert chattr("-i", directory)
        directory.chmod(0o755)


@pytest.mark.parametrize("case", UNWRITABLE)
@pytest.mark.parametrize("name", COMMANDS)
def test_an_unwritable_output_is_refused_before_loading(
    capsys, files, tmp_path, monkeypatch, no_model_loading, name, case
):
    path, message = UNWRITABLE[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "ro" / "sub").mkdir(parents=True)
    if case == "read-only mount":  # what the kernel says for any file created there, root or not
        real_open = os.open

        def refuse(file, *args, **kwargs):
            if str(file).startswith(str(tmp_path / "mount")):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real_open(file, *args, **kwargs)

        (tmp_path / "mount").mkdir()
        monkeypatch.setattr(os, "open", refuse)
    before = listing(tmp_path)
    output = path if path in ("", ".", "..") or path.startswith("/") else str(tmp_path / path)
    extra = ["--overwrite"] if name != "sweep" else []
    guarded = {"read-only directory": "ro", "read-only output": "ro/sub"}.get(case)
    with read_only(tmp_path / guarded) if guarded else contextlib.nullcontext():
        line = invoke(capsys, *command(files, name, output, *extra)).error_line
    assert line.startswith(ERROR + message.format(tmp=tmp_path)), line
    assert listing(tmp_path) == before  # nothing made: no parent, lock, staging or .NAME.resume
