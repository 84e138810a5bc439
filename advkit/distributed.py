"""This process's place among the processes of a ``torchrun`` launch: the one helper for
data-parallel training and for evaluation sharded by sample.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), a process joins the process group (gloo
on CPU, NCCL on GPU); otherwise it is rank 0 of 1 and every method below is a no-op
or the identity, so callers write one code path for both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class World:
    """Rank and size of this process in the process group (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def join(cls, device: str | torch.device) -> World:
        """Join the group ``torchrun`` describes in the environment, with the backend that
        suits ``device``; a group already set up (by the caller) is used as it is."""
        if not dist.is_available():
            return cls()
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return cls()
            dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @staticmethod
    def leave() -> None:
        """Wait for every process, then take the group down. A process that exits with the
        group still up can abort in gloo's threads ("terminate called without an active
        exception") when its peer has already gone: the command that owns the process
        calls this before it exits."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @property
    def on(self) -> bool:
        """More than one process."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def shard(self, batch: Tensor) -> Tensor:
        """This process's contiguous share of ``batch`` (the shares differ by at most one)."""
        return batch.tensor_split(self.size)[self.rank]

    def wrap(self, model: nn.Module, device: str | torch.device) -> nn.Module:
        """``model`` in DistributedDataParallel (gradients averaged over processes)."""
        if not self.on:
            return model
        ids = [torch.device(device)] if torch.device(device).type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes (in float64)."""
        if not self.on:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def gather(self, item: object) -> list[object]:
        """``item`` of every process, in rank order."""
        if not self.on:
            return [item]
        items: list[object] = [None] * self.size
        dist.all_gather_object(items, item)
        return items

    def from_root(self, make: Callable[[], object]) -> object:
        """``make()`` run on rank 0, its result on every rank."""
        box = [make() if self.main else None]
        if self.on:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every process."""
        if self.on:
            dist.barrier()
