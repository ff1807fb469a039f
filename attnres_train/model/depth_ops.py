"""Hand-differentiated AttnRes phase 1 / phase 2 for eager PyTorch (the CPU training path).

Why: autograd through the reference in :mod:`depth` records ~10 ops per (source, query) pair, each backward
re-reading full ``[B,T,d]`` tensors, and on CPU depth mixing is memory-bound. These ``autograd.Function`` s do
the same math in the fewest passes and save only what the Triton kernels save (source references, outputs,
fp32 queries, per-token fp32 scalars). :func:`phase1` is one fused read (the output head); reads inside
``forward_layers`` (Block and Full) use :func:`source_logits` once per source plus :func:`combine`
(``depth.SegmentLogits``): O(N) key passes per step; a block's first read (no partial sum) comes out of the
combine already normalised. At f1 size about a third of this code's CPU time is per-op dispatch, so the
functions also keep their op count down (columns by ``unbind``, no no-op ``.to``, no zero gradients for
unread outputs). Formulas: docs/kernels.md "What is computed" (same math; phase 2 writes its merge weights
as sigmoid(±z)); checked by ``tests/model/test_depth_ops.py`` and ``test_depth_first_read.py`` against plain
references (fp64, fp32, bf16).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def _cdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(fn):
    """Run a forward/backward with autocast disabled: the depth mixing computes in fp32 (fp64 stays fp64) by
    design, and under bf16 autocast its matmuls would otherwise produce bf16 logits (and mixed dtypes in
    backward). Inputs keep their dtypes; the functions cast explicitly."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        dev = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        if not torch.is_autocast_enabled(dev):  # the usual case: no context to enter (µs per call on CPU)
            return fn(ctx, *args)
        with torch.autocast(dev, enabled=False):
            return fn(ctx, *args)

    return wrapper


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without the call when it is already that dtype (a few µs of dispatch, ~200 calls a step)."""
    return x if x.dtype == dtype else x.to(dtype)


def _rsqrt_ms(v_td: Tensor, eps: float) -> Tensor:
    """rsqrt(mean(v²) + eps) per row in one fused pass (``vector_norm``; ``pow`` + ``mean`` makes a temporary)."""
    return torch.rsqrt(torch.linalg.vector_norm(v_td, dim=-1).square_().div_(v_td.shape[-1]).add_(eps))


def _columns(p_nts: Tensor) -> List[Tuple[Tensor, ...]]:
    """``cols[s][j]``: source j's weights for query s as ``[N, 1]`` views of ``p [n,N,S]`` (two unbinds instead
    of three view ops per use: on CPU the per-op dispatch is a third of the depth mixing's cost at f1 size)."""
    return [c.unbind(0) for c in p_nts.permute(2, 0, 1).unsqueeze(-1).unbind(0)]


def _weighted_sums(s_nts: Tensor, v2: List[Tensor], shape, first_dtype=None) -> Tuple[list, Tensor]:
    """Phase-1 forward on logits ``[n,N,S]``: the flat outputs (o_s, m_s, l_s per query) and the weights p.
    ``first_dtype``: query 0's output is its finished read ``o_0 / l_0`` in that dtype,
    from the normalised weights (no separate pass to normalise it)."""
    m_ts = s_nts.amax(0)
    p_nts = (s_nts - m_ts).exp_()
    l_ts = p_nts.sum(0)
    tshape = (s_nts.shape[-1],) + tuple(shape[:-1])
    m_s = m_ts.t().reshape(tshape).unbind(0)
    l_s = l_ts.t().reshape(tshape).unbind(0)
    cols = _columns(p_nts)
    if first_dtype is not None:
        cols[0] = (p_nts[..., 0] / l_ts[:, 0]).unsqueeze(-1).unbind(0)
    outs = []
    for s, c in enumerate(cols):
        o = v2[0] * c[0]
        for j in range(1, len(v2)):
            o.addcmul_(v2[j], c[j])
        outs += [o.view(shape) if s or first_dtype is None else _as(o.view(shape), first_dtype), m_s[s], l_s[s]]
    return outs, p_nts


