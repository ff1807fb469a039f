"""AttnRes depth mixing on tensor-parallel DTensors, computed on each rank's local shard.

Why: the mixing is per token, so a rank's shard of the residual stream (``Shard(1)`` under SP, ``Replicate()``
without) holds everything its tokens need. DTensor ops would force the autograd reference, which saves fp32
copies of every source; here the fused paths (``depth_ops`` / the Triton kernels) run on the local tensors and
their outputs become DTensors with the sources' placements again. A replicated query's gradient from sharded
tokens is a partial sum over the mesh (marked ``Partial``; the parameter's gradient hook or FSDP2 sums it).
docs/tensor_parallel.md "Data flow".
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributed.tensor import DTensor, Partial

__all__ = ["is_dtensor", "local", "local_query", "like"]


def is_dtensor(x: Optional[torch.Tensor]) -> bool:
    return isinstance(x, DTensor)


def local(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's shard of an activation (its gradient keeps the DTensor's placements); plain tensors as is."""
    return x.to_local() if isinstance(x, DTensor) else x


def local_query(q: torch.Tensor, source: DTensor) -> torch.Tensor:
    """A replicated query (or stack of queries) as a local tensor for mixing ``source``'s shard.

    Where ``source`` is sharded (over tokens), this rank's gradient of the query is a partial sum: ``Partial``.
    """
    if not isinstance(q, DTensor):
        raise TypeError("AttnRes queries must be DTensors when the residual stream is (tensor parallelism)")
    if q.device_mesh != source.device_mesh or not all(p.is_replicate() for p in q.placements):
        raise ValueError(f"AttnRes query placements {q.placements}: expected Replicate on the activations' mesh")
    if any(p.is_shard() and p.dim % source.ndim == source.ndim - 1 for p in source.placements):
        raise ValueError(f"AttnRes sources {source.placements}: the hidden dim must not be sharded (per-token math)")
    return q.to_local(grad_placements=[Partial() if p.is_shard() else p for p in source.placements])


def like(y: torch.Tensor, source: DTensor) -> DTensor:
    """A local result over ``source``'s tokens (``[B, T, d]`` or ``[B, T]``) as a DTensor with its placements."""
    if any(p.is_shard() and p.dim >= y.ndim for p in source.placements):
        raise ValueError(f"cannot place a {y.ndim}-D result like {source.placements}")
    return DTensor.from_local(y, source.device_mesh, source.placements, run_check=False)
