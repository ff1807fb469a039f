"""Process-group setup for torchrun launches, carried as a small context object (no global parallel state).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we initialise one default group (NCCL on CUDA, gloo on CPU,
same code) with the configured timeout so a dead rank makes the others fail instead of hanging forever.
The parallel context (``attnres_train.parallel.mesh``) builds its DeviceMesh groups from this one.

Timeouts of the *other* groups: ``init_process_group(timeout=...)`` only sets the default group's timeout.
``new_group`` / ``split_group`` without an explicit timeout (which is how ``DeviceMesh`` creates its dp / tp
/ ep groups, where FSDP's all-gathers and reduce-scatters run) fall back to torch's module defaults
(``default_pg_timeout``: 30 min for gloo; 10 min for NCCL), so a hung rank would stall the others for 30
minutes despite ``trainer.dist_timeout_s``. :func:`init_distributed` therefore also sets those defaults, so
every group created afterwards gets the configured timeout (checked by tests/train/test_faults.py with a
SIGSTOP'd rank).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Optional[object] = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier(group=self.group)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.is_distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def broadcast_object(self, obj):
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from ..config.errors import ConfigError

            raise ConfigError("trainer.device", "cuda requested but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the default of every process group created from now on (see the module docstring)."""
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timeout


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistContext:
    """Initialise from torchrun's environment if present; a plain single-process context otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        set_default_group_timeout(timeout)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=dev if dev.type == "cuda" else None)
    group = dist.group.WORLD if world > 1 else None
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, group=group)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
