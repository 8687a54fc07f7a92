"""Many processes started by torchrun: PyTorch's own distributed engine, gloo on the CPU and nccl on GPUs.

`join` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process group;
without it, everything runs as one process and the helpers here do nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .device import resolve_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that evaluates, logs and saves."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous part of n items (sizes differ by at most one)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join(device_name: str = "auto") -> tuple[World, torch.device]:
    """This process's place in the run and its device (cuda:LOCAL_RANK on GPUs); one process without torchrun."""
    device = resolve_device(device_name)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), device


def gather_rows(x: torch.Tensor, world: World, total: int) -> torch.Tensor:
    """Every process's rows of `x` (its `world.shard(total)`), in rank order, keeping the autograd graph: each
    process then scores the whole global batch, and the gradient flows back to the rows that made it."""
    if world.size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    largest = total // world.size + (total % world.size > 0)
    padded = torch.nn.functional.pad(x, (0,) * (2 * (x.dim() - 1)) + (0, largest - len(x)))
    parts = all_gather(padded)
    sizes = [World(r, world.size).shard(total) for r in range(world.size)]
    return torch.cat([part[: s.stop - s.start] for part, s in zip(parts, sizes)])