def _logit_grads(grads, p_nts: Tensor, v2: List[Tensor], first=None) -> Tuple[list, Tensor]:
    """From the (o, m, l) gradients (None where unused): the non-None ``(s, do_s)`` and
    ds = p(⟨do_s, v_j⟩ + dl_s) ``[n,N,S]``. ``first = (w [n,N], l_0 [N])``: query 0's output is normalised
    (h = Σ w_j v_j, w = p / l_0), so its column is p(⟨dh, v_j⟩ - ⟨dh, h⟩) / l_0 + p dl_0, with
    ⟨dh, h⟩ = Σ_j w_j ⟨dh, v_j⟩ from the dots already taken."""
    d, cdt = v2[0].shape[-1], p_nts.dtype
    zero = p_nts.new_zeros(p_nts.shape[1])
    gs = [_as(g.reshape(-1, d), cdt) if g is not None else None for g in grads[0::3]]
    # ⟨do_s, v_j⟩ for every (source, query): [n, N, S]
    ds = torch.stack([torch.stack([zero if g is None else torch.linalg.vecdot(g, v) for g in gs], -1) for v in v2])
    if first is not None and gs[0] is not None:
        w_n, l_0 = first
        d0 = ds[..., 0]
        d0.sub_((w_n * d0).sum(0)).div_(l_0)
    if any(g is not None for g in grads[2::3]):
        ds.add_(torch.stack([zero if g is None else _as(g.reshape(-1), cdt) for g in grads[2::3]], -1))
    return [(s, g) for s, g in enumerate(gs) if g is not None], ds.mul_(p_nts)


def _value_grad(do: list, cols: list, j: int, dv: Optional[Tensor] = None) -> Optional[Tensor]:
    """``dv + Σ_s p_js do_s`` for source j, accumulated in place (None if nothing to add and no dv)."""
    for s, g in do:
        dv = g * cols[s][j] if dv is None else dv.addcmul_(g, cols[s][j])
    return dv


class _Phase1(torch.autograd.Function):
    """(q_sd, *sources) → (o_0, m_0, l_0, o_1, m_1, l_1, ...): all S queries of a block against n sources."""

    @staticmethod
    @_autocast_off
    def forward(ctx, eps: float, q_sd: Tensor, *vs: Tensor):
        d = vs[0].shape[-1]
        cdt = _cdt(vs[0].dtype)
        q = _as(q_sd, cdt)
        v2 = [_as(v.reshape(-1, d), cdt) for v in vs]  # [N,d] views (fp32 inputs: no copy)
        r_nt = torch.stack([_rsqrt_ms(v, eps) for v in v2])
        s_nts = torch.stack([v @ q.t() for v in v2]).mul_(r_nt.unsqueeze(-1))
        outs, p_nts = _weighted_sums(s_nts, v2, vs[0].shape)
        ctx.q_dtype = q_sd.dtype
        ctx.save_for_backward(q, r_nt, s_nts, p_nts, *vs)
        ctx.mark_non_differentiable(*outs[1::3])
        ctx.set_materialize_grads(False)  # unread outputs cost no passes in backward
        return tuple(outs)

    @staticmethod
    @_autocast_off
    def backward(ctx, *grads):
        q, r_nt, s_nts, p_nts, *vs = ctx.saved_tensors
        d = vs[0].shape[-1]
        v2 = [_as(v.reshape(-1, d), q.dtype) for v in vs]
        do, ds_nts = _logit_grads(grads, p_nts, v2)
        cols = _columns(p_nts)
        dsr_nts = ds_nts * r_nt.unsqueeze(-1)
        c_nt = (ds_nts * s_nts).sum(-1).mul_(r_nt.square()).div_(d)
        dq = torch.zeros_like(q)
        dvs = []
        for j, (v, dsr, c) in enumerate(zip(v2, dsr_nts.unbind(0), c_nt.unsqueeze(-1).unbind(0))):
            dq.addmm_(dsr.t(), v)
            dv = _value_grad(do, cols, j, torch.mm(dsr, q))
            dv.addcmul_(v, c, value=-1.0)
            dvs.append(_as(dv.view(vs[j].shape), vs[j].dtype))
        return (None, _as(dq, ctx.q_dtype) if ctx.needs_input_grad[1] else None, *dvs)


