"""Decay-weighted intra-chunk products of chunked KDA, sub-chunked, with a hand-written backward.

Why: inside a chunk, KDA needs ``A_x[r, i] = sum_c x_r[c] exp(G_r[c] - G_i[c]) k_i[c]`` (i <= r) for x = q, k;
the decay depends on the channel, so the naive form materialises ``[C, C, K]`` per chunk and head (~90% of a
CPU step). Sub-chunks against a pivot make it matmuls with exponents <= 0 (no overflow, columns masked before
``exp``), elementwise work ~10 C K instead of C^2 K; the backward recomputes the exponentials (~1.6x the
forward vs ~3x for autograd) and saves only q, k and G. The scheme: docs/performance.md "KDA" and
design doc kimi_linear.md §4.3; checked by ``tests/model/test_kda.py`` (fp64, gradcheck, strong decay).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor

#: Sub-chunk sizes, outermost first (clipped to divisors of the chunk size). Measured on CPU (fp32, fwd + bwd of
#: the whole chunked core): for K = 128, C = 64, (16, 8) is ~8% faster than (16, 4) or (16,) and 25% faster
#: than (8,); for K = 32 it ties with (16, 4) at C = 16 and C = 64.
SUB_CHUNKS = (16, 8)


def sub_sizes(C: int, targets: Tuple[int, ...] = SUB_CHUNKS) -> Tuple[int, ...]:
    """Strictly decreasing sub-block sizes, each dividing the one above it (and C)."""
    out, M = [], C
    for t in targets:
        s = min(M, int(t))
        while M % s:
            s -= 1
        if s < M:
            out.append(s)
            M = s
    return tuple(out)


def _diag_blocks(A: Tensor, n: int) -> Tensor:
    """View ``[..., n, S, S]`` of the diagonal S x S blocks of ``A [..., n*S, n*S]``."""
    *lead, M, _ = A.shape
    S = M // n
    return A.view(*lead, n, S, n, S).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def _col_decay(G: Tensor, piv: Tensor, S: int) -> Tensor:
    """``exp(G_p(a) - G_i)`` for row sub-chunks a = 1..n-1 and columns i < M - S, 0 where i >= a*S.

    ``G``: ``[..., M, K]``; ``piv``: ``[..., n-1, 1, K]``. Returns ``[..., n-1, M-S, K]``.
    """
    M = G.shape[-2]
    n = M // S
    e = piv - G[..., None, : M - S, :]
    after = torch.arange(M - S, device=G.device)[None, :] >= S * torch.arange(1, n, device=G.device)[:, None]
    return e.masked_fill_(after[:, :, None], float("-inf")).exp_()  # mask before exp


def _off_parts(q: Tensor, k: Tensor, G: Tensor, S: int):
    """Shared forward/backward pieces of the below-diagonal blocks (row scale, column decay, scaled factors)."""
    *lead, M, K = q.shape
    n = M // S
    piv = G[..., S - 1 : M - 1 : S, :].unsqueeze(-2)  # [..., n-1, 1, K]
    rs = (G[..., S:, :].reshape(*lead, n - 1, S, K) - piv).exp_()  # [..., n-1, S, K], <= 1
    E = _col_decay(G, piv, S)  # [..., n-1, M-S, K], <= 1
    kc = E * k[..., None, : M - S, :]
    qt = q[..., S:, :].reshape(*lead, n - 1, S, K) * rs
    kt = k[..., S:, :].reshape(*lead, n - 1, S, K) * rs
    return rs, E, kc, qt, kt


# --------------------------------------------------------------------------------------------- forward
def _band_fwd(q: Tensor, k: Tensor, G: Tensor, Aq: Tensor, Ak: Tensor) -> None:
    b = q.shape[-2]
    Aq.diagonal(0, -2, -1).copy_((q * k).sum(-1))
    Ak.diagonal(0, -2, -1).copy_((k * k).sum(-1))
    for d in range(1, b):
        ek = (G[..., d:, :] - G[..., : b - d, :]).exp_().mul_(k[..., : b - d, :])
        Aq.diagonal(-d, -2, -1).copy_((q[..., d:, :] * ek).sum(-1))
        Ak.diagonal(-d, -2, -1).copy_((k[..., d:, :] * ek).sum(-1))


def _fwd(q: Tensor, k: Tensor, G: Tensor, sizes: Tuple[int, ...], Aq: Tensor, Ak: Tensor) -> None:
    if not sizes:
        return _band_fwd(q, k, G, Aq, Ak)
    *lead, M, K = q.shape
    S = sizes[0]
    n = M // S
    _, _, kc, qt, kt = _off_parts(q, k, G, S)
    kc_t = kc.transpose(-1, -2)
    Aq[..., S:, : M - S].view(*lead, n - 1, S, M - S).copy_(qt @ kc_t)  # zero where masked
    Ak[..., S:, : M - S].view(*lead, n - 1, S, M - S).copy_(kt @ kc_t)
    blocks = [x.view(*lead, n, S, K) for x in (q, k, G)]
    _fwd(*blocks, sizes[1:], _diag_blocks(Aq, n), _diag_blocks(Ak, n))


# -------------------------------------------------------------------------------------------- backward
def _band_bwd(q, k, G, dAq, dAk, dq, dk, dG) -> None:
    b = q.shape[-2]
    tq, tk = dAq.diagonal(0, -2, -1).unsqueeze(-1), dAk.diagonal(0, -2, -1).unsqueeze(-1)
    dq.addcmul_(tq, k)
    dk.addcmul_(tq, q).addcmul_(tk, k, value=2.0)
    for d in range(1, b):
        tq = dAq.diagonal(-d, -2, -1).unsqueeze(-1)  # [..., b-d, 1]: entries (r, r-d)
        tk = dAk.diagonal(-d, -2, -1).unsqueeze(-1)
        E = (G[..., d:, :] - G[..., : b - d, :]).exp_()
        ek = E * k[..., : b - d, :]
        dq[..., d:, :].addcmul_(tq, ek)
        dk[..., d:, :].addcmul_(tk, ek)
        t = torch.addcmul(tq * q[..., d:, :], tk, k[..., d:, :])  # gradient w.r.t. ek
        dk[..., : b - d, :].addcmul_(t, E)
        w = t.mul_(ek)  # gradient w.r.t. the exponent G_r - G_{r-d}
        dG[..., d:, :].add_(w)
        dG[..., : b - d, :].sub_(w)


def _bwd(q, k, G, sizes, dAq, dAk, dq, dk, dG) -> None:
    if not sizes:
        return _band_bwd(q, k, G, dAq, dAk, dq, dk, dG)
    *lead, M, K = q.shape
    S = sizes[0]
    n = M // S
    rs, E, kc, qt, kt = _off_parts(q, k, G, S)
    dbq = dAq[..., S:, : M - S].reshape(*lead, n - 1, S, M - S)
    dbk = dAk[..., S:, : M - S].reshape(*lead, n - 1, S, M - S)
    dqt, dkt = dbq @ kc, dbk @ kc  # [..., n-1, S, K]
    dkc = (dbq.transpose(-1, -2) @ qt).add_(dbk.transpose(-1, -2) @ kt)  # [..., n-1, M-S, K]
    dq[..., S:, :].view(*lead, n - 1, S, K).addcmul_(dqt, rs)
    dk[..., S:, :].view(*lead, n - 1, S, K).addcmul_(dkt, rs)
    u = dqt.mul_(qt).addcmul_(dkt, kt)  # gradient w.r.t. the row exponent G_r - G_p
    dG[..., S:, :].view(*lead, n - 1, S, K).add_(u)
    dpiv = -u.sum(-2)  # [..., n-1, K]
    dk[..., : M - S, :].add_((dkc * E).sum(-3))
    w = dkc.mul_(kc)  # gradient w.r.t. the column exponent G_p - G_i (0 where masked)
    dpiv.add_(w.sum(-2))
    dG[..., : M - S, :].sub_(w.sum(-3))
    dG[..., S - 1 : M - 1 : S, :].add_(dpiv)
    blocks = [x.view(*lead, n, S, K) for x in (q, k, G, dq, dk, dG)]
    _bwd(*blocks[:3], sizes[1:], _diag_blocks(dAq, n), _diag_blocks(dAk, n), *blocks[3:])


class _IntraProducts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, G: Tensor, sizes: Tuple[int, ...]):
        q, k, G = (x.contiguous() for x in (q, k, G))
        ctx.sizes = sizes
        ctx.save_for_backward(q, k, G)
        M = q.shape[-2]
        Aq = q.new_zeros(*q.shape[:-1], M)
        Ak = q.new_zeros(*q.shape[:-1], M)
        _fwd(q, k, G, sizes, Aq, Ak)
        return Aq, Ak

    @staticmethod
    @once_differentiable
    def backward(ctx, dAq: Tensor, dAk: Tensor):
        q, k, G = ctx.saved_tensors
        M = q.shape[-2]
        dAq = q.new_zeros(*q.shape[:-1], M) if dAq is None else dAq.contiguous()
        dAk = q.new_zeros(*q.shape[:-1], M) if dAk is None else dAk.contiguous()
        dq, dk, dG = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(G)
        _bwd(q, k, G, ctx.sizes, dAq, dAk, dq, dk, dG)
        return dq, dk, dG, None


def intra_chunk_products(q: Tensor, k: Tensor, G: Tensor, sizes: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
    """``(A_q, A_k)``, ``A_x[r, i] = sum_c x_r[c] exp(G_r[c] - G_i[c]) k_i[c]`` for ``i <= r``, else 0.

    ``q, k, G``: ``[..., M, K]``, G non-increasing along M; returns two lower-triangular ``[..., M, M]``
    matrices (diagonal included). ``sizes``: sub-chunk sizes from :func:`sub_sizes` (``()``: no split).
    """
    return _IntraProducts.apply(q, k, G, tuple(sizes))
