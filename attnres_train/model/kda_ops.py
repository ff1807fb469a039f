"""Pure-PyTorch Kimi Delta Attention (KDA) math: gate, l2norm, short conv, recurrent and chunked cores.

Why: fla's Triton kernels only run on CUDA, yet the model must train and be tested on CPU, so this is the CPU
reference (:func:`kda_recurrent`, the per-token delta rule) and the CPU training path (:func:`kda_chunked`,
the chunkwise WY/UT form; intra-chunk products in :mod:`.kda_intra`); docs/model.md, kimi_linear.md §4.
Conventions: q, k ``[B,T,H,K]`` (L2-normalised), v ``[B,T,H,V]``, g ``[B,T,H,K]`` log-decay (<= 0), beta
``[B,T,H]`` (sigmoided), state ``[B,H,K,V]``; cores compute in fp32 (fp64 if any input is fp64) and return o
in v's dtype, the state in the compute dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .doc_mask import document_starts
from .kda_intra import intra_chunk_products, sub_sizes

Tensor = torch.Tensor


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """fp64 if any tensor is fp64, else fp32 (gates, beta, inverse and state are never kept in bf16)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def kda_gate(raw_bthk: Tensor, A_log_h: Tensor, dt_bias_hk: Optional[Tensor] = None) -> Tensor:
    """Log-space forget gate ``g = -exp(A_log[h]) * softplus(raw + dt_bias)`` (<= 0), at least fp32.

    ``raw_bthk`` is ``[..., H, K]`` (the output of ``f_b_proj`` reshaped per head); ``A_log_h`` holds H values
    (any shape with H elements, e.g. the checkpoint's ``[1,1,H,1]``); ``dt_bias_hk`` holds H*K values.
    """
    H, K = raw_bthk.shape[-2], raw_bthk.shape[-1]
    dtype = torch.promote_types(raw_bthk.dtype, torch.float32)
    x = raw_bthk.to(dtype)
    if dt_bias_hk is not None:
        x = x + dt_bias_hk.to(dtype).reshape(H, K)
    A = A_log_h.to(dtype).reshape(H, 1).exp()
    return -A * F.softplus(x)  # softplus: beta=1, threshold=20 (torch default, as fla)


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (eps inside the sqrt, as fla), computed in >= fp32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def short_conv(x_btc: Tensor, weight_c1w: Tensor, silu: bool = False, doc_ids: Optional[Tensor] = None) -> Tensor:
    """Causal depthwise conv over time: ``y_t[c] = sum_j w[c, W-1-j] * x_{t-j}[c]`` with zero left padding.

    Same as ``nn.Conv1d(C, C, W, groups=C, padding=W-1)`` truncated to the first T outputs, returned in
    ``[B,T,C]`` memory order. With ``doc_ids`` (``[B,T]``, :mod:`attnres_train.model.doc_mask`) a tap
    ``x_{t-j}`` counts only if it is in ``t``'s document.
    """
    if doc_ids is not None:
        return _doc_short_conv(x_btc, weight_c1w, silu, doc_ids)
    return _ShortConv.apply(x_btc, weight_c1w.to(x_btc.dtype), silu)


class _ShortConv(torch.autograd.Function):
    """:func:`short_conv` as W shifted multiply-adds on ``[B,T,C]`` (SiLU fused, hand-written backward).

    Why: ``F.conv1d`` needs ``[B,C,T]``; the transposes in and out (forward and backward) and mkldnn's depthwise
    backward cost ~2.5x these W-tap passes (f1 KDA mixer: ~25 ms -> ~9 ms CPU per layer, bench/kda_layer.py).
    The taps are read as contiguous ``[W, C]`` rows: a strided weight column slows every broadcast pass ~2x.
    Saves x and the pre-SiLU output (the SiLU gradient needs it).
    """

    @staticmethod
    def forward(ctx, x_btc: Tensor, weight_c1w: Tensor, silu: bool) -> Tensor:
        T, W = x_btc.shape[1], weight_c1w.shape[-1]
        w_wc = weight_c1w.reshape(-1, W).t().contiguous()  # w_wc[W-1-j]: the tap on x_{t-j}
        x_btc = x_btc.contiguous()
        z_btc = x_btc * w_wc[W - 1]
        for j in range(1, min(W, T)):
            z_btc[:, j:].addcmul_(x_btc[:, : T - j], w_wc[W - 1 - j])
        ctx.silu = silu
        ctx.save_for_backward(x_btc, w_wc, z_btc if silu else None)
        return F.silu(z_btc) if silu else z_btc

    @staticmethod
    @once_differentiable
    def backward(ctx, gy_btc: Tensor):
        x_btc, w_wc, z_btc = ctx.saved_tensors
        T, W = x_btc.shape[1], w_wc.shape[0]
        gz_btc = torch.ops.aten.silu_backward(gy_btc, z_btc) if ctx.silu else gy_btc.contiguous()
        gx_btc = gz_btc * w_wc[W - 1]
        gw_wc = torch.zeros_like(w_wc)
        gw_wc[W - 1] = (gz_btc * x_btc).sum((0, 1))
        for j in range(1, min(W, T)):
            gx_btc[:, : T - j].addcmul_(gz_btc[:, j:], w_wc[W - 1 - j])
            gw_wc[W - 1 - j] = (gz_btc[:, j:] * x_btc[:, : T - j]).sum((0, 1))
        return gx_btc, gw_wc.t().contiguous().unsqueeze(1), None


