"""The compressed checkpoint format: weight files in the layouts of ``packing.py``, written and read.

A compressed checkpoint is the Hugging Face directory (config, tokenizer, ``llmprune.json``) with each
``NAME.safetensors`` replaced by ``NAME.compressed.safetensors``. In that file a tensor ``T`` is stored as
``T`` (dense) or as its parts ``T@values`` plus ``T@mask`` (bitmask) or ``T@positions`` (N:M); the file's
safetensors metadata records, per tensor, its layout, shape, dtype and a SHA-256 of all that and of its
parts. ``llmprune.json`` gets a ``compressed`` manifest: format, version, files and their sizes.

Reading checks the manifest and the file sizes first (a truncated file is caught before anything is read)
and every tensor's checksum as it is decoded; ``llmprune.load`` decodes every tensor before it builds the
model, so a damaged checkpoint raises a ``UsageError`` and loads nothing. Copying a whole checkpoint to
and from this format (``compress``, ``decompress``) is ``export/compressed.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import safe_open
from safetensors.torch import save_file

from llmprune.errors import UsageError
from llmprune.models.packing import Packed, checksum, from_entry, pack, part_names, unpack
from llmprune.models.shards import INDEX_FILE, CheckpointShards
from llmprune.storage import read_metadata

FORMAT = "llmprune-compressed"
FORMAT_VERSION = 1
SUFFIX = ".compressed.safetensors"
MANIFEST_KEY = "compressed"
"""Key of the manifest in ``llmprune.json``; its presence is what marks a checkpoint as compressed."""
HEADER_KEY = "llmprune.tensors"
Progress = Callable[[int, int], None]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)  # extra keys are ignored: a newer llmprune may add some


def _plain_name(name: str, suffix: str) -> str:
    """A file name inside the checkpoint directory: no folders (nothing is read or written outside it)."""
    if Path(name).name != name or not name.endswith(suffix) or name == suffix:
        raise ValueError(f"{name!r} is not a *{suffix} file name")
    return name


class _ManifestFile(_Strict):
    bytes: int = Field(ge=0)
    dense_name: str

    @field_validator("dense_name")
    @classmethod
    def _dense_name(cls, value: str) -> str:
        return _plain_name(value, ".safetensors")


class _LayoutCounts(_Strict):
    tensors: int = Field(ge=0)
    dense_bytes: int = Field(ge=0)
    stored_bytes: int = Field(ge=0)


class _Manifest(_Strict):
    """What ``compress_weights`` writes under ``MANIFEST_KEY``: every weight file with its size."""

    files: dict[str, _ManifestFile]
    layouts: dict[str, _LayoutCounts]

    @field_validator("files")
    @classmethod
    def _file_names(cls, value: dict[str, _ManifestFile]) -> dict[str, _ManifestFile]:
        for name in value:
            _plain_name(name, SUFFIX)
        return value


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a compressed checkpoint, its format, version and structure checked."""
    manifest = read_metadata(directory).get(MANIFEST_KEY)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{directory} is not a compressed llmprune checkpoint")
    if manifest.get("version") != FORMAT_VERSION:
        raise UsageError(
            f"{directory}: compressed format version {manifest.get('version')} is not supported "
            f"(this llmprune reads version {FORMAT_VERSION}); upgrade llmprune"
        )
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as exc:
        item = exc.errors()[0]
        *entry, last = [str(part) for part in item["loc"]] or ["manifest"]
        if item["type"] != "missing":
            message = item["msg"].removeprefix("Value error, ")
            problem = f"manifest entry {'.'.join([*entry, last])}: {message}"
        elif entry:
            problem = f"manifest entry {'.'.join(entry)} lacks {last!r}"
        else:
            problem = f"the manifest lacks {last!r}"
        raise UsageError(f"damaged compressed checkpoint {directory}: {problem}") from None
    return manifest


def is_compressed(directory: str | Path) -> bool:
    """Whether ``directory`` holds a compressed checkpoint (its ``llmprune.json`` has the manifest)."""
    return Path(directory).is_dir() and MANIFEST_KEY in read_metadata(directory)


def _key(name: str, part: str) -> str:
    return name if part == "dense" else f"{name}@{part}"


