"""Writing a sharded Hugging Face checkpoint one part at a time, as the streaming pipeline finishes parts.

Shard k of N is ``model-0000k-of-0000N.safetensors``; ``finish`` writes ``model.safetensors.index.json``
(the weight map ``from_pretrained`` follows). The directory is a staging directory that the caller renames
into place only when everything is written (see ``export/save.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmprune.models.shards import INDEX_FILE


class ShardWriter:
    """Writes shards ``1..total`` of a checkpoint into ``directory``, in any order, then the index."""

    def __init__(self, directory: str | Path, total: int) -> None:
        self.directory = Path(directory)
        self.total = total
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.total:05d}.safetensors"

    def write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard ``number`` (1-based) holding ``tensors`` by their checkpoint names."""
        if not 1 <= number <= self.total:
            raise ValueError(f"shard {number} outside 1..{self.total}")
        name = self.shard_name(number)
        cpu = {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
        save_file(cpu, str(self.directory / name), metadata={"format": "pt"})
        for key, tensor in cpu.items():
            self.weight_map[key] = name
            self.total_size += tensor.numel() * tensor.element_size()

    def finish(self) -> None:
        """Write the index; every shard must have been written."""
        written = set(self.weight_map.values())
        missing = [self.shard_name(k) for k in range(1, self.total + 1) if self.shard_name(k) not in written]
        if missing:
            raise RuntimeError(f"shards never written: {', '.join(missing)}")
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