def _doc_short_conv(x_btc: Tensor, weight_c1w: Tensor, silu: bool, doc_ids_bt: Tensor) -> Tensor:
    """:func:`short_conv` with the taps that reach into an earlier document dropped (one shifted term per tap)."""
    T, W = x_btc.shape[1], weight_c1w.shape[-1]
    w_cw = weight_c1w.to(x_btc.dtype).reshape(weight_c1w.shape[0], W)
    x_pad = F.pad(x_btc, (0, 0, W - 1, 0))
    d_pad = F.pad(doc_ids_bt, (W - 1, 0), value=-1)  # the zero padding belongs to no document
    y_btc = None
    for j in range(W):  # tap j reads x_{t-j}
        lo = W - 1 - j
        same_bt1 = (d_pad[:, lo : lo + T] == doc_ids_bt).unsqueeze(-1)
        term = torch.where(same_bt1, x_pad[:, lo : lo + T], 0.0) * w_cw[:, W - 1 - j]
        y_btc = term if y_btc is None else y_btc + term
    return F.silu(y_btc) if silu else y_btc


def kda_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    doc_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Ground-truth per-token loop (spec §4.1). Returns ``(o [B,T,H,V], state [B,H,K,V] or None)``.

    Per step: ``S <- Diag(exp g_t) S``; ``S <- S + k_t (beta_t (v_t - S^T k_t))^T``; ``o_t = S^T q_t * scale``.
    ``doc_ids`` (``[B,T]``): ``S <- 0`` instead of the decay at every document start (documents kept apart).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    q_bhtk, k_bhtk, g_bhtk = (x.to(dt).transpose(1, 2) for x in (q, k, g))
    v_bhtv = v.to(dt).transpose(1, 2)
    beta_bht = beta.to(dt).transpose(1, 2)
    S_bhkv = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    starts_bt = None if doc_ids is None else document_starts(doc_ids)
    for t in range(T):
        k_t = k_bhtk[:, :, t]
        S_bhkv = S_bhkv * g_bhtk[:, :, t].exp().unsqueeze(-1)
        if starts_bt is not None:
            S_bhkv = torch.where(starts_bt[:, t, None, None, None], 0.0, S_bhkv)
        pred_bhv = torch.einsum("bhkv,bhk->bhv", S_bhkv, k_t)
        delta_bhv = beta_bht[:, :, t].unsqueeze(-1) * (v_bhtv[:, :, t] - pred_bhv)
        S_bhkv = S_bhkv + k_t.unsqueeze(-1) * delta_bhv.unsqueeze(-2)
        outs.append(torch.einsum("bhkv,bhk->bhv", S_bhkv, q_bhtk[:, :, t] * scale))
    o_bthv = torch.stack(outs, dim=1) if T > 0 else v.new_zeros(B, 0, H, V, dtype=dt)
    return o_bthv.to(v.dtype), (S_bhkv if output_final_state else None)


