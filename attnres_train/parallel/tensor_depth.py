"""AttnRes depth mixing on tensor-parallel DTensors, computed on each rank's local shard.

Why: the mixing is per token, so a rank's shard of the residual stream (``Shard(1)`` under SP, ``Replicate()``
without) holds everything its tokens need. DTensor ops would force the autograd reference, which saves fp32
copies of every source; :class:`ShardedDepthViews` (substituted for the model's ``DepthViews`` seams by
``apply_tensor_parallel``) lets the fused paths (``depth_ops`` / the Triton kernels) run on the local tensors and
places their outputs like the sources again. A replicated query's gradient from sharded tokens is a partial sum
over the mesh (marked ``Partial``; the parameter's gradient hook or FSDP2 sums it). docs/tensor_parallel.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from ..model.depth import DepthViews

__all__ = ["ShardedDepthViews", "substitute_depth_views"]


class ShardedDepthViews(DepthViews):
    """The depth-mixing seam under tensor parallelism: DTensor sources are mixed on their local shards."""

    def sharded(self, x: torch.Tensor) -> bool:
        return isinstance(x, DTensor)

    def local(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """This rank's shard of an activation (its gradient keeps the DTensor's placements); plain tensors as is."""
        return x.to_local() if isinstance(x, DTensor) else x

    def local_query(self, q: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """A replicated query (or stack of queries) as a local tensor for mixing ``source``'s shard.

        Where ``source`` is sharded (over tokens), this rank's gradient of the query is a partial sum: ``Partial``.
        """
        if not isinstance(source, DTensor):
            return q
        if not isinstance(q, DTensor):
            raise TypeError("AttnRes queries must be DTensors when the residual stream is (tensor parallelism)")
        if q.device_mesh != source.device_mesh or not all(p.is_replicate() for p in q.placements):
            raise ValueError(f"AttnRes query placements {q.placements}: expected Replicate on the activations' mesh")
        if any(p.is_shard() and p.dim % source.ndim == source.ndim - 1 for p in source.placements):
            raise ValueError(
                f"AttnRes sources {source.placements}: the hidden dim must not be sharded (per-token math)"
            )
        return q.to_local(grad_placements=[Partial() if p.is_shard() else p for p in source.placements])

    def like(self, y: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """A local result over ``source``'s tokens (``[B, T, d]`` or ``[B, T]``) as a DTensor with its placements."""
        if not isinstance(source, DTensor):
            return y
        if any(p.is_shard() and p.dim >= y.ndim for p in source.placements):
            raise ValueError(f"cannot place a {y.ndim}-D result like {source.placements}")
        return DTensor.from_local(y, source.device_mesh, source.placements, run_check=False)


def substitute_depth_views(model: nn.Module) -> int:
    """Replace every plain ``DepthViews`` child under ``model`` by a :class:`ShardedDepthViews`; returns how many."""
    count = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if type(child) is DepthViews:
                setattr(owner, name, ShardedDepthViews())
                count += 1
    return count
