"""Triton kernels of Block AttnRes depth mixing: phase 1, phase-2 merge, and both backward passes.

Why a separate module: these are the raw ``@triton.jit`` programs only; launching, the tiny per-token softmax
bookkeeping between launches and autograd live in :mod:`attnres_kernels.attnres_ops`. Importing this module
decides how the kernels run: compiled for the GPU, or by Triton's CPU interpreter when ``TRITON_INTERPRET=1``
is set at import time (that is how the CPU tests run them).

Layout conventions (M = B·T token rows, D = hidden size, N = number of sources, S = number of queries):
* a source / output / gradient is a contiguous ``[M, D]`` row-major tensor; several of them are passed as one
  *tuple* argument (the kernel is specialised on its length N or S and unrolls over it);
* per-token scalars are fp32 ``[N, S, M]`` / ``[N, M]`` / ``[S, M]`` (rows last, so a program's rows are
  contiguous);
* every reduction and product is fp32 (``tl.dot`` with ``input_precision="ieee"``: no TF32), whatever the
  storage dtype; bf16/fp16 values are converted on load and results are cast on store.

Math (per token; r_j = rsqrt(mean(v_j²)+eps), s_js = r_j⟨v_j, q_s⟩, p_js = exp(s_js − m_s)):
  phase 1   o_s = Σ_j p_js v_j,  l_s = Σ_j p_js,  m_s = max_j s_js   (m is a stabiliser: no gradient)
  phase 2   s2 = r_p⟨p, q⟩, c1 = e^{m−m'}/Z, c2 = e^{s2−m'}/Z, Z = e^{m−m'}·l + e^{s2−m'}, h = c1·o + c2·p
  backward  ∂s/∂v = r·q − s·r²·v/D, so dv_j = Σ_s p_js·do_s + r_j Σ_s ds_js q_s − (r_j²/D)(Σ_s ds_js s_js)·v_j
            with ds_js = p_js(⟨do_s, v_j⟩ + dl_s); phase 2: dl = −c1⟨dh, h⟩, ds2 = c2(⟨dh, p⟩ − ⟨dh, h⟩),
            do = c1·dh, dp = c2·dh + ds2(r_p·q − s2·r_p²·p/D), dq = Σ_tokens ds2·r_p·p, dm = −ds2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


# Sum combiner for ``tl.reduce``. The kernels use only triton builtins and jitted combiners (no ``tl.sum`` /
# ``tl.zeros``: those are jitted triton functions, GPU-only when triton was imported without
# ``TRITON_INTERPRET``), so they run in the interpreter whenever *this* module was imported with it. triton's
# own ``_sum_combine`` (what ``tl.sum`` uses) gets the interpreter's numpy fast path; ``_add`` is the fallback.
_SUM = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def p1_logits_kernel(
    srcs,
    q_ptr,
    logit_ptr,
    rstd_ptr,
    M,
    D,
    eps,
    N: tl.constexpr,
    S: tl.constexpr,
    SP: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """Per row tile: r_j and the logits s_js of every source j against every query s."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    sidx = tl.arange(0, SP)
    smask = sidx < S
    for j in tl.static_range(N):
        sumsq = tl.full([BM], 0.0, tl.float32)
        dots = tl.full([BM, SP], 0.0, tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            cmask = cols < D
            v = tl.load(
                srcs[j] + rows64[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            ).to(tl.float32)
            q_t = tl.load(
                q_ptr + sidx[None, :] * D + cols[:, None], mask=cmask[:, None] & smask[None, :], other=0.0
            ).to(tl.float32)  # [BD, SP]
            sumsq += tl.reduce(v * v, 1, _SUM)
            dots = tl.dot(v, q_t, acc=dots, input_precision="ieee")
        r = tl.rsqrt(sumsq / D + eps)
        tl.store(rstd_ptr + j * M + rows64, r, mask=rmask)
        tl.store(
            logit_ptr + (j * S + sidx[None, :]).to(tl.int64) * M + rows64[:, None],
            dots * r[:, None],
            mask=rmask[:, None] & smask[None, :],
        )


@triton.jit
def p1_combine_kernel(srcs, p_ptr, outs, M, D, N: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """Per (row tile, column tile): the unnormalised outputs o_s = Σ_j p_js v_j (one fp32 tensor per query)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows64[:, None] * D + cols[None, :]
    for s in tl.static_range(S):
        acc = tl.full([BM, BD], 0.0, tl.float32)
        for j in tl.static_range(N):
            p = tl.load(p_ptr + (j * S + s) * M + rows64, mask=rmask, other=0.0)
            v = tl.load(srcs[j] + offs, mask=mask, other=0.0).to(tl.float32)
            acc += p[:, None] * v
        tl.store(outs[s] + offs, acc, mask=mask)


@triton.jit
def p1_bwd_dots_kernel(
    srcs,
    q_ptr,
    douts,
    logit_ptr,
    dvo_ptr,
    rstd_ptr,
    M,
    D,
    eps,
    N: tl.constexpr,
    S: tl.constexpr,
    SP: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """Per row tile: recompute r_j and s_js, and the products ⟨do_s, v_j⟩ (all fp32 scalars per token)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    sidx = tl.arange(0, SP)
    smask = sidx < S
    for j in tl.static_range(N):
        sumsq = tl.full([BM], 0.0, tl.float32)
        dots = tl.full([BM, SP], 0.0, tl.float32)
        dvo = tl.full([BM, SP], 0.0, tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            cmask = cols < D
            mask = rmask[:, None] & cmask[None, :]
            offs = rows64[:, None] * D + cols[None, :]
            v = tl.load(srcs[j] + offs, mask=mask, other=0.0).to(tl.float32)
            q_t = tl.load(
                q_ptr + sidx[None, :] * D + cols[:, None], mask=cmask[:, None] & smask[None, :], other=0.0
            ).to(tl.float32)
            sumsq += tl.reduce(v * v, 1, _SUM)
            dots = tl.dot(v, q_t, acc=dots, input_precision="ieee")
            for s in tl.static_range(S):
                g = tl.load(douts[s] + offs, mask=mask, other=0.0).to(tl.float32)
                dvo += tl.where(sidx[None, :] == s, tl.reduce(v * g, 1, _SUM)[:, None], 0.0)
        r = tl.rsqrt(sumsq / D + eps)
        smask2 = rmask[:, None] & smask[None, :]
        soffs = (j * S + sidx[None, :]).to(tl.int64) * M + rows64[:, None]
        tl.store(rstd_ptr + j * M + rows64, r, mask=rmask)
        tl.store(logit_ptr + soffs, dots * r[:, None], mask=smask2)
        tl.store(dvo_ptr + soffs, dvo, mask=smask2)


@triton.jit
def p1_bwd_dsrc_kernel(
    srcs,
    q_ptr,
    douts,
    p_ptr,
    g_ptr,
    c_ptr,
    dsrcs,
    dq_ptr,
    M,
    D,
    N: tl.constexpr,
    S: tl.constexpr,
    SP: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """Per (row tile, column tile): dv_j = Σ_s p_js do_s + Σ_s g_js q_s − c_j v_j and this tile's share of dq.

    ``g_js = r_j·ds_js`` and ``c_j = (r_j²/D) Σ_s ds_js s_js`` come from the host; dq partial sums over the
    tile's rows go to ``dq_ptr[pid_m, s, cols]`` (summed on the host: deterministic, no atomics).
    """
    pid_m = tl.program_id(0)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    rmask = rows < M
    cmask = cols < D
    rows64 = rows.to(tl.int64)
    mask = rmask[:, None] & cmask[None, :]
    offs = rows64[:, None] * D + cols[None, :]
    sidx = tl.arange(0, SP)
    smask = sidx < S
    q = tl.load(q_ptr + sidx[:, None] * D + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0.0).to(
        tl.float32
    )  # [SP, BD]
    dq = tl.full([SP, BD], 0.0, tl.float32)
    for j in tl.static_range(N):
        v = tl.load(srcs[j] + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(
            g_ptr + (j * S + sidx[None, :]).to(tl.int64) * M + rows64[:, None],
            mask=rmask[:, None] & smask[None, :],
            other=0.0,
        )  # [BM, SP]
        c = tl.load(c_ptr + j * M + rows64, mask=rmask, other=0.0)
        acc = tl.dot(g, q, input_precision="ieee") - c[:, None] * v
        for s in tl.static_range(S):
            p = tl.load(p_ptr + (j * S + s) * M + rows64, mask=rmask, other=0.0)
            acc += p[:, None] * tl.load(douts[s] + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dsrcs[j] + offs, acc.to(dsrcs[j].dtype.element_ty), mask=mask)
        dq = tl.dot(tl.trans(g), v, acc=dq, input_precision="ieee")
    tl.store(
        dq_ptr + (pid_m * S + sidx[:, None]).to(tl.int64) * D + cols[None, :], dq, mask=smask[:, None] & cmask[None, :]
    )


@triton.jit
def p2_fwd_kernel(
    o_ptr, m_ptr, l_ptr, p_ptr, q_ptr, h_ptr, sc_ptr, M, D, eps, HAS_P: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr
):
    """Per row tile: merge the phase-1 result with the partial sum; h in the output dtype, 4 scalars per token.

    ``sc_ptr`` is fp32 ``[4, M]``: c1, c2, r_p, s2 (what backward needs). Without a partial: h = o / l.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    m1 = tl.load(m_ptr + rows64, mask=rmask, other=0.0)
    l1 = tl.load(l_ptr + rows64, mask=rmask, other=1.0)
    if HAS_P:
        sumsq = tl.full([BM], 0.0, tl.float32)
        dot = tl.full([BM], 0.0, tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            cmask = cols < D
            p = tl.load(
                p_ptr + rows64[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            ).to(tl.float32)
            q = tl.load(q_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            sumsq += tl.reduce(p * p, 1, _SUM)
            dot += tl.reduce(p * q[None, :], 1, _SUM)
        rp = tl.rsqrt(sumsq / D + eps)
        s2 = dot * rp
        mx = tl.maximum(m1, s2)
        a1 = tl.exp(m1 - mx)
        a2 = tl.exp(s2 - mx)
        z = a1 * l1 + a2
        c1 = a1 / z
        c2 = a2 / z
    else:
        c1 = 1.0 / l1
        c2 = tl.full([BM], 0.0, tl.float32)
        rp = tl.full([BM], 0.0, tl.float32)
        s2 = tl.full([BM], 0.0, tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        h = c1[:, None] * tl.load(o_ptr + offs, mask=mask, other=0.0)
        if HAS_P:
            h += c2[:, None] * tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(sc_ptr + rows64, c1, mask=rmask)
    tl.store(sc_ptr + M + rows64, c2, mask=rmask)
    tl.store(sc_ptr + 2 * M + rows64, rp, mask=rmask)
    tl.store(sc_ptr + 3 * M + rows64, s2, mask=rmask)


@triton.jit
def p2_bwd_kernel(
    dh_ptr,
    h_ptr,
    p_ptr,
    q_ptr,
    sc_ptr,
    do_ptr,
    dl_ptr,
    dp_ptr,
    dq_ptr,
    M,
    D,
    HAS_P: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """Per row tile: gradients of the merge w.r.t. o (fp32), l and m (``dl_ptr`` is ``[2, M]``), the partial
    sum and (per-tile partial sums of) q. ``dm = −ds2`` is ∂h/∂m at fixed o, l: zero in total with phase 1's
    own m-dependence, and needed when phase 1 was computed by autograd (the torch reference)."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    c1 = tl.load(sc_ptr + rows64, mask=rmask, other=0.0)
    dhh = tl.full([BM], 0.0, tl.float32)
    dhp = tl.full([BM], 0.0, tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dhh += tl.reduce(dh * tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32), 1, _SUM)
        if HAS_P:
            dhp += tl.reduce(dh * tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32), 1, _SUM)
    tl.store(dl_ptr + rows64, -c1 * dhh, mask=rmask)
    if HAS_P:
        c2 = tl.load(sc_ptr + M + rows64, mask=rmask, other=0.0)
        rp = tl.load(sc_ptr + 2 * M + rows64, mask=rmask, other=0.0)
        s2 = tl.load(sc_ptr + 3 * M + rows64, mask=rmask, other=0.0)
        ds2 = c2 * (dhp - dhh)
        tl.store(dl_ptr + M + rows64, -ds2, mask=rmask)
        kq = ds2 * rp  # coefficient of q in dp, and of p in dq
        kp = ds2 * s2 * rp * rp / D  # coefficient of p in dp (through the key RMSNorm)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(do_ptr + offs, c1[:, None] * dh, mask=mask)
        if HAS_P:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.load(q_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            dp = c2[:, None] * dh + kq[:, None] * q[None, :] - kp[:, None] * p
            tl.store(dp_ptr + offs, dp.to(dp_ptr.dtype.element_ty), mask=mask)
            tl.store(dq_ptr + pid.to(tl.int64) * D + cols, tl.reduce(kq[:, None] * p, 0, _SUM), mask=cmask)
