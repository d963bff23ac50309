"""A checkpoint's safetensors shards, read and written a module at a time, so a model never has to fit in
memory.

Reading: ``streaming_skeleton`` builds the model with every parameter on the meta device (buffers such as
rotary frequencies are real). Parts are then read when needed with ``CheckpointShards.load_into`` (a
decoder layer, or the embeddings) and dropped again with ``release``. Each tensor is read from its shard
opened memory-mapped and closed again, so pages of the checkpoint do not stay mapped (and counted as
resident).

Writing: ``ShardWriter`` writes shard k of N (``model-0000k-of-0000N.safetensors``) as the streaming
pipeline finishes parts, then the index ``model.safetensors.index.json`` (``write_index``: the weight map
``from_pretrained`` follows). It writes into a staging directory that is renamed into place only when
everything is written (``storage.staged_directory``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llmprune.errors import UsageError
from llmprune.models.architecture import decoder_layers, describe

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _index_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{index} is not a valid safetensors index (no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise UsageError(f"{index} is not a valid safetensors index (weight_map is not names to files)")
    return weight_map


MAX_HEADER_BYTES = 100 * 2**20
"""The largest safetensors header the safetensors library reads."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files written with ``torch.save`` (pickle), which can run code when loaded."""
CONVERT_HINT = (
    "convert them to safetensors in a trusted environment: "
    "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
)


def safetensors_names(path: Path) -> list[str]:
    """The tensor names of the safetensors file ``path``, failing in one line if the file is not whole: its
    header is read and the data size it describes compared with the file's (no tensor is read)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
            raise UsageError(f"{path} is truncated or not a safetensors file ({size} bytes, no whole header)")
        try:
            header = json.loads(handle.read(length))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
            expected = 8 + length + max(ends, default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise UsageError(f"{path} is damaged: its safetensors header is not valid") from None
    if size != expected:
        raise UsageError(
            f"{path} is truncated or damaged: {size} bytes, its safetensors header describes {expected}"
        )
    return [name for name in header if name != "__metadata__"]


def check_shards(directory: Path, weight_map: dict[str, str] | None = None) -> None:
    """Fail in one line, naming the file, if a checkpoint's safetensors weights are missing, truncated or
    damaged, or lack a tensor their index lists. Reads file headers only. Without ``weight_map``, that of
    the directory's index, or its single ``model.safetensors``; nothing to check if it has neither."""
    if weight_map is None:
        if (directory / INDEX_FILE).is_file():
            weight_map = _index_weight_map(directory / INDEX_FILE)
        elif (directory / SINGLE_FILE).is_file():
            safetensors_names(directory / SINGLE_FILE)
            return
        else:
            return
    missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
    if missing:
        raise UsageError(f"{directory}: shard files listed in {INDEX_FILE} are missing: {', '.join(missing)}")
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        files.setdefault(file, []).append(name)
    for file, names in files.items():
        stored = set(safetensors_names(directory / file))
        absent = [name for name in names if name not in stored]
        if absent:
            raise UsageError(f"{directory / file} lacks tensor {absent[0]}, which {INDEX_FILE} places there")


