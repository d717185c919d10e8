"""DistributedDataParallel under torchrun: one process per device, rank 0 alone writes files.

`torchrun --nproc_per_node=N -m kdtool distill ...` starts N copies of the Hydra app. Each joins
the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*),
trains on its own share of the batches, and reduces metrics; only the student (and any adaptor
modules) is wrapped in DistributedDataParallel, never the frozen teacher.

Hydra's side (one run folder, .hydra/ and the log from rank 0 only) is in configs/base.yaml;
the other ranks take rank 0's output_dir from `shared_output_dir`.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("kdtool")


@dataclass(frozen=True)
class Replicas:
    """This process's place among the ranks of a torchrun job (one rank, world size 1, without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module DistributedDataParallel averages the gradients of (itself when not distributed)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum a tensor of counts over the ranks."""
        if self.enabled:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return totals

    def sync_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (batch-norm statistics), so that all evaluate one model."""
        if self.enabled:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def replicas() -> Replicas:
    """This process's ranks, from the process group when there is one."""
    if dist.is_available() and dist.is_initialized():
        return Replicas(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Replicas()


def init(device: torch.device) -> tuple[Replicas, torch.device]:
    """Join torchrun's process group once per process (gloo on CPUs, nccl on GPUs); this rank's device."""
    if not launched_by_torchrun():
        return Replicas(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        atexit.register(_shutdown)
    ranks = replicas()
    if not ranks.is_main:
        # one copy of every line: rank 0 logs, the others only say what went wrong
        logging.getLogger("kdtool").setLevel(logging.ERROR)
    return ranks, device


def shared_output_dir(path: str, device: torch.device) -> str:
    """Rank 0's output_dir on every rank (the other ranks' Hydra run folder is a scratch folder)."""
    if not launched_by_torchrun():
        return path
    ranks, _ = init(device)
    return ranks.broadcast(path)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
