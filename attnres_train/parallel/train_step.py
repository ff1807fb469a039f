"""What one training step needs from the parallel engine, independent of the loop that calls it.

The data-parallel split (:func:`local_batch`), microbatch loss weights that make the summed gradient that of
the global mean token loss (:func:`loss_weights`), the total gradient norm and clipping over every shard of
every mesh (:func:`clip_grad_norm_`), and the MoE router loads summed over the data-parallel ranks so every
replica applies the same bias update (:func:`update_router_biases`). docs/parallel.md, "What one step needs".
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..model.lm_loss import IGNORE_INDEX

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment]


# -- data split / loss normalisation ----------------------------------------------------------------------
def local_batch(global_batch: torch.Tensor, pctx) -> torch.Tensor:
    """Rows ``[dp_rank * b, (dp_rank + 1) * b)`` of a ``[B, ...]`` global batch, ``b = B / dp_size``."""
    dp, r = pctx.dp_size, pctx.dp_rank
    if global_batch.shape[0] % dp:
        raise ValueError(f"global batch of {global_batch.shape[0]} rows does not split over {dp} dp ranks")
    b = global_batch.shape[0] // dp
    return global_batch[r * b : (r + 1) * b]


def loss_weights(labels: Sequence[torch.Tensor], pctx, ignore_index: int = IGNORE_INDEX) -> List[float]:
    """Weights ``w_i`` for microbatch mean losses so that ``sum_i w_i * loss_i`` (then averaged over dp by the
    gradient reduction) is the global mean token loss. One all-reduce over dp."""
    counts = torch.tensor([float((y != ignore_index).sum()) for y in labels], dtype=torch.float64)
    total = counts.sum().reshape(1).to(pctx.device)
    pctx.all_reduce_dp_sum_(total)
    total = float(total.item())
    if total == 0:
        return [0.0 for _ in labels]
    return [float(c) * pctx.dp_size / total for c in counts]


# -- gradient norm / clipping -----------------------------------------------------------------------------
def _mesh_key(t: torch.Tensor):
    if isinstance(t, DTensor):
        return (id(t.device_mesh), tuple(t.placements))
    return None


def grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0, reduce_group=None) -> torch.Tensor:
    """Total ``norm_type`` norm of all gradients, over every shard (collective over each DTensor mesh).

    Gradients are grouped by (mesh, placements); each group's norm is one ``DTensor`` reduction
    (``full_tensor`` of a partial norm), so sharded dims are summed and replicated dims counted once.
    ``reduce_group``: a process group whose ranks hold *disjoint* parameters (pipeline stages); their norms
    are combined (sum of ``norm**p``, or max) with one all-reduce. Every rank of it must call this.
    Returns a plain fp32-or-wider scalar tensor, identical on every rank.
    """
    # Insertion order = first appearance in ``params``, identical on every rank (the collectives must match;
    # never sort by the mesh's id(), which differs between processes).
    groups: Dict[object, List[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(_mesh_key(p.grad), []).append(p.grad)
    norm_type = float(norm_type)
    parts = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, norm_type, foreach=None)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        parts.append(n.to(torch.promote_types(n.dtype, torch.float32)))
    if not parts:
        total = torch.zeros(())
    elif len(parts) == 1:
        total = parts[0]
    else:
        dev = parts[0].device
        stacked = torch.stack([x.to(dev) for x in parts])
        total = stacked.max() if norm_type == float("inf") else torch.linalg.vector_norm(stacked, norm_type)
    if reduce_group is not None and dist.get_world_size(reduce_group) > 1:
        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(reduce_group) == "nccl"
            else torch.device("cpu")
        )
        t = total.detach().to(dev, torch.float64)
        if norm_type == float("inf"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=reduce_group)
            total = t
        else:
            t = t.pow(norm_type)
            dist.all_reduce(t, group=reduce_group)
            total = t.pow(1.0 / norm_type)
    return total


def clip_grad_norm_(
    params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0, reduce_group=None
) -> torch.Tensor:
    """DTensor-aware ``clip_grad_norm_``: returns the total norm before clipping; clips if ``max_norm > 0``.

    Scale factor ``min(1, max_norm / (norm + 1e-6))``, as torch's. ``reduce_group``: see :func:`grad_norm`.
    """
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params, norm_type, reduce_group)
    if max_norm > 0:
        coef = float(max_norm) / (float(total) + 1e-6)
        if coef < 1.0:
            by_key: Dict[object, List[torch.Tensor]] = defaultdict(list)
            for p in params:
                by_key[_mesh_key(p.grad)].append(p.grad)
            for grads in by_key.values():
                torch._foreach_mul_(grads, coef)
    return total


# -- router load balancing ----------------------------------------------------------------------------------
@torch.no_grad()
def reduce_router_loads_(model: nn.Module, pctx) -> Optional[torch.Tensor]:
    """Sum every MoE layer's ``tokens_per_expert`` into global counts, in place (one all-reduce over dp, or
    dp x tp with sequence parallelism).

    Returns the ``[num_moe_layers, E]`` global counts, or None if the model has no MoE layer.
    """
    moes = model.moe_layers()
    if not moes:
        return None
    counts = torch.stack([m.tokens_per_expert for m in moes])
    pctx.all_reduce_router_loads_(counts)
    for m, c in zip(moes, counts):
        m.tokens_per_expert.copy_(c)
    return counts


@torch.no_grad()
def update_router_biases(model: nn.Module, pctx) -> Dict[str, float]:
    """Global loads (dp all-reduce), then every MoE layer's aux-loss-free bias step. Returns imbalance metrics
    (max/mean load, averaged and max over layers)."""
    counts = reduce_router_loads_(model, pctx)
    if counts is None:
        return {}
    ratios: List[float] = []
    for m, c in zip(model.moe_layers(), counts):
        ratios.append(float(c.max() / c.mean().clamp_min(1e-9)) if c.sum() > 0 else 0.0)
        m.update_bias()
    return {"expert_imbalance_mean": sum(ratios) / len(ratios), "expert_imbalance_max": max(ratios)}