class _SourceLogits(torch.autograd.Function):
    """(q_qd, v) → s ``[N, Q]``: the scaled logits r⟨v, q⟩ of one source against Q queries.

    Separate from the combine so the model can compute it once per source for all later queries of a segment
    (``AttnResForCausalLM.forward_layers``) instead of once per block that reads the source.
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, eps: float, q_qd: Tensor, v: Tensor):
        d = v.shape[-1]
        cdt = _cdt(v.dtype)
        q = _as(q_qd, cdt)
        v2 = _as(v.reshape(-1, d), cdt)
        r = _rsqrt_ms(v2, eps)
        # [Q,d] x [d,N], read as [N,Q]: MKL's skinny GEMM is up to 2x slower the other way round for Q = 12-17
        s = torch.mm(q, v2.t()).t().mul_(r.unsqueeze(-1))
        ctx.q_dtype = q_qd.dtype
        ctx.save_for_backward(q, r, s, v)
        return s

    @staticmethod
    @_autocast_off
    def backward(ctx, ds: Tensor):
        q, r, s, v = ctx.saved_tensors
        d = v.shape[-1]
        v2 = _as(v.reshape(-1, d), q.dtype)
        dsr = ds * r.unsqueeze(-1)
        dq = _as(torch.mm(dsr.t(), v2), ctx.q_dtype) if ctx.needs_input_grad[1] else None
        c = (ds * s).sum(-1).mul_(r.square()).div_(d)
        dv = torch.mm(dsr, q)
        dv.addcmul_(v2, c.unsqueeze(-1), value=-1.0)
        return None, dq, _as(dv.view(v.shape), v.dtype)


class _Combine(torch.autograd.Function):
    """(s_nts, *sources) → (o_0, m_0, l_0, o_1, ...): phase 1 of S queries on their precomputed logits.

    ``first_dtype`` (not None): query 0 reads with no partial sum (its sublayer opens a block), so o_0 is its
    finished read ``o_0 / l_0`` in that dtype, made from the normalised weights: no ``_Normalise`` pass."""

    @staticmethod
    @_autocast_off
    def forward(ctx, s_nts: Tensor, first_dtype, *vs: Tensor):
        d = vs[0].shape[-1]
        v2 = [_as(v.reshape(-1, d), s_nts.dtype) for v in vs]  # [N,d] views (fp32 inputs: no copy)
        outs, p_nts = _weighted_sums(s_nts, v2, vs[0].shape, first_dtype)
        if first_dtype is None:
            ctx.save_for_backward(p_nts, *vs)
        else:
            ctx.save_for_backward(p_nts, outs[2].reshape(-1), *vs)
        ctx.normalised_first = first_dtype is not None
        ctx.mark_non_differentiable(*outs[1::3])
        # Unread outputs (e.g. the stats of a sublayer that reads the embedding alone) get None, not zeros:
        # no passes for them in backward, and sources no query of theirs reaches get no gradient at all.
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @_autocast_off
    def backward(ctx, *grads):
        p_nts, *vs = ctx.saved_tensors
        first = None
        cols = _columns(p_nts)
        if ctx.normalised_first:
            l_0, *vs = vs
            w_n = p_nts[..., 0] / l_0
            cols[0], first = w_n.unsqueeze(-1).unbind(0), (w_n, l_0)
        d = vs[0].shape[-1]
        v2 = [_as(v.reshape(-1, d), p_nts.dtype) for v in vs]
        do, ds_nts = _logit_grads(grads, p_nts, v2, first)
        dvs = []
        for j, v in enumerate(vs):
            dv = _value_grad(do, cols, j)
            dvs.append(None if dv is None else _as(dv.view(v.shape), v.dtype))
        return (ds_nts, None, *dvs)


class _Phase2(torch.autograd.Function):
    """(o, m, l, partial, q) → h: the online-softmax merge of phase 1 with the open block's partial sum."""

    @staticmethod
    @_autocast_off
    def forward(
        ctx, eps: float, dtype: torch.dtype, o_td: Tensor, m_t: Tensor, l_t: Tensor, partial: Tensor, q_d: Tensor
    ):
        shape, d = partial.shape, partial.shape[-1]
        cdt = o_td.dtype
        o = o_td.reshape(-1, d)
        p = _as(partial.reshape(-1, d), cdt)
        q = _as(q_d, cdt)
        r = _rsqrt_ms(p, eps)
        s2 = torch.mv(p, q).mul_(r)
        sum_exp = l_t.reshape(-1)
        # c2 = e^s2 / (l e^m + e^s2) = sigmoid(z) and c1 = e^m / (l e^m + e^s2) = sigmoid(-z) / l, with
        # z = s2 - m - log l: stable for any gap between s2 and m, in 7 per-token ops instead of 10.
        z = s2 - m_t.reshape(-1) - sum_exp.log()
        c2 = torch.sigmoid(z)
        c1 = torch.sigmoid(z.neg_()).div_(sum_exp)
        h = o * c1.unsqueeze(-1)
        h.addcmul_(p, c2.unsqueeze(-1))
        ctx.q_dtype = q_d.dtype
        out = _as(h.view(shape), dtype)
        ctx.save_for_backward(q, r, s2, c1, c2, partial, out)  # the output in its own dtype, as the kernels
        return out

    @staticmethod
    @_autocast_off
    def backward(ctx, dh_out: Tensor):
        q, r, s2, c1, c2, partial, h = ctx.saved_tensors
        d = partial.shape[-1]
        cdt = q.dtype
        dh = _as(dh_out.reshape(-1, d), cdt)
        p = _as(partial.reshape(-1, d), cdt)
        h = _as(h.reshape(-1, d), cdt)
        dh_h = torch.linalg.vecdot(dh, h)
        ds2 = c2 * (torch.linalg.vecdot(dh, p) - dh_h)
        do = dh * c1.unsqueeze(-1)
        dl = -(c1 * dh_h)
        dsr = ds2 * r
        dq = torch.mv(p.t(), dsr)
        dp = dh * c2.unsqueeze(-1)
        dp.addmm_(dsr.unsqueeze(-1), q.unsqueeze(0))
        dp.addcmul_(p, (ds2 * s2 * r.square() / d).unsqueeze(-1), value=-1.0)
        tshape = partial.shape[:-1]
        return (
            None,
            None,
            do.view(partial.shape),
            (-ds2).view(tshape),
            dl.view(tshape),
            _as(dp.view(partial.shape), partial.dtype),
            _as(dq, ctx.q_dtype),
        )