def check_weights(directory: Path) -> None:
    """Fail in one line unless ``directory`` holds whole safetensors weights (``check_shards``); pickle
    weights (``pytorch_model.bin``, ``*.pt``...) are refused, with how to convert them."""
    if (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file():
        check_shards(directory)
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        more = f" and {len(pickles) - 1} more" if len(pickles) > 1 else ""
        raise UsageError(
            f"{directory} holds only pickle weights ({pickles[0]}{more}), which llmprune does not load; "
            + CONVERT_HINT
        )
    raise UsageError(f"{directory} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")


class CheckpointShards:
    """The tensors of a local Hugging Face checkpoint, by name, across its safetensors shards."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = _index_weight_map(index)
        elif (self.directory / SINGLE_FILE).is_file():
            safetensors_names(self.directory / SINGLE_FILE)  # a truncated file fails in one line
            with safe_open(str(self.directory / SINGLE_FILE), framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            check_weights(self.directory)  # raises: pickle weights, or none
        check_shards(self.directory, weight_map)
        self.weight_map: dict[str, str] = weight_map

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names starting with ``prefix``, in checkpoint order."""
        return [name for name in self.weight_map if name.startswith(prefix)]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor. Its shard is opened memory-mapped and closed again, so the mapped pages do not
        stay resident (and counted in the process's RSS) once the tensor is copied out."""
        if name not in self.weight_map:
            raise UsageError(f"{self.directory}: checkpoint has no tensor {name}")
        with safe_open(str(self.directory / self.weight_map[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def load_into(
        self,
        module: nn.Module,
        names: list[str],
        device: torch.device,
        dtype: torch.dtype,
        prefix: str = "",
    ) -> None:
        """Materialise the named parameters and buffers of ``module`` from the tensors ``prefix + name``,
        one at a time; floating-point ones are cast to ``dtype``."""
        from accelerate.utils import set_module_tensor_to_device

        absent = [prefix + name for name in names if prefix + name not in self.weight_map]
        if absent:
            raise UsageError(
                f"{self.directory}: checkpoint has no tensor {absent[0]} (its names differ from the model's; "
                "load it without --offload)"
            )
        for name in names:
            value = self.read(prefix + name)
            set_module_tensor_to_device(
                module, name, device, value=value, dtype=dtype if value.is_floating_point() else None
            )


def checkpoint_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of the parameters and persistent buffers of ``module`` (what a checkpoint holds), tied
    duplicates included, each prefixed with ``prefix``."""
    persistent = set(module.state_dict(keep_vars=True))
    named = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    named += [name for name, _ in module.named_buffers()]
    return [prefix + name for name in named if name in persistent]


def release(model: nn.Module, names: list[str]) -> None:
    """Put the named parameters back on the meta device: their memory is freed, their shapes remain."""
    from accelerate.utils import set_module_tensor_to_device

    parameters = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        if name in parameters:
            set_module_tensor_to_device(model, name, "meta")


def streaming_skeleton(directory: str | Path, dtype: torch.dtype) -> tuple[nn.Module, CheckpointShards]:
    """The model with every parameter on the meta device (buffers such as rotary frequencies are real),
    and the shards to read its weights from, a part at a time."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    shards = CheckpointShards(directory)
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), shards


def outside_layers(model: nn.Module, shards: CheckpointShards, head: bool) -> tuple[list[str], bool]:
    """What to read for the parts outside the decoder layers: checkpoint names, and whether the LM head
    is tied to the embeddings (it then has no tensor of its own and is tied after reading).

    Without ``head`` the final norm and an untied LM head are left out: running up to the decoder layers
    (capturing their inputs) needs only the embeddings.
    """
    layers_path, _ = decoder_layers(model)
    final_norm = describe(model).final_norm
    output = model.get_output_embeddings()
    head_names = {f"{name}." for name, module in model.named_modules() if module is output and name}
    if final_norm:
        head_names.add(f"{final_norm}.")
    names, tied, declared = [], False, tied_names(model)
    for name in checkpoint_names(model):
        if name.startswith(f"{layers_path}."):
            continue
        if name not in shards.weight_map and name in declared:
            tied = True
            continue
        if not head and any(name.startswith(prefix) for prefix in head_names):
            continue
        names.append(name)
    return names, tied


def tied_names(model: nn.Module) -> set[str]:
    """Names of the parameters ``model`` ties to another one (an LM head sharing the embeddings' tensor), as
    its config and class declare them: a checkpoint need not hold a tensor for them, and after loading the
    others ``model.tie_weights()`` shares them again. Declared, not found by tensor identity, so the answer
    does not change while parts are on the meta device or released."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or {})


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json``: which shard file holds each tensor, and their total bytes."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(directory) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


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
        write_index(self.directory, self.weight_map, self.total_size)
