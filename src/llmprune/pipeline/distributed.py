"""Pruning across processes (``torchrun``): who holds which calibration rows, and the two collectives needed.

Every process holds the whole model and a contiguous share of the calibration batches (the batches are
formed first, so that they are the same for any number of processes). Per-layer statistics are sums over
tokens, kept in float64 (``statistics.py``), so summing them over processes (all-reduce) gives every process
the statistics of all batches, to the bit; each group of linear layers is then solved by one process and its
weights broadcast to the others.
A single process uses ``Communicator`` itself, whose collectives do nothing.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from llmprune.errors import UsageError

# Rank 0 measures dense perplexity before pruning while the others already wait in the first collective.
TIMEOUT = timedelta(minutes=60)


class Communicator:
    """One process: rank 0 of 1; collectives leave their tensors as they are."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        """The device this process computes on."""

    def share(self, batches: int, samples: int) -> slice:
        """This process's contiguous share of the ``batches`` calibration batches (of ``samples`` samples in
        all): whole batches, whose counts differ by at most one between processes.

        Batches are formed before they are shared, so that every batch holds the same samples, and gives the
        same statistics to the last bit, whatever the number of processes.
        """
        if self.world_size > batches:
            if self.world_size > samples:
                raise UsageError(
                    f"{self.world_size} processes need at least as many calibration samples, got {samples}"
                )
            raise UsageError(
                f"{self.world_size} processes need at least as many calibration batches, got {batches} "
                f"from {samples} samples: use --batch-size {samples // self.world_size} or smaller"
            )
        return slice(self.rank * batches // self.world_size, (self.rank + 1) * batches // self.world_size)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over processes, in place."""

    def broadcast(self, tensor: torch.Tensor, source: int) -> None:
        """Overwrite ``tensor`` with process ``source``'s, in place."""

    def close(self) -> None:
        """Release what the communicator set up."""


class TorchDistributed(Communicator):
    """The processes of an initialised ``torch.distributed`` default group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, device: torch.device, owns_group: bool = False) -> None:
        import torch.distributed as dist

        super().__init__(device)
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._owns_group = owns_group

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)

    def broadcast(self, tensor: torch.Tensor, source: int) -> None:
        if tensor.is_contiguous():
            self._dist.broadcast(tensor, src=source)
        else:
            buffer = tensor.contiguous()
            self._dist.broadcast(buffer, src=source)
            tensor.copy_(buffer)

    def close(self) -> None:
        if self._owns_group and self._dist.is_initialized():
            self._dist.destroy_process_group()
        self._owns_group = False


def communicator_from_environment(device: torch.device) -> Communicator:
    """The communicator of this process: joins ``torchrun``'s processes when ``WORLD_SIZE`` > 1.

    Uses an already initialised default group as it is (and leaves it open). Otherwise initialises one from
    torchrun's environment variables, gloo on CPU or NCCL on CUDA, where an unnumbered ``cuda`` device
    becomes ``cuda:LOCAL_RANK``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return TorchDistributed(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Communicator(device)
    if not dist.is_available():
        raise UsageError("WORLD_SIZE > 1 but this build of PyTorch has no torch.distributed")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo", timeout=TIMEOUT)
    else:
        raise UsageError(f"pruning across processes needs a CPU or CUDA device, not {device.type}")
    return TorchDistributed(device, owns_group=True)