class _Normalise(torch.autograd.Function):
    """h = o / l (phase 2 without a partial sum, i.e. the first sublayer of a block)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, dtype: torch.dtype, o_td: Tensor, l_t: Tensor):
        inv = 1.0 / l_t
        out = _as(o_td * inv.unsqueeze(-1), dtype)
        ctx.save_for_backward(inv, out)
        return out

    @staticmethod
    @_autocast_off
    def backward(ctx, dh_out: Tensor):
        inv, out = ctx.saved_tensors
        h = _as(out, inv.dtype)
        dh = _as(dh_out, inv.dtype)
        return None, dh * inv.unsqueeze(-1), -(inv * torch.linalg.vecdot(dh, h))


def source_logits(v: Tensor, q_qd: Tensor, eps: float) -> Tensor:
    """Scaled logits ``r⟨v, q⟩`` of one source ``[B,T,d]`` against Q queries ``[Q,d]``: ``[B·T, Q]`` (fp32/fp64)."""
    return _SourceLogits.apply(eps, q_qd, v)


def combine(s_nts: Tensor, blocks: Sequence[Tensor], first_read: Optional[torch.dtype] = None) -> list:
    """Phase 1 from logits ``[n, B·T, S]`` (a stack of :func:`source_logits` columns) and the n sources: per
    query ``(o, m, l)``. ``first_read`` (a dtype): query 0 reads with no partial sum, so its entry is its finished
    read ``[B,T,d]`` in that dtype (what :func:`phase2` would return for it), not stats."""
    flat = _Combine.apply(s_nts, first_read, *blocks)
    out = [tuple(flat[3 * s : 3 * s + 3]) for s in range(s_nts.shape[-1])]
    if first_read is not None:
        out[0] = out[0][0]
    return out


def phase1(blocks: Sequence[Tensor], q_sd: Tensor, eps: float) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Same contract as :func:`attnres_train.model.depth.phase1` (per query: unnormalised o, max m, sum-exp l).

    One fused function (logits and combine): fewer autograd nodes for single reads (the output head). Reads
    inside ``forward_layers`` (Block, Full) use :func:`source_logits` once per source + :func:`combine`.
    """
    flat = _Phase1.apply(eps, q_sd, *blocks)
    return [tuple(flat[3 * s : 3 * s + 3]) for s in range(q_sd.shape[0])]


def phase2(stats, partial: Optional[Tensor], q_d: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Same contract as :func:`attnres_train.model.depth.phase2`."""
    o, m, sum_exp = stats
    if partial is None:
        return _Normalise.apply(dtype, o, sum_exp)
    return _Phase2.apply(eps, dtype, o, m, sum_exp, partial, q_d)
