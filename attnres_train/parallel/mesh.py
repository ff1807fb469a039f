"""The parallel context: one validated object holding every DeviceMesh / process group of a run.

Why one object, passed around and never global: every parallel function gets the same meshes, and a single
process needs no process group (every collective is then a no-op). :func:`build_parallel_context` validates the
layout (``config.parallel.resolve_parallel_dims``) and cuts every mesh from one world mesh (FSDP2 needs a shared
root to compose with TP / EP DTensors); the command line calls it once after :func:`init_process_group`.
docs/parallel.md, "The mesh", has the dims and the groups.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d  # the module holding the process-group defaults
from torch.distributed.device_mesh import init_device_mesh

from ..config.errors import ConfigError
from ..config.parallel import ParallelConfig, ParallelDims, resolve_parallel_dims

DENSE_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
SPARSE_DIMS = ("pp", "edp_replicate", "edp_shard", "ep", "tp")
#: dp (flattened), dp_replicate, dp_shard, tp, pp, fsdp (2-D dp_replicate x dp_shard); with tp > 1 dp_tp
#: (flattened dp_replicate x dp_shard x tp); with ep > 1 also
#: ep, edp_replicate, edp_shard and edp (2-D edp_replicate x edp_shard).
MESH_NAMES = ("pp", "dp", "dp_replicate", "dp_shard", "tp", "fsdp", "dp_tp", "ep", "edp_replicate", "edp_shard", "edp")


@dataclass
class ParallelContext:
    """Ranks, device, meshes and the few collectives the train loop needs. Passed around; never global."""

    dims: ParallelDims
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world_mesh: Optional[object] = None
    dense_mesh: Optional[object] = None
    sparse_mesh: Optional[object] = None
    #: every named sub-mesh (:data:`MESH_NAMES`), built once in :func:`build_parallel_context`
    meshes: Dict[str, object] = field(default_factory=dict)

    # -- sizes / ranks ------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_distributed(self) -> bool:
        return self.dims.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Number of data-parallel ranks = number of distinct batch slices."""
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        """Which batch slice this rank reads (equal on all tp ranks of a replica)."""
        return self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0

    @property
    def tp_rank(self) -> int:
        return self.tp_mesh.get_local_rank() if self.tp_mesh is not None else 0

    # -- meshes (1-D unless noted; None on a single process) ------------------------------------------------
    def mesh(self, name: str):
        """A named mesh from :data:`MESH_NAMES` (None on a single process or when ep == 1 for expert meshes)."""
        return self.meshes.get(name)

    @property
    def dp_mesh(self):
        """Flattened data-parallel mesh ``dp_replicate x dp_shard``."""
        return self.meshes.get("dp")

    @property
    def dp_replicate_mesh(self):
        return self.meshes.get("dp_replicate")

    @property
    def dp_shard_mesh(self):
        return self.meshes.get("dp_shard")

    @property
    def tp_mesh(self):
        return self.meshes.get("tp")

    @property
    def fsdp_mesh(self):
        """Mesh for ``fully_shard`` of dense params: 2-D ``(dp_replicate, dp_shard)`` (HSDP; a size-1 replicate
        dim is plain FSDP)."""
        return self.meshes.get("fsdp")

    @property
    def ep_mesh(self):
        return self.meshes.get("ep")

    @property
    def expert_dp_mesh(self):
        """2-D ``(edp_replicate, edp_shard)`` mesh over which each expert shard is replicated / FSDP-sharded."""
        return self.meshes.get("edp")

    @property
    def dp_group(self):
        return self.dp_mesh.get_group() if self.dp_mesh is not None else None

    @property
    def tp_group(self):
        return self.tp_mesh.get_group() if self.tp_mesh is not None else None

    @property
    def ep_group(self):
        return self.ep_mesh.get_group() if self.ep_mesh is not None else None

    # -- collectives ----------------------------------------------------------------------------------------
    def all_reduce_dp_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """SUM over the data-parallel ranks (in place). Router loads, token counts, loss sums."""
        if self.dims.dp > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def all_reduce_router_loads_(self, t: torch.Tensor) -> torch.Tensor:
        """SUM of per-rank MoE routing counts into global counts: over dp, and also over tp with sequence
        parallelism (each tp rank then routes only its own sequence shard; without SP all tp ranks of a
        replica route the same tokens and must be counted once)."""
        if self.dims.sp and self.dims.tp > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.meshes["dp_tp"].get_group())
            return t
        return self.all_reduce_dp_sum_(t)

    def all_reduce_dp_mean_(self, t: torch.Tensor) -> torch.Tensor:
        self.all_reduce_dp_sum_(t)
        return t.div_(self.dims.dp)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """SUM over the whole world (prefer the dp variants)."""
        if self.is_distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.is_distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def broadcast_object(self, obj):
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def describe(self) -> str:
        return f"{self.world_size} rank(s) on {self.device}: {self.dims.describe()}"


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The run's compute dtype from ``trainer.precision``: bf16 when 'bf16', or 'auto' on a CUDA device that
    supports it; None (fp32) otherwise. The one rule for autocast and FSDP's ``param_dtype``."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``trainer.device`` ('auto', 'cuda', 'cpu') -> this process's device (CUDA: ``cuda:<local_rank>``, made current)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", "cuda requested but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the default of every process group created from now on.

    ``init_process_group(timeout=...)`` sets only the default group's; ``DeviceMesh``'s dp / tp / ep groups
    (where FSDP's collectives run) would otherwise get torch's module defaults (30 min gloo, 10 min NCCL), so a
    hung rank would stall the others far longer than ``trainer.dist_timeout_s`` (tests/train/test_faults.py).
    """
    c10d.default_pg_timeout = timeout
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timeout


def init_process_group(device: str = "auto", timeout_s: int = 600) -> Tuple[int, torch.device]:
    """The default process group from torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA,
    gloo on CPU, ``timeout_s`` for every group), if the world has more than one rank. Returns (world size,
    this process's device): what :func:`build_parallel_context` needs next."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        set_default_group_timeout(timeout)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return world, dev


def shutdown_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device_type)


