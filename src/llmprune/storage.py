"""The bottom of llmprune: files and the host, with nothing of models in them.

- ``VERSION``, the package version (written here only), and ``library_versions()`` for run records;
- ``llmprune.json``, the metadata of every saved model (``write_metadata``, ``read_metadata``);
- writing safely: ``write_atomically`` (one file) and ``staged_directory`` (a whole output, written to a
  temporary sibling and renamed into place only when complete, so a crash or Ctrl-C never leaves a
  half-written output);
- the guards every command that writes an output goes through, before any model is loaded
  (``prepare_output``): the output's name, that an existing output is llmprune's to replace
  (``is_own_output``, ``check_output``), that its parent can be written, and an exclusive lock beside it for
  the whole run (``output_lock``);
- memory: ``free_memory`` on a device, ``trim_heap`` to hand freed heap pages back to the OS.

Imports nothing from llmprune but ``errors``, and nothing heavy at module level (``import llmprune`` reads
the version from here).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmprune.errors import UsageError

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # Windows: see output_lock
    fcntl = None

VERSION = "0.1.0"
"""The package version (``llmprune.__version__``; pyproject.toml reads it from here)."""

METADATA_FILE = "llmprune.json"


def library_versions() -> dict[str, str]:
    """The versions a saved model or a report records: llmprune, torch, transformers, Python."""
    import torch
    import transformers

    return {
        "llmprune": VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# ---- metadata -----------------------------------------------------------------------------------------


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Write ``llmprune.json`` into ``directory`` (a staging directory: the rename makes it atomic).
    Saving a model goes through ``export.save.write_model_metadata``, which writes its model card too."""
    (Path(directory) / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The ``llmprune.json`` of a saved model, or ``{}`` for a checkpoint llmprune did not write."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise UsageError(f"{path} is damaged: not a JSON object")
    return metadata


# ---- the output: checks and the lock -------------------------------------------------------------------


def is_own_output(directory: Path, marker: str = METADATA_FILE) -> bool:
    """Whether an existing ``directory`` may be replaced (or written into) by llmprune: it is empty, or it
    holds ``marker`` (``llmprune.json``, which compressed checkpoints hold too; a sweep's ``sweep.json``)."""
    return directory.is_dir() and ((directory / marker).is_file() or not any(directory.iterdir()))


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output (before any work) unless overwriting, and never overwrite what llmprune
    did not write: a directory of the user's files is refused, not deleted."""
    if output.exists() and not overwrite:
        raise UsageError(f"output {output} exists; pass --overwrite or choose another --output")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory")
    if output.exists() and not is_own_output(output):
        raise UsageError(
            f"output {output} is not an llmprune output (no {METADATA_FILE}) and not empty; --overwrite "
            "only replaces those: choose another --output, or remove it yourself"
        )


_held: dict[Path, int] = {}
"""Locks this process holds, by lock file, with how many ``output_lock`` blocks hold each (re-entrant: a
run holds its output's lock, and the saving it does inside takes it again)."""


def _lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


def _acquire(output: Path, lock: Path) -> int:
    """Open ``lock`` and take its exclusive flock without waiting; returns the descriptor, pid written."""
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise UsageError(f"output {output} is in use by another llmprune run (pid {holder})") from None
        except BaseException:
            os.close(descriptor)
            raise
        try:
            opened, current = os.fstat(descriptor), os.stat(lock)
            same = (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)  # its holder unlinked it as it finished: lock the one at the path now


@contextmanager
def output_lock(output: str | Path) -> Iterator[Path]:
    """Hold ``output`` for one run: refuse a name that is no directory to write (empty, ``.``, ``..``),
    create its parent, and take an exclusive lock on the hidden file ``.NAME.lock`` beside it (holding
    the pid), which also proves the parent writable before any work. Another run on the same output (in
    any process) is refused in one line naming its pid. Yields ``output`` as a ``Path``.

    The lock file is unlinked while the lock is still held, and taking a lock checks that the file locked
    is still the one at the path (retrying if not), so unlinking it races with no one; a killed run leaves
    it behind, unlocked, for the next run to take and remove. Without ``fcntl`` (Windows) runs are not
    locked against each other: the file is still created (the writability check) and removed.
    """
    output = Path(output)
    if output.name in ("", ".", ".."):
        raise UsageError(
            f"--output {str(output)!r} names no directory to write: give a path such as out/ "
            "(not empty, '.' or '..')"
        )
    lock = Path(os.path.abspath(_lock_path(output)))  # one key per file for the re-entrant registry
    if lock in _held:
        _held[lock] += 1
        try:
            yield output
        finally:
            _held[lock] -= 1
        return
    created = [p for p in (output.parent, *output.parent.parents) if not p.exists()]
    try:
        if output.parent.exists() and not output.parent.is_dir():
            raise NotADirectoryError(f"{output.parent} is not a directory")
        output.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(descriptor, f"{os.getpid()}\n".encode())
        else:
            descriptor = _acquire(output, lock)
        if output.is_dir() and not os.access(output, os.W_OK | os.X_OK):
            os.unlink(lock)
            os.close(descriptor)
            raise PermissionError(f"{output} is read-only")
    except BaseException as exc:
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write to {output}: {exc}") from None
        raise
    _held[lock] = 1
    try:
        yield output
    finally:
        del _held[lock]
        with suppress(OSError):
            os.unlink(lock)  # before closing, while still ours
        os.close(descriptor)
        _remove_empty(created)  # parents made for an output that was not written


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            return


@contextmanager
def prepare_output(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """``output_lock`` plus ``check_output``: everything about the output checked, and the output held,
    before any work. Wrap a whole run in it (from before loading to after the rename)."""
    with output_lock(output) as path:
        check_output(path, overwrite)
        yield path


# ---- writing safely ------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def staged_directory(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``output`` to write into; renamed to ``output`` (fsynced) only if the block
    completes, and removed on any failure, so ``output`` is never half-written. The output is held and
    checked by ``prepare_output`` meanwhile (already held if the caller holds it)."""
    with prepare_output(output, overwrite) as output:
        staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        retired = output.with_name(f".{output.name}.old-{os.getpid()}")
        for stale in output.parent.glob(f".{output.name}.tmp-*"):  # left by a killed run
            if not _running(stale.name.rpartition("-")[2]):
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            yield staging
            _fsync_tree(staging)
            if output.exists():
                os.replace(output, retired)
            try:
                os.replace(staging, output)
            except BaseException:
                if retired.exists() and not output.exists():
                    os.replace(retired, output)  # put the previous output back
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(retired, ignore_errors=True)


def _running(pid: str) -> bool:
    """Whether a process with this id exists (a staging directory's owner may still be writing). psutil
    asks the OS portably: ``os.kill(pid, 0)`` would be a probe on POSIX but sends CTRL_C_EVENT on Windows."""
    import psutil

    return pid.isdigit() and psutil.pid_exists(int(pid))


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)``, fsync it, rename it to ``path`` and fsync the directory."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    if os.name == "nt":  # a directory cannot be opened (nor fsynced) on Windows
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# ---- memory --------------------------------------------------------------------------------------------


def free_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free on ``device``: GPU memory for CUDA, else available RAM."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free
    import psutil

    return psutil.virtual_memory().available


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere nothing). Tensors of a few MiB are
    allocated on the heap, not mapped, once glibc has raised its mmap threshold, and without trimming the
    freed pages stay counted in the process's resident memory."""
    import ctypes

    with suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)
