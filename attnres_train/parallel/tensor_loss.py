"""The vocab-parallel LM loss module that tensor parallelism substitutes for the model's ``lm_loss`` child.

Why a module: the model computes its loss through the ``lm_loss`` child (``model.lm_loss.LMLoss``); TP puts
this subclass in its place (``model.lm_loss = VocabParallelLMLoss(...)``), so the model's forward is unchanged
and no method is patched. It never gathers the ``[tokens, vocab]`` logits (``tp_ops``; docs/tensor_parallel.md).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Shard

from ..model.lm_loss import LMLoss, fused_linear_cross_entropy, token_cross_entropy
from .tensor_regions import enter_region
from .tp_ops import vocab_parallel_cross_entropy, vocab_parallel_fused_cross_entropy

__all__ = ["VocabParallelLMLoss"]


class VocabParallelLMLoss(LMLoss):
    """``model.lm_loss`` for the column-parallel (vocab-sharded) LM head on ``tp_mesh``.

    ``forward(logits, labels)``: logits a DTensor ``Shard(-1)``; ``fused(hidden, weight, labels, chunk)``: the
    head weight a ``Shard(0)`` DTensor. The head module's input hooks do not run in ``fused`` (the head is not
    called): the hidden states (residual-stream ``layout``) are brought to the region's replicated full-sequence
    layout here (all-gather under SP) and their local gradient, this rank's vocab partial sum, is reduced on the
    way back. Both return the same plain fp32 scalar on every tp rank.
    """

    def __init__(self, tp_mesh: DeviceMesh, layout: Placement):
        super().__init__()
        self.mesh, self.layout = tp_mesh, layout

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, DTensor):
            return token_cross_entropy(logits, labels)  # full (local) logits
        if logits.placements != (Shard(logits.ndim - 1),) and logits.placements != (Shard(-1),):
            logits = logits.redistribute(self.mesh, [Shard(logits.ndim - 1)])
        local = logits.to_local()
        vocab_start = self.mesh.get_local_rank() * local.shape[-1]
        return vocab_parallel_cross_entropy(local, labels, vocab_start, self.mesh.get_group())

    def fused(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        if not isinstance(weight, DTensor):
            return fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens)
        if weight.placements != (Shard(0),):
            raise ValueError(
                f"fused LM loss: expected the head weight as Shard(0) on the tp mesh, got {weight.placements}"
            )
        h = enter_region(hidden, self.mesh, self.layout).to_local(grad_placements=[Partial()])
        w_local = weight.to_local()
        vocab_start = self.mesh.get_local_rank() * w_local.shape[0]
        return vocab_parallel_fused_cross_entropy(h, w_local, labels, vocab_start, chunk_tokens, self.mesh.get_group())

    def __deepcopy__(self, memo):  # process groups cannot be copied: a deep-copied model shares the mesh
        return type(self)(self.mesh, self.layout)

    def extra_repr(self) -> str:
        return f"tp={self.mesh.size()}, {self.layout}"