def compress_weights(
    source: str | Path, target: str | Path, progress: Progress | None = None
) -> dict[str, Any]:
    """Write a compressed file into ``target`` for each safetensors weight file of ``source``, one file at
    a time; returns the manifest for ``llmprune.json`` (with, per layout, the tensors stored in it and
    their bytes dense and stored). With ``target == source`` (a staging directory) the dense files and
    their index are replaced."""
    source, target = Path(source), Path(target)
    shards = CheckpointShards(source)
    files: dict[str, list[str]] = {}
    for name, file in shards.weight_map.items():
        files.setdefault(file, []).append(name)
    manifest: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "files": {}}
    layouts: dict[str, dict[str, int]] = {}
    done = 0
    for file, names in files.items():
        parts: dict[str, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        for name in names:
            tensor = shards.read(name)
            done += 1
            packed = pack(tensor)
            entries[name] = packed.entry()
            parts.update({_key(name, part): value for part, value in packed.parts.items()})
            counts = layouts.setdefault(packed.layout, {"tensors": 0, "dense_bytes": 0, "stored_bytes": 0})
            counts["tensors"] += 1
            counts["dense_bytes"] += tensor.numel() * tensor.element_size()
            counts["stored_bytes"] += packed.nbytes
            if progress is not None:
                progress(done, len(shards.weight_map))
        compressed_name = file.removesuffix(".safetensors") + SUFFIX
        header = {"format": FORMAT, "version": str(FORMAT_VERSION), HEADER_KEY: json.dumps(entries)}
        save_file(parts, str(target / compressed_name), metadata=header)
        manifest["files"][compressed_name] = {
            "bytes": (target / compressed_name).stat().st_size,
            "dense_name": file,
        }
        if target.resolve() == source.resolve():
            (source / file).unlink()
    if target.resolve() == source.resolve():
        (source / INDEX_FILE).unlink(missing_ok=True)
    manifest["layouts"] = dict(sorted(layouts.items()))
    return manifest


class CompressedCheckpoint:
    """The tensors of a compressed checkpoint, by name, each decoded (and its checksum verified) on read.

    Opening checks the manifest, that every file is there with the size it was written with, and reads
    every file's header, so damage there is reported before any tensor is decoded.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = manifest = read_manifest(self.directory)
        self.entries: dict[str, dict[str, Any]] = {}
        self.files: dict[str, str] = {}
        for file, info in manifest["files"].items():
            path = self.directory / file
            if not path.is_file():
                raise UsageError(f"{path} is missing from the compressed checkpoint")
            size = path.stat().st_size
            if size != info["bytes"]:
                raise UsageError(
                    f"{path} is truncated or damaged: {size} bytes, {info['bytes']} were written"
                )
            for name, entry in self._header(path).items():
                self.entries[name] = entry
                self.files[name] = file

    @staticmethod
    def _header(path: Path) -> dict[str, dict[str, Any]]:
        try:
            with safe_open(str(path), framework="pt") as handle:
                return json.loads((handle.metadata() or {})[HEADER_KEY])
        except Exception as exc:  # safetensors, JSON and key errors alike: the header is damaged
            raise UsageError(f"{path} is corrupted: cannot read its header ({exc})") from None

    def names(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self.entries)

    def dense_name(self, name: str) -> str:
        """The weight file ``name`` came from (and goes back to when decompressed)."""
        return self.manifest["files"][self.files[name]]["dense_name"]

    def read_packed(self, name: str) -> Packed:
        """The stored parts of tensor ``name``, checksum verified."""
        entry, path = self.entries[name], self.directory / self.files[name]
        try:
            with safe_open(str(path), framework="pt") as handle:
                parts = {part: handle.get_tensor(_key(name, part)) for part in part_names(entry["layout"])}
            intact = checksum(entry, parts) == entry.get("sha256")
        except Exception as exc:  # missing parts, a description that is not one
            raise UsageError(f"{path} is corrupted: cannot read tensor {name} ({exc})") from None
        if not intact:
            raise UsageError(f"{path} is corrupted: tensor {name} does not match its checksum")
        return from_entry(entry, parts)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as it was before compression, bit for bit."""
        try:
            return unpack(self.read_packed(name))
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # parts that do not fit their entry
            raise UsageError(f"{self.directory}: cannot decode tensor {name} ({exc})") from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, decoded and verified."""
        return {name: self.read(name) for name in self.names()}
