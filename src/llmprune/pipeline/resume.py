"""Resuming an interrupted run: a checkpoint after every finished decoder layer.

After layer i is pruned the checkpoint holds, in its own directory: ``layer-0000i.safetensors`` (that
layer's pruned weights, one file per finished layer), ``hidden-0000i.safetensors`` (the hidden states
leaving it, one tensor per calibration batch) and, written last, ``state.json`` (which run this is, the next
layer to prune and the report rows so far). Each file goes to a temporary name, is fsynced and renamed into
place, so a crash at any moment leaves ``state.json`` pointing at complete files. Only safetensors and JSON
are read back (never pickle).

Rerunning layer i+1.. from these is bit-identical to a run that never stopped: the layers before are the
very weights it produced, the inputs are the very tensors it would have fed on, and the rest is
deterministic.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmprune.errors import UsageError
from llmprune.pipeline.report import BlockReport, LinearReport
from llmprune.storage import write_atomically

STATE_FILE = "state.json"


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # On the CPU and contiguous; safetensors refuses tensors sharing storage, so those are copied (the rest
    # are not: the hidden states may be as large as the model).
    cpu: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        cpu[name] = tensor
    write_atomically(path, lambda temporary: save_file(cpu, str(temporary)))


def _describe(value: Any) -> str:
    if value is None:
        return "default"
    return value if isinstance(value, str) else json.dumps(value)


CARRIED = "carried/"
"""Prefix of the carried tensors' names in a checkpoint's hidden-state file."""


@dataclass
class Restored:
    """What a checkpoint gives back to the walk."""

    next_layer: int
    hidden: list[torch.Tensor]
    """The inputs of ``next_layer``, one per calibration batch."""
    rows: list[LinearReport]
    blocks: list[BlockReport]
    carried: dict[str, torch.Tensor]
    """The tensors the steps carried past the last finished layer, by name."""


class LayerCheckpoint:
    """Progress of one run, kept in ``directory``; ``recipe`` is every option that shapes the result."""

    def __init__(self, directory: str | Path, recipe: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.recipe = recipe
        self.fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def _damaged(self, problem: str) -> UsageError:
        return UsageError(
            f"--resume: the checkpoint in {self.directory} is damaged ({problem}); rerun without --resume "
            "to start over"
        )

    def _state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise self._damaged(f"{STATE_FILE}: {exc}") from None
        if not isinstance(state, dict):
            raise self._damaged(f"{STATE_FILE} is not a JSON object")
        return state

    def _read(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of one of the checkpoint's files; any failure to read them means it is damaged."""
        try:
            return load_file(str(self.directory / name), device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise self._damaged(f"{name}: {exc}") from None

    def finished_layers(self) -> int:
        """How many decoder layers ``--resume`` would skip (0 without a usable checkpoint of this run)."""
        try:
            self.check()
            return int(self._state()["next_layer"])
        except (UsageError, KeyError, TypeError, ValueError):
            return 0

    def check(self) -> None:
        """Refuse to resume without a checkpoint, or from one written with other options."""
        state = self._state()
        if state is None:
            raise UsageError(f"--resume: no checkpoint to resume from in {self.directory}")
        if state.get("fingerprint") != self.fingerprint:
            saved = state.get("recipe", {})
            changed = [
                f"{name}: {_describe(saved.get(name))} → {_describe(self.recipe.get(name))}"
                for name in sorted(saved.keys() | self.recipe.keys())
                if saved.get(name) != self.recipe.get(name)
            ]
            raise UsageError(
                f"--resume: the checkpoint in {self.directory} was written with other options "
                f"({'; '.join(changed) or 'another version'}); run the same command, or drop --resume "
                "to start over"
            )

    def clear(self) -> None:
        """Forget any earlier progress (state first, so a crash midway leaves nothing to resume from)."""
        self.state_path.unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    def save(
        self,
        index: int,
        layer: nn.Module,
        hidden: list[torch.Tensor],
        rows: list[LinearReport],
        blocks: Sequence[BlockReport] = (),
        carried: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Record that decoder layer ``index`` is done: its weights, its outputs, the report so far, and the
        tensors steps carry to the next layer (``carried``, by name: e.g. a dense stream of activations)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _save_tensors(self.directory / f"layer-{index:05d}.safetensors", layer.state_dict())
        hidden_name = f"hidden-{index:05d}.safetensors"
        tensors = {str(i): h for i, h in enumerate(hidden)}
        tensors.update({CARRIED + name: tensor for name, tensor in (carried or {}).items()})
        _save_tensors(self.directory / hidden_name, tensors)
        state = {
            "fingerprint": self.fingerprint,
            "recipe": self.recipe,
            "next_layer": index + 1,
            "hidden": hidden_name,
            "layers": [asdict(row) for row in rows],
            "blocks": [asdict(block) for block in blocks],
        }
        write_atomically(self.state_path, lambda temporary: temporary.write_text(json.dumps(state)))
        for stale in self.directory.glob("hidden-*.safetensors"):  # only now that nothing points to them
            if stale.name != hidden_name:
                stale.unlink()

    def restore(
        self,
        layers: nn.ModuleList,
        device: torch.device,
        receive: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    ) -> Restored | None:
        """Hand each finished layer's weights to ``receive(index, state_dict)`` (default: load them into
        ``layers``); return the next layer, its inputs, the report so far and the carried tensors."""
        state = self._state()
        if state is None:
            return None
        self.check()
        try:  # the structure of state.json (report rows first: nothing is loaded from a bad one)
            next_layer, hidden_name = int(state["next_layer"]), str(state["hidden"])
            rows = [LinearReport(**{**row, "shape": tuple(row["shape"])}) for row in state["layers"]]
            blocks = [BlockReport(**block) for block in state.get("blocks", [])]
        except KeyError as exc:
            raise self._damaged(f"{STATE_FILE} lacks {exc}") from None
        except (TypeError, ValueError) as exc:
            raise self._damaged(f"{STATE_FILE} is malformed: {exc}") from None
        if next_layer > len(layers):
            raise UsageError(f"--resume: the checkpoint in {self.directory} has more layers than the model")
        for index in range(next_layer):
            weights = self._read(f"layer-{index:05d}.safetensors")
            if receive is None:
                layers[index].load_state_dict(weights, strict=True)
            else:
                receive(index, weights)
        saved = self._read(hidden_name, str(device))
        carried = {name[len(CARRIED) :]: saved.pop(name) for name in list(saved) if name.startswith(CARRIED)}
        if sorted(saved) != sorted(map(str, range(len(saved)))):
            raise self._damaged(f"{hidden_name} does not hold one tensor per calibration batch")
        hidden = [saved[str(i)] for i in range(len(saved))]
        return Restored(next_layer, hidden, rows, blocks, carried)