@torch.compiler.disable  # eager inside torch.compile: its chunk loop and permuted gradient layouts break AOT
def kda_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    doc_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Chunkwise-parallel KDA (WY/UT form, spec §4.2); same signature/result as :func:`kda_recurrent`.

    Inside a chunk of C tokens (local positions r, i), with chunk-local inclusive cumsum ``G`` of g:
      ``D[r,i] = exp(G_r - G_i)`` for i <= r only (computed by :func:`intra_chunk_products` without ever
      exponentiating a positive log-decay, so gradients stay finite for arbitrarily strong gates),
      ``P[r,i] = sum_c q_r D[r,i] k_i`` (i <= r), ``L[r,i] = beta_r sum_c k_r D[r,i] k_i`` (i < r),
      ``[W | U] = (I + L)^-1 Diag(beta) [exp(G) * k | v]`` (unit lower-triangular inverse, then one matmul).
    With chunk-start state S: ``V' = U - W S`` (pseudo-values), ``o = (exp(G) q) S + P V'`` and
    ``S' = Diag(exp G_C) S + Kd^T V'`` where ``Kd_i = exp(G_C - G_i) k_i``.
    T not a multiple of C is zero-padded (k = v = g = beta = 0 is state-neutral, §4.3.7).

    ``doc_ids`` (``[B,T]``): the state restarts at each document start. Exactly as if the log-decay there were
    ``-inf``, but with 0/1 masks applied by ``where`` to finite values (no ``exp(-inf)`` or ``inf - inf`` can
    reach a gradient): P and the k-k products keep same-document pairs only, ``exp(G)`` (the path from the
    chunk-start state) is kept only up to the first start inside the chunk, and the hand-off keeps ``Kd_i`` only
    for the chunk's last document and ``exp(G_C)`` only if no document starts inside the chunk.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = int(chunk_size)
    if C <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    scale = K**-0.5 if scale is None else scale
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    N = -(-T // C)
    pad = N * C - T

    def to_chunks(x: Tensor) -> Tensor:  # [B,T,H,D] -> [B,H,N,C,D] in the compute dtype
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q_c, k_c, g_c = to_chunks(q) * scale, to_chunks(k), to_chunks(g)  # [B,H,N,C,K]
    v_c = to_chunks(v)  # [B,H,N,C,V]
    beta_c = to_chunks(beta.unsqueeze(-1))  # [B,H,N,C,1]

    G = g_c.cumsum(-2)  # [B,H,N,C,K], chunk-local inclusive cumsum, <= 0
    P, Akk = intra_chunk_products(q_c, k_c, G, sub_sizes(C))  # P: lower incl. diagonal
    eG = G.exp()
    if doc_ids is not None:
        same, carry, to_end = _chunk_doc_masks(doc_ids, N, C)
        P, Akk = torch.where(same, P, 0.0), torch.where(same, Akk, 0.0)
        eG = torch.where(carry, eG, 0.0)  # q/k rows that still see the chunk-start state
    L = (Akk * beta_c).tril(-1)  # strictly lower
    # (I + L)^-1 first (C right-hand sides), then one matmul: cheaper than solving for the K + V columns.
    eye = torch.eye(C, dtype=dt, device=q.device).expand_as(L)
    inv = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)  # diag of L is ignored
    W = inv @ (beta_c * eG * k_c)  # [B,H,N,C,K]
    U = inv @ (beta_c * v_c)  # [B,H,N,C,V]

    G_last = G[..., -1:, :]  # [B,H,N,1,K]
    Kd = (G_last - G).exp() * k_c
    decay = G_last.exp().transpose(-1, -2)  # [B,H,N,K,1]
    if doc_ids is not None:
        Kd = torch.where(to_end, Kd, 0.0)  # only the chunk's last document reaches the next chunk
        decay = torch.where(carry[..., -1:, :], decay, 0.0)  # a start inside the chunk clears the old state
    Kd_t = Kd.transpose(-1, -2)  # [B,H,N,K,C]
    S = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    starts, pseudo = [], []
    # The only sequential part: the state hand-off across chunks. unbind (not indexing) keeps the backward
    # from materialising a full-size zero gradient per chunk.
    for U_n, W_n, decay_n, Kd_n in zip(U.unbind(2), W.unbind(2), decay.unbind(2), Kd_t.unbind(2)):
        starts.append(S)
        v_n = U_n - W_n @ S  # [B,H,C,V]
        pseudo.append(v_n)
        S = decay_n * S + Kd_n @ v_n
    if N > 0:
        o_c = (eG * q_c) @ torch.stack(starts, dim=2) + P @ torch.stack(pseudo, dim=2)  # [B,H,N,C,V]
    else:
        o_c = v_c
    o_bthv = o_c.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o_bthv.to(v.dtype), (S if output_final_state else None)


def _chunk_doc_masks(doc_ids_bt: Tensor, N: int, C: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Masks of :func:`kda_chunked` for ``N`` chunks of ``C``: (same ``[B,1,N,C,C]``, carry ``[B,1,N,C,1]``,
    to_end ``[B,1,N,C,1]``). Padding positions continue the last document (they are state-neutral anyway)."""
    B, T = doc_ids_bt.shape
    d = doc_ids_bt
    if N * C > T:
        d = torch.cat([d, d[:, -1:].expand(B, N * C - T)], dim=1)
    d_bnc = d.reshape(B, N, C)
    # Document of the position just before each chunk (chunk 0: position 0's, i.e. the initial state carries on).
    before_bn = torch.cat([d[:, :1], d_bnc[:, :-1, -1]], dim=1)
    same = (d_bnc[..., :, None] == d_bnc[..., None, :]).unsqueeze(1)
    carry = (d_bnc == before_bn[..., None]).unsqueeze(1).unsqueeze(-1)
    to_end = (d_bnc == d_bnc[..., -1:]).unsqueeze(1).unsqueeze(-1)
    return same, carry, to_end