def build_parallel_context(
    cfg: ParallelConfig,
    model_cfg=None,
    seq_len: Optional[int] = None,
    world_size: Optional[int] = None,
    device_type: str = "cpu",
    *,
    rank: Optional[int] = None,
    local_rank: Optional[int] = None,
) -> ParallelContext:
    """Validate the layout, then build every mesh. Needs an initialised default process group if world > 1.

    ``world_size`` / ``rank`` default to the default group's (or torchrun's environment, or 1 / 0).
    """
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = dist.get_rank() if initialized else int(os.environ.get("RANK", "0"))
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dims = resolve_parallel_dims(cfg, world_size, model_cfg=model_cfg, seq_len=seq_len)
    device = _device(device_type, local_rank)
    ctx = ParallelContext(dims=dims, rank=rank, local_rank=local_rank, device=device)
    if world_size == 1:
        return ctx
    if not initialized:
        raise RuntimeError(
            "build_parallel_context with world_size > 1 needs torch.distributed.init_process_group "
            "first (attnres_train.parallel.mesh.init_process_group does it under torchrun)"
        )
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"world_size={world_size} but the default process group has {dist.get_world_size()}")

    world = init_device_mesh(device_type, (world_size,), mesh_dim_names=("world",))
    dense = world._unflatten(0, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp), DENSE_DIMS)
    m = {name: dense[name] for name in DENSE_DIMS}
    m["fsdp"] = dense[("dp_replicate", "dp_shard")]
    m["dp"] = m["fsdp"]._flatten("dp")
    if dims.tp > 1:  # every rank of one pipeline stage: router loads under SP (tp ranks route different tokens)
        m["dp_tp"] = dense[("dp_replicate", "dp_shard", "tp")]._flatten("dp_tp")
    if dims.ep > 1:
        sparse = world._unflatten(0, (dims.pp, dims.edp_replicate, dims.edp_shard, dims.ep, dims.tp), SPARSE_DIMS)
        for name in ("ep", "edp_replicate", "edp_shard"):
            m[name] = sparse[name]
        m["edp"] = sparse[("edp_replicate", "edp_shard")]
        ctx.sparse_mesh = sparse
    ctx.world_mesh, ctx.dense_mesh, ctx.meshes = world, dense, m
    return ctx


def single_process_context(device: Optional[torch.device] = None) -> ParallelContext:
    """The trivial context (world size 1): what the trainer uses without torchrun."""
    dims = resolve_parallel_dims(ParallelConfig(), 1)
    return ParallelContext(dims=dims, device=device or torch.device("cpu"))
