"""Tensor-parallel autograd primitives on plain local tensors over the tp process group.

Why next to DTensor: the vocab-parallel cross entropy (plain, and fused from the hidden states) never gathers
the ``[tokens, vocab]`` logits and returns a plain fp32 scalar whose backward needs no context (torch's
``loss_parallel()`` returns a DTensor and must wrap ``backward()`` too; docs/tensor_parallel.md); ``reduce_grad``
(forward identity, backward all-reduce) and ``all_reduce_replicated`` (forward all-reduce, backward identity)
are Megatron's copy-to / reduce-from region. Convention: a loss built from these ops is replicated (the same on
every tp rank), every rank calls ``backward()`` on it and back-propagates only its own vocab / sequence shard,
which is what makes identity the right backward. Gloo and NCCL implement every collective used (all_reduce).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..model.lm_loss import IGNORE_INDEX, fused_linear_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_fused_cross_entropy", "all_reduce_replicated", "reduce_grad"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of rows whose logits are split over the vocabulary across ``group``.

    Forward (per row, fp32): global max (all-reduce MAX), then one all-reduce SUM of the stacked
    ``[target logit, sum exp]``; ``loss = log(sum exp) - (target logit - max)``. Backward is local:
    ``(softmax - onehot) * grad / n_valid`` on this rank's vocab slice.
    """

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, vocab_start: int, ignore_index: int, group):
        V_local = logits_NV.shape[-1]
        max_N = logits_NV.amax(dim=-1)
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
        shifted_NV = logits_NV - max_N.unsqueeze(-1)

        valid_N = target_N != ignore_index
        local_N = target_N - vocab_start
        mine_N = valid_N & (local_N >= 0) & (local_N < V_local)
        idx_N = torch.where(mine_N, local_N, torch.zeros_like(local_N))
        target_logit_N = shifted_NV.gather(-1, idx_N.unsqueeze(-1)).squeeze(-1) * mine_N.to(shifted_NV.dtype)

        exp_NV = shifted_NV.exp()
        stats_2N = torch.stack([target_logit_N, exp_NV.sum(dim=-1)])
        dist.all_reduce(stats_2N, op=dist.ReduceOp.SUM, group=group)
        target_logit_N, sum_exp_N = stats_2N[0], stats_2N[1]

        loss_N = torch.where(valid_N, sum_exp_N.log() - target_logit_N, torch.zeros_like(sum_exp_N))
        n_valid = valid_N.sum()
        ctx.save_for_backward(exp_NV.div_(sum_exp_N.unsqueeze(-1)), idx_N, mine_N, valid_N, n_valid)
        return loss_N.sum() / n_valid  # 0/0 = nan when every label is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        softmax_NV, idx_N, mine_N, valid_N, n_valid = ctx.saved_tensors
        grad_NV = softmax_NV.clone()
        grad_NV.scatter_add_(-1, idx_N.unsqueeze(-1), -mine_N.to(grad_NV.dtype).unsqueeze(-1))
        grad_NV.mul_((valid_N.to(grad_NV.dtype) * (grad_out / n_valid)).unsqueeze(-1))
        return grad_NV, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean next-token cross entropy (fp32; fp64 stays fp64) from this rank's vocabulary slice of the logits.

    ``logits`` ``[..., V_local]`` (local tensor) holds vocab ids ``[vocab_start, vocab_start + V_local)``;
    ``labels`` ``[...]`` are global ids, identical on every rank of ``group``; rows labelled ``ignore_index``
    are excluded from the mean. Equals ``F.cross_entropy(full_logits.float().flatten(0, -2),
    labels.flatten(), ignore_index=ignore_index)`` and returns the same plain scalar on every rank.
    """
    logits_NV = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1])
    return _VocabParallelCrossEntropy.apply(logits_NV, labels.reshape(-1), int(vocab_start), ignore_index, group)


def vocab_parallel_fused_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    chunk_tokens: int,
    group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """:func:`vocab_parallel_cross_entropy` of ``F.linear(hidden, weight)`` without building the logits.

    ``hidden [..., d]``: the full (replicated) hidden states, identical on every rank of ``group``; ``weight
    [V_local, d]``: this rank's rows ``[vocab_start, vocab_start + V_local)`` of the head; ``labels [...]``:
    global ids. Per chunk of ``chunk_tokens`` tokens the row max and ``[target logit, sum exp]`` are all-reduced
    (2 collectives per chunk). Returns the same plain scalar on every rank; the gradient w.r.t. ``hidden`` is
    this rank's partial sum (the caller sums it over ``group``), the one w.r.t. ``weight`` is complete.
    """

    def reduce_max(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)

    def reduce_sum(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

    return fused_linear_cross_entropy(
        hidden, weight, labels, chunk_tokens, ignore_index, vocab_start, reduce_max, reduce_sum
    )


class _AllReduceReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_replicated(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum of ``x`` over ``group`` (forward all-reduce); backward passes the gradient through unchanged.

    Correct when whatever is computed from the sum is replicated on every rank and every rank back-propagates
    it (each rank's own summand then receives exactly ``d loss / d sum``).
    """
    return _AllReduceReplicated.apply(x, group)


class _ReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def reduce_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Identity whose backward sums the gradient over ``group`` (all-reduce)."""
    return _ReduceGrad.apply(x, group)
