"""Where decoder layers and calibration activations live while the driver works through a model.

``LayerSource``: the driver asks for layer i just before it is needed and hands it back once it is done.
In memory that is nothing; streamed (``--offload``), layer i is read from the checkpoint's shards, and when
handed back it is written to the output's shards and dropped, so one decoder layer is in memory at a time.

``ActivationStore``: the hidden states flowing between layers (one tensor per calibration batch) stay in
RAM, or, when the two generations alive at once (a layer's inputs and its outputs) would exceed
``max_bytes``, go to safetensors files on disk that are read back (memory-mapped) one batch at a time.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmprune.errors import UsageError
from llmprune.models.architecture import decoder_layers
from llmprune.models.shards import CheckpointShards, ShardWriter, checkpoint_names, outside_layers, release
from llmprune.storage import free_memory, trim_heap


class LayerSource:
    """A model already in memory: nothing to load, release or write."""

    def load_outside(self, head: bool) -> None:
        """Make the parts outside the decoder layers ready: the embeddings, and with ``head`` the final
        norm and LM head too."""

    def release_outside(self) -> None:
        """The parts outside the decoder layers are not needed for now."""

    def load(self, index: int, layer: nn.Module) -> None:
        """Make decoder layer ``index`` ready to run."""

    def restore(self, index: int, layer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Decoder layer ``index`` was finished by an earlier, interrupted run: these are its weights."""
        layer.load_state_dict(weights, strict=True)

    def finish(self, index: int, layer: nn.Module) -> None:
        """Decoder layer ``index`` is done (pruned, its outputs computed)."""


class StreamedLayers(LayerSource):
    """A model on the meta device whose parts are read from checkpoint shards when needed and dropped
    after; with a ``writer``, each finished decoder layer is first written to the output's shards.

    Decoder layer i goes to output shard ``first_shard + i``.
    """

    def __init__(
        self,
        model: nn.Module,
        shards: CheckpointShards,
        device: torch.device,
        dtype: torch.dtype,
        writer: ShardWriter | None = None,
        first_shard: int = 1,
    ) -> None:
        self.model, self.shards, self.device, self.dtype = model, shards, device, dtype
        self.writer, self.first_shard = writer, first_shard
        self.layers_path, _ = decoder_layers(model)

    def load_outside(self, head: bool) -> None:
        names, tied = outside_layers(self.model, self.shards, head)
        self.shards.load_into(self.model, names, self.device, self.dtype)
        if tied:
            self.model.tie_weights()

    def release_outside(self) -> None:
        inside = f"{self.layers_path}."  # tied names count too: release frees every reference
        release(self.model, [name for name in checkpoint_names(self.model) if not name.startswith(inside)])

    def load(self, index: int, layer: nn.Module) -> None:
        prefix = f"{self.layers_path}.{index}."
        self.shards.load_into(layer, checkpoint_names(layer), self.device, self.dtype, prefix)

    def restore(self, index: int, layer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self._write(index, weights)

    def finish(self, index: int, layer: nn.Module) -> None:
        self._write(index, layer.state_dict())
        release(layer, checkpoint_names(layer))
        trim_heap()  # else each finished layer's freed pages stay counted in the resident memory

    def _write(self, index: int, state: dict[str, torch.Tensor]) -> None:
        if self.writer is not None:
            prefix = f"{self.layers_path}.{index}."
            self.writer.write(self.first_shard + index, {prefix + name: state[name] for name in state})


class SpilledBatches(Sequence[torch.Tensor]):
    """One generation of hidden states in files, one per batch, read back when indexed."""

    def __init__(self, paths: list[Path], device: torch.device) -> None:
        self.paths, self.device = paths, device

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return load_file(str(self.paths[index]), device=str(self.device))["hidden"]

    def delete(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


class ActivationStore:
    """Keeps each generation of hidden states in RAM, or in files once two generations exceed the budget."""

    def __init__(self, max_bytes: int | None = None, directory: str | Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.parent = Path(directory) if directory is not None else None
        self._directory: Path | None = None
        self._generation = 0
        self._current: SpilledBatches | None = None

    def start(self, hidden: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Take the first generation (layer 0's inputs); decide once whether to spill to disk."""
        size = sum(h.numel() * h.element_size() for h in hidden)
        if self.max_bytes is not None and 2 * size > self.max_bytes:
            self._directory = Path(tempfile.mkdtemp(prefix=".llmprune-activations-", dir=self.parent))
        return self.keep(iter(hidden))

    def keep(self, outputs: Iterable[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Store the next generation, produced one batch at a time; the previous one is then deleted."""
        if self._directory is None:
            return list(outputs)
        device = None
        paths = []
        self._generation += 1
        for number, tensor in enumerate(outputs):
            path = self._directory / f"g{self._generation}-b{number}.safetensors"
            save_file({"hidden": tensor.detach().to("cpu").contiguous()}, str(path))
            device = tensor.device
            paths.append(path)
        if self._current is not None:
            self._current.delete()
        self._current = SpilledBatches(paths, device or torch.device("cpu"))
        return self._current

    def close(self) -> None:
        """Delete any files on disk."""
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


def check_activation_memory(
    skeleton: nn.Module,
    samples: int,
    seqlen: int,
    dtype: torch.dtype,
    device: torch.device,
    max_bytes: int | None,
    headroom: float = 0.8,
) -> None:
    """Refuse, before loading, calibration activations that cannot be kept: two generations of hidden
    states (a layer's inputs and outputs) of ``samples`` × ``seqlen`` tokens on ``device``, unless
    ``max_bytes`` (``--max-memory``) sends them to disk."""
    if max_bytes is not None:
        return
    width = skeleton.get_input_embeddings().weight.shape[-1]
    needed = 2 * samples * seqlen * width * dtype.itemsize
    free = free_memory(device)
    if needed > headroom * free:
        raise UsageError(
            f"{samples} calibration samples of {seqlen} tokens keep {needed / 2**30:.1f} GiB of activations "
            f"(a decoder layer's inputs and outputs), more than the {free / 2**30:.1f} GiB free on {device}: "
            "use fewer --nsamples, or --max-memory (e.g. 4GiB) to keep them on disk"
        )

