"""The LM loss, defined once: ``IGNORE_INDEX``, ``token_cross_entropy``, the ``LMLoss`` seam, and the fused,
chunked head + cross entropy that never builds the ``[tokens, vocab]`` logits.

Why fused: the plain head materialises fp32 logits, a log-softmax of the same size and a gradient of the same
size again (128 KiB per token at vocab 32768). Here tokens go in chunks; per chunk the logits, the loss and, in
the same pass, the chunk's share of both gradients are computed (three GEMMs, as the plain path). The softmax
statistics pass through ``reduce_max`` / ``reduce_sum`` hooks (identity here) so the vocab-parallel head
(``parallel/tp_ops.py``) runs this same code on its shard. Details: docs/performance.md, "Fused LM head".
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "IGNORE_INDEX",
    "LMLoss",
    "token_cross_entropy",
    "fused_linear_cross_entropy",
    "chunked_linear_cross_entropy",
]

IGNORE_INDEX = -100
"""The label that marks a position excluded from the LM loss (``F.cross_entropy``'s default): the one place it
is defined; data, model and parallel code import it."""

Reduce = Optional[Callable[[torch.Tensor], None]]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of ``logits [..., V]`` against ``labels [...]`` over labels != :data:`IGNORE_INDEX`,
    in fp32 (fp64 logits stay fp64); nan (0/0) when every label is ignored, as ``F.cross_entropy``."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype ``F.linear`` would use: autocast's (fp32 inputs under autocast), else the inputs'."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"fused LM loss: hidden states are {hidden.dtype} but the head weight is {weight.dtype} "
            "(F.linear needs one dtype; cast the model or use autocast)"
        )
    return hidden.dtype


@torch.no_grad()
def chunked_linear_cross_entropy(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    target_N: torch.Tensor,
    chunk_tokens: int,
    need_grad: bool,
    vocab_start: int = 0,
    ignore_index: int = IGNORE_INDEX,
    reduce_max: Reduce = None,
    reduce_sum: Reduce = None,
):
    """``(loss, grad_h_ND, grad_w_VD)`` of ``mean CE(h @ w.T, target)``, chunked over tokens (grads None unless
    ``need_grad``).

    ``h_ND`` and ``w_VD`` must already be in the compute dtype. ``w_VD`` holds vocab ids ``[vocab_start,
    vocab_start + V)``; with ``reduce_*`` hooks the softmax statistics are combined over the other shards
    (``target_N`` and hence ``n_valid`` are the same everywhere). ``grad_h`` is then this shard's partial sum.
    No valid target: loss nan (0/0) and zero gradients, as ``F.cross_entropy``.
    """
    N, V = h_ND.shape[0], w_VD.shape[0]
    acc = torch.promote_types(h_ND.dtype, torch.float32)
    valid_N = target_N != ignore_index
    n_valid = valid_N.sum()
    scale = 1.0 / n_valid.clamp_min(1).to(acc)
    loss_sum = torch.zeros((), dtype=acc, device=h_ND.device)
    grad_h_ND = torch.empty_like(h_ND) if need_grad else None
    # Written by the first chunk's GEMM (no zero fill, no read of zeros), accumulated by the others.
    alloc = torch.empty if N > 0 else torch.zeros
    grad_w_VD = alloc(w_VD.shape, dtype=acc, device=w_VD.device) if need_grad else None
    for s in range(0, N, chunk_tokens):
        e = min(s + chunk_tokens, N)
        h_cD, t_c, v_c = h_ND[s:e], target_N[s:e], valid_N[s:e]
        z_cV = F.linear(h_cD, w_VD).to(acc)  # this chunk's logits: a fresh buffer, reused in place below
        max_c = z_cV.amax(dim=-1)
        if reduce_max is not None:
            reduce_max(max_c)
        z_cV.sub_(max_c.unsqueeze(-1))
        local_c = t_c - vocab_start
        mine_c = v_c & (local_c >= 0) & (local_c < V)
        idx_c1 = torch.where(mine_c, local_c, torch.zeros_like(local_c)).unsqueeze(-1)
        tgt_c = z_cV.gather(-1, idx_c1).squeeze(-1) * mine_c.to(acc)
        z_cV.exp_()
        stats_2c = torch.stack([tgt_c, z_cV.sum(dim=-1)])
        if reduce_sum is not None:
            reduce_sum(stats_2c)
        tgt_c, sum_exp_c = stats_2c[0], stats_2c[1]
        loss_sum += torch.where(v_c, sum_exp_c.log() - tgt_c, torch.zeros_like(tgt_c)).sum()
        if not need_grad:
            continue
        # d loss / d logits = (softmax - onehot) * scale on valid rows. In fp32/fp64 the row scale goes onto the
        # two small GEMM operands instead of the [chunk, vocab] buffer (one pass fewer over it); in low precision
        # it is applied in fp32 before the cast (a bf16 scale would bias every gradient by its rounding).
        g_cV = z_cV.div_(sum_exp_c.unsqueeze(-1))  # softmax, in place
        g_cV.scatter_add_(-1, idx_c1, -mine_c.to(acc).unsqueeze(-1))
        row_c1 = (v_c.to(acc) * scale).unsqueeze(-1)
        full = h_ND.dtype == acc
        if not full:
            g_cV = g_cV.mul_(row_c1).to(h_ND.dtype)
        torch.mm(g_cV, w_VD, out=grad_h_ND[s:e])
        if full:  # addmm_ with beta=0 on the first chunk: the empty buffer is overwritten, never read
            grad_h_ND[s:e].mul_(row_c1)
            grad_w_VD.addmm_(g_cV.t(), h_cD * row_c1, beta=float(s > 0))
        else:  # low-precision matmul, fp32 accumulation across chunks
            gw_VD = torch.mm(g_cV.t(), h_cD)
            if s > 0:
                grad_w_VD.add_(gw_VD)
            else:
                grad_w_VD.copy_(gw_VD)
    return loss_sum / n_valid, grad_h_ND, grad_w_VD


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, target_N, chunk_tokens, compute_dtype, vocab_start, ignore_index, reduce_max, reduce_sum
    ):
        h_ND = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
        w_VD = weight.to(compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_h, grad_w = chunked_linear_cross_entropy(
                h_ND, w_VD, target_N, chunk_tokens, True, vocab_start, ignore_index, reduce_max, reduce_sum
            )
        ctx.grads = (grad_h.view(hidden.shape).to(hidden.dtype), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # Out of place: the pipeline's zero-bubble schedule runs backward through this node twice (input grads,
        # then weight grads, retain_graph), so the buffers must survive until the graph is freed.
        grad_h, grad_w = ctx.grads
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), *([None] * 7)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int = IGNORE_INDEX,
    vocab_start: int = 0,
    reduce_max: Reduce = None,
    reduce_sum: Reduce = None,
) -> torch.Tensor:
    """Mean cross entropy of ``F.linear(hidden, weight)`` against ``labels`` without the full logits.

    ``hidden [..., d]``, ``weight [V, d]``, ``labels [...]`` (``ignore_index`` rows excluded). Equals
    ``F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), labels.flatten(),
    ignore_index=ignore_index)`` (fp64 stays fp64; under autocast the matmuls run in autocast's dtype) and
    returns an fp32 (fp64) scalar. ``vocab_start`` / ``reduce_*``: see :func:`chunked_linear_cross_entropy`.
    """
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)}")
    compute = _compute_dtype(hidden, weight)
    target_N = labels.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(
            hidden, weight, target_N, chunk_tokens, compute, int(vocab_start), ignore_index, reduce_max, reduce_sum
        )
    h_ND = hidden.reshape(-1, hidden.shape[-1]).to(compute)
    with torch.autocast(hidden.device.type, enabled=False):
        return chunked_linear_cross_entropy(
            h_ND,
            weight.to(compute),
            target_N,
            chunk_tokens,
            False,
            int(vocab_start),
            ignore_index,
            reduce_max,
            reduce_sum,
        )[0]


class LMLoss(nn.Module):
    """The model's LM loss as a child module (``model.lm_loss``, no parameters): a plain seam that tensor
    parallelism substitutes with a vocab-parallel module (``attnres_train.parallel.tensor_loss``).

    ``lm_loss(logits, labels)``: :func:`token_cross_entropy`; ``lm_loss.fused(hidden, weight, labels,
    chunk_tokens)``: the same loss of ``F.linear(hidden, weight)`` without the logits
    (:func:`fused_linear_cross_entropy`).
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_cross_entropy(logits, labels)

    def fused(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens)
