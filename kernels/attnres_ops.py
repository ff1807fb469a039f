"""Autograd functions around the AttnRes Triton kernels: same contract as the torch reference, far less memory.

Why: the torch reference (``attnres_train.model.depth``) stacks the sources into an fp32 ``[n, B, T, d]``
tensor and autograd keeps it (plus the normalised keys) for every read: O(sources·B·T·d) fp32 per sublayer.
Here phase 1 saves only the *references* to the sources (alive anyway: they are the blocks), the fp32 queries
and the per-token maxima ``[S, B, T]``; backward recomputes the RMS statistics and logits from the sources.
Phase 2 saves the partial sum (a reference), its own output and four fp32 scalars per token. The phase-1
outputs ``o`` (fp32, one ``[B, T, d]`` per query, exactly as the reference hands them over) are not saved.

Public functions mirror ``depth.phase1`` / ``depth.phase2`` (fp32 accumulation for any input dtype):
  ``phase1(blocks, q_sd, eps) -> [(o_btd fp32 unnormalised, m_bt fp32 max, l_bt fp32 sum-exp)] * S``
  ``phase2(stats, partial, q_d, eps, dtype) -> h_btd`` (the online-softmax merge, or o/l without a partial).
The max ``m`` is a stabiliser: the composed result does not depend on it, so phase 1 marks it
non-differentiable and differentiates at fixed m (exact). Phase 2 still returns ∂h/∂m (= −ds2), so it also
composes exactly with the torch phase 1, whose autograd routes m through ``amax``.

The small per-token softmax bookkeeping between the two phase-1 launches (max / exp / sum over sources of an
``[N, S, M]`` fp32 tensor) runs as torch ops: it touches N·S scalars per token against N·d loads.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton

from . import attnres_triton as K

NUM_WARPS = 4


def _rows(x: torch.Tensor, d: int) -> torch.Tensor:
    """``[..., d]`` -> contiguous ``[M, d]`` (a view when already contiguous)."""
    return x.contiguous().view(-1, d)


def _bd(d: int, cap: int = 64) -> int:
    """Columns per chunk: at most ``cap``, at least 16 (tl.dot needs every dimension >= 16)."""
    return min(cap, max(16, triton.next_power_of_2(d)))


def _sp(s: int) -> int:
    return max(16, triton.next_power_of_2(s))


# Tiles (rows BM x columns BD, warps). The kernels unroll over sources and queries, and the compiler keeps
# loop-invariant tiles in registers: the backward source kernel holds S gradient tiles, the combine kernel
# N source tiles, so BD shrinks as S / N grow (ptxas for sm_90 at S=6, N=9: no spills; see docs/kernels.md).
BM_ROW = 16  # row-reduction kernels (logits, backward dots, phase 2)


def _combine_cfg(d: int, n: int):
    return 32, _bd(d, 64 if n <= 10 else 32), 4


def _dsrc_cfg(d: int, s: int):
    return 32, _bd(d, 64 if s <= 6 else 32 if s <= 12 else 16), 8


class _Phase1(torch.autograd.Function):
    """Inputs ``(eps, q_sd, *blocks)``; outputs ``(*o_s, *m_s, *l_s)`` for the S queries."""

    @staticmethod
    def forward(ctx, eps: float, q_sd: torch.Tensor, *blocks: torch.Tensor):
        shape, d = blocks[0].shape, blocks[0].shape[-1]
        n, s = len(blocks), q_sd.shape[0]
        vs = tuple(_rows(b, d) for b in blocks)
        m_rows = vs[0].shape[0]
        q = q_sd.detach().to(torch.float32).contiguous()
        dev = vs[0].device
        logits = torch.empty(n, s, m_rows, device=dev, dtype=torch.float32)
        rstd = torch.empty(n, m_rows, device=dev, dtype=torch.float32)
        outs = tuple(torch.empty(m_rows, d, device=dev, dtype=torch.float32) for _ in range(s))
        if m_rows:
            K.p1_logits_kernel[(triton.cdiv(m_rows, BM_ROW),)](
                vs, q, logits, rstd, m_rows, d, eps, N=n, S=s, SP=_sp(s), BM=BM_ROW, BD=_bd(d), num_warps=NUM_WARPS
            )
        m_sm = logits.amax(0) if n else logits.new_empty(s, m_rows)
        p = torch.exp(logits - m_sm)
        l_sm = p.sum(0)
        if m_rows:
            bm, bd, nw = _combine_cfg(d, n)
            K.p1_combine_kernel[(triton.cdiv(m_rows, bm), triton.cdiv(d, bd))](
                vs, p, outs, m_rows, d, N=n, S=s, BM=bm, BD=bd, num_warps=nw
            )
        ctx.eps, ctx.shape, ctx.q_dtype = eps, shape, q_sd.dtype
        ctx.save_for_backward(q, m_sm, *blocks)
        ms = tuple(m_sm[i].clone().view(shape[:-1]) for i in range(s))
        ls = tuple(l_sm[i].clone().view(shape[:-1]) for i in range(s))
        ctx.mark_non_differentiable(*ms)
        return (*(o.view(shape) for o in outs), *ms, *ls)

    @staticmethod
    def backward(ctx, *grads):
        q, m_sm, *blocks = ctx.saved_tensors
        s, n, d = q.shape[0], len(blocks), ctx.shape[-1]
        vs = tuple(_rows(b, d) for b in blocks)
        m_rows = vs[0].shape[0]
        dev = vs[0].device
        dos = tuple(_rows(g, d).to(torch.float32) for g in grads[:s])
        dl_sm = torch.stack([g.reshape(-1) for g in grads[2 * s :]]).to(torch.float32)  # [S, M]
        logits = torch.empty(n, s, m_rows, device=dev, dtype=torch.float32)
        dvo = torch.empty_like(logits)
        rstd = torch.empty(n, m_rows, device=dev, dtype=torch.float32)
        if m_rows:
            K.p1_bwd_dots_kernel[(triton.cdiv(m_rows, BM_ROW),)](
                vs,
                q,
                dos,
                logits,
                dvo,
                rstd,
                m_rows,
                d,
                ctx.eps,
                N=n,
                S=s,
                SP=_sp(s),
                BM=BM_ROW,
                BD=_bd(d),
                num_warps=NUM_WARPS,
            )
        p = torch.exp(logits - m_sm)
        ds = p * (dvo + dl_sm)  # dL/ds_js
        g = ds * rstd[:, None]  # coefficient of q_s in dv_j and of v_j in dq_s
        c = (ds * logits).sum(1) * rstd.square() / d  # coefficient of v_j in dv_j (key RMSNorm)
        dsrc = tuple(torch.empty_like(v) for v in vs)
        bm, bd, nw = _dsrc_cfg(d, s)
        tiles = triton.cdiv(m_rows, bm)
        dq_part = torch.empty(tiles, s, d, device=dev, dtype=torch.float32)
        if m_rows:
            K.p1_bwd_dsrc_kernel[(tiles, triton.cdiv(d, bd))](
                vs, q, dos, p, g, c, dsrc, dq_part, m_rows, d, N=n, S=s, SP=_sp(s), BM=bm, BD=bd, num_warps=nw
            )
        dq = dq_part.sum(0).to(ctx.q_dtype)
        return (None, dq, *(x.view(ctx.shape) for x in dsrc))


class _Phase2(torch.autograd.Function):
    """Inputs ``(eps, dtype, o, m, l, q_d, partial_or_None)``; output ``h`` in ``dtype``."""

    @staticmethod
    def forward(ctx, eps, dtype, o, m, sumexp, q_d, partial):
        shape, d = o.shape, o.shape[-1]
        o2 = _rows(o, d)
        m_rows = o2.shape[0]
        has_p = partial is not None
        p2 = _rows(partial, d) if has_p else o2  # dummy pointer when there is no partial sum
        q = q_d.detach().to(torch.float32).contiguous()
        h = torch.empty(m_rows, d, device=o.device, dtype=dtype)
        sc = torch.empty(4, m_rows, device=o.device, dtype=torch.float32)
        if m_rows:
            K.p2_fwd_kernel[(triton.cdiv(m_rows, BM_ROW),)](
                o2,
                m.reshape(-1).float().contiguous(),
                sumexp.reshape(-1).float().contiguous(),
                p2,
                q,
                h,
                sc,
                m_rows,
                d,
                eps,
                HAS_P=has_p,
                BM=BM_ROW,
                BD=_bd(d),
                num_warps=NUM_WARPS,
            )
        h = h.view(shape)
        ctx.has_p, ctx.shape, ctx.q_dtype = has_p, shape, q_d.dtype
        ctx.save_for_backward(h, partial if has_p else None, q, sc)
        return h

    @staticmethod
    def backward(ctx, dh):
        h, partial, q, sc = ctx.saved_tensors
        d = ctx.shape[-1]
        dh2, h2 = _rows(dh, d), _rows(h, d)
        m_rows = h2.shape[0]
        p2 = _rows(partial, d) if ctx.has_p else h2
        do = torch.empty(m_rows, d, device=h.device, dtype=torch.float32)
        dlm = torch.zeros(2, m_rows, device=h.device, dtype=torch.float32)  # dl, dm (dm stays 0 without p)
        dp = torch.empty_like(p2) if ctx.has_p else do
        tiles = triton.cdiv(m_rows, BM_ROW)
        dq_part = torch.empty(tiles if ctx.has_p else 0, d, device=h.device, dtype=torch.float32)
        if m_rows:
            K.p2_bwd_kernel[(tiles,)](
                dh2,
                h2,
                p2,
                q,
                sc,
                do,
                dlm,
                dp,
                dq_part if ctx.has_p else do,
                m_rows,
                d,
                HAS_P=ctx.has_p,
                BM=BM_ROW,
                BD=_bd(d),
                num_warps=NUM_WARPS,
            )
        dq = dq_part.sum(0).to(ctx.q_dtype) if ctx.has_p else None
        dp = dp.view(ctx.shape) if ctx.has_p else None
        rshape = ctx.shape[:-1]
        return None, None, do.view(ctx.shape), dlm[1].view(rshape), dlm[0].view(rshape), dq, dp


@torch.compiler.disable  # opaque to dynamo: eager Triton launches inside a compiled graph (a graph break)
def phase1(blocks: Sequence[torch.Tensor], q_sd: torch.Tensor, eps: float):
    """All S queries ``q_sd [S, d]`` against the completed ``blocks`` (each ``[B, T, d]``) in two launches."""
    s = q_sd.shape[0]
    out = _Phase1.apply(float(eps), q_sd, *blocks)
    return [(out[i], out[s + i], out[2 * s + i]) for i in range(s)]


@torch.compiler.disable
def phase2(stats, partial: Optional[torch.Tensor], q_d: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Online-softmax merge of phase-1 ``stats`` with the open block's ``partial`` sum (None: only o / l)."""
    o, m, sumexp = stats
    return _Phase2.apply(float(eps), dtype, o, m, sumexp, q_d, partial)


def mix(sources: List[torch.Tensor], q_d: torch.Tensor, eps: float) -> torch.Tensor:
    """Direct softmax over ``sources`` (all as phase-1 sources, no partial): for tests and benchmarks."""
    return phase2(phase1(sources, q_d[None], eps)[0], None, q_d, eps, sources[0].dtype)
