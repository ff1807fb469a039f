"""Depth mixing for Attention Residuals: the depth state, pseudo-query softmax, and the two-phase schedule.

Why: AttnRes replaces the residual sum by a per-token softmax over earlier sources keyed by static per-sublayer
pseudo-queries, so all queries of a block attend to the completed blocks in one batched call (phase 1) and each
sublayer merges its open partial sum online (phase 2), equal to the direct softmax up to rounding
(tests/model/test_depth.py). :class:`DepthState` is the only thing carried between layers and pipeline stages.
Numerics, the implementations (``model.residual.impl``: reference | torch | triton | auto) and their rule:
docs/model.md "Residual modes", docs/kernels.md "Selecting the implementation".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple, Union

import attnres_kernels  # import-light (no triton): the kernels themselves load on first use
import torch
from torch import nn

from ..config.errors import ConfigError
from ..config.model import RESIDUAL_IMPLS
from . import depth_ops

Phase1Stats = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (o_btd unnormalised, m_bt max, l_bt sum-exp)


class DepthViews(nn.Module):
    """How the depth mixing sees its sources: as plain tensors (this class; no parameters).

    A seam like ``LMLoss``: tensor parallelism substitutes a subclass (parallel/tensor_depth.py) whose sources
    are shards of distributed tensors, so the fused paths run on each rank's local shard and the results are
    placed like the sources again. The model itself knows nothing distributed.
    """

    def sharded(self, x: torch.Tensor) -> bool:
        return False

    def local(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return x

    def local_query(self, q: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return q

    def like(self, y: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return y


_PLAIN_VIEWS = DepthViews()  # stateless: the default where no seam is passed


@dataclass
class DepthState:
    """What flows between decoder layers (and pipeline stages).

    blocks:   completed block representations ``[B,T,d]``; blocks[0] is the token embedding (AttnRes modes).
    partial:  the open block's partial sum (AttnRes) or the hidden state (PreNorm); None right after a block
              was closed (e.g. the first sublayer of the network sees only the embedding).
    aux_loss: running sum of MoE auxiliary losses of the layers run so far (None if none were produced).
    phase1:   per-sublayer phase-1 statistics precomputed for the current block, or, for a sublayer that reads
              with no partial sum (it opens a block), its finished read ``[B,T,d]``; a local cache that is never
              sent between stages (it is recomputed from ``blocks`` when missing).
    """

    blocks: List[torch.Tensor]
    partial: Optional[torch.Tensor]
    aux_loss: Optional[torch.Tensor] = None
    phase1: Dict[int, Union[Phase1Stats, torch.Tensor]] = field(default_factory=dict)

    def sources(self) -> List[torch.Tensor]:
        return self.blocks + ([self.partial] if self.partial is not None else [])

    def add_aux(self, aux: Optional[torch.Tensor]) -> "DepthState":
        if aux is None:
            return self
        return replace(self, aux_loss=aux if self.aux_loss is None else self.aux_loss + aux)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Mixing precision: fp32 for low-precision inputs, the input dtype for fp32/fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalized_keys(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free RMSNorm of sources in the compute dtype (input already cast)."""
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def mix_direct(sources: List[torch.Tensor], q_d: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference AttnRes read: softmax over all sources at once (used by tests and ``two_phase=False``)."""
    dtype = sources[0].dtype
    cdt = compute_dtype(dtype)
    v_nbtd = torch.stack(sources).to(cdt)
    logits_nbt = normalized_keys(v_nbtd, eps) @ q_d.to(cdt)
    a_nbt = torch.softmax(logits_nbt, dim=0)
    return (a_nbt.unsqueeze(-1) * v_nbtd).sum(0).to(dtype)


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """``model.residual.impl`` for a read over tensors like ``x``: "reference", "torch" or "triton".

    auto: triton for CUDA tensors when triton imports, torch otherwise. triton: CUDA, or CPU only when the
    kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, tests); anything else is a ConfigError naming
    ``model.residual.impl``. fp64 uses torch instead of the kernels (they accumulate in fp32). Distributed
    tensors reach this only when no :class:`DepthViews` seam took their local shards (tensor parallelism's does:
    parallel/tensor_depth.py): they use the reference, whose ops are plain tensor ops (checked by type name, so
    the model package imports nothing distributed).
    """
    if impl == "reference" or type(x).__name__ == "DTensor":
        return "reference"
    if impl == "torch" or x.dtype == torch.float64:
        return "torch"
    if impl == "auto":
        if x.device.type != "cuda":
            return "torch"
        return "triton" if attnres_kernels.triton_importable() else "torch"
    if impl != "triton":
        raise ConfigError("model.residual.impl", f"must be one of {'|'.join(RESIDUAL_IMPLS)}, got {impl!r}")
    if not attnres_kernels.triton_importable():
        raise ConfigError("model.residual.impl", "'triton' needs the triton package (pip install triton)")
    if x.device.type == "cuda" or (x.device.type == "cpu" and attnres_kernels.interpreted()):
        return "triton"
    raise ConfigError(
        "model.residual.impl",
        f"'triton' needs CUDA tensors (got {x.device.type}); on CPU the kernels run only in Triton's "
        "interpreter (TRITON_INTERPRET=1, for tests); use 'auto' or 'torch'",
    )


def phase1(
    blocks: List[torch.Tensor],
    q_sd: torch.Tensor,
    eps: float,
    impl: str = "reference",
    views: Optional[DepthViews] = None,
) -> List[Phase1Stats]:
    """All S queries of a block against the n completed blocks in one batched call.

    Returns, per query, the *unnormalised* output ``o = Σ_j e^{s_j - m} v_j`` with its max ``m`` and
    sum-exp ``l`` (fp32), so phase 2 can merge the partial sum exactly.
    """
    if impl != "reference" and views is not None and views.sharded(blocks[0]):  # the fused path on local shards
        stats = phase1([views.local(b) for b in blocks], views.local_query(q_sd, blocks[0]), eps, impl)
        return [tuple(views.like(t, blocks[0]) for t in st) for st in stats]
    which = resolve_impl(impl, blocks[0])
    if which == "triton":
        return attnres_kernels.phase1(blocks, q_sd, eps)
    if which == "torch":
        return depth_ops.phase1(blocks, q_sd, eps)
    cdt = compute_dtype(blocks[0].dtype)
    q = q_sd.to(cdt)
    vs = [b.to(cdt) for b in blocks]  # no stacked / normalised copies of the sources (CPU profile: they cost)
    logits_nbts = torch.stack([_scaled_logits(v, q, eps) for v in vs])  # [n,B,T,S]
    m_bts = logits_nbts.amax(0)
    p_nbts = torch.exp(logits_nbts - m_bts)
    l_bts = p_nbts.sum(0)
    p_n = p_nbts.unbind(0)  # not p_nbts[j]: indexing's backward zero-fills the whole [n,B,T,S] tensor per use
    out = []
    for s in range(q.shape[0]):
        o_btd = p_n[0][..., s, None] * vs[0]
        for j in range(1, len(vs)):
            o_btd = torch.addcmul(o_btd, p_n[j][..., s, None], vs[j])
        out.append((o_btd, m_bts[..., s], l_bts[..., s]))
    return out


class SegmentLogits:
    """Each source's scaled logits against all queries of a forward segment, computed once (``impl=torch``).

    Phase 1 at a block start needs ``r_j⟨v_j, q_s⟩`` of every completed block j for the block's queries; without
    this cache every block start recomputes them for all earlier blocks (O(N²) passes over ``[B,T,d]`` per
    step). With it, a source is read once for the logits of all the segment's sublayers, and its backward is one
    matmul per source. ``forward_layers`` keeps one per call (Block and Full AttnRes); nothing of it crosses a
    pipeline stage.
    """

    def __init__(self, q_qd: torch.Tensor, first_sublayer: int, eps: float, views: Optional[DepthViews] = None):
        self.q_qd, self.first, self.eps = q_qd, first_sublayer, eps
        self.views = views if views is not None else _PLAIN_VIEWS
        self.sources: List[torch.Tensor] = []
        self.logits: List[torch.Tensor] = []  # [B·T, Q] per source

    def phase1(
        self, blocks: List[torch.Tensor], sublayers: List[int], first_reads_alone: bool = False
    ) -> List[Union[Phase1Stats, torch.Tensor]]:
        """Phase-1 stats of ``sublayers`` (consecutive, inside the segment) over ``blocks``.

        ``first_reads_alone``: the first sublayer reads with no partial sum (it opens a block), so its entry is
        its finished read (in the blocks' dtype), normalised inside the combine instead of by a phase 2 pass.
        """
        known = 0
        while known < min(len(blocks), len(self.sources)) and blocks[known] is self.sources[known]:
            known += 1
        del self.sources[known:], self.logits[known:]  # DepthState.blocks only grows; anything else is recomputed
        views = self.views  # tensor parallelism: logits and combine on this rank's shards
        q = views.local_query(self.q_qd, blocks[0]).to(compute_dtype(blocks[0].dtype))
        for v in blocks[known:]:
            self.sources.append(v)
            self.logits.append(depth_ops.source_logits(views.local(v), q, self.eps))
        cols = slice(sublayers[0] - self.first, sublayers[-1] - self.first + 1)
        if sublayers != list(range(sublayers[0], sublayers[-1] + 1)):
            raise ValueError(f"a block's sublayers are consecutive, got {sublayers}")
        first = blocks[0].dtype if first_reads_alone else None
        s_nts = torch.stack(self.logits)[:, :, cols]  # one stack and one slice (and their backward) per call
        stats = depth_ops.combine(s_nts, [views.local(b) for b in blocks], first)
        return [
            views.like(st, blocks[0]) if isinstance(st, torch.Tensor) else tuple(views.like(t, blocks[0]) for t in st)
            for st in stats
        ]


def _scaled_logits(v: torch.Tensor, q_sd: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm(v) @ q^T`` without materialising the normalised keys: ``(v @ q^T) * rsqrt(mean(v^2) + eps)``."""
    return (v @ q_sd.t()) * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def phase2(
    stats: Phase1Stats,
    partial: Optional[torch.Tensor],
    q_d: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
    impl: str = "reference",
    views: Optional[DepthViews] = None,
) -> torch.Tensor:
    """Online-softmax merge of the phase-1 result with the open block's partial sum (if any)."""
    ref = stats[0] if partial is None else partial
    if impl != "reference" and views is not None and views.sharded(ref):  # the fused path on local shards
        local_stats = tuple(views.local(t) for t in stats)
        q = views.local_query(q_d, ref)
        return views.like(phase2(local_stats, views.local(partial), q, eps, dtype, impl), ref)
    which = resolve_impl(impl, ref)
    if which == "triton":
        return attnres_kernels.phase2(stats, partial, q_d, eps, dtype)
    if which == "torch":
        return depth_ops.phase2(stats, partial, q_d, eps, dtype)
    o_btd, m_bt, l_bt = stats
    if partial is None:
        return (o_btd / l_bt.unsqueeze(-1)).to(dtype)
    cdt = o_btd.dtype
    p_btd = partial.to(cdt)
    s2_bt = _scaled_logits(p_btd, q_d.to(cdt)[None], eps)[..., 0]
    m_new = torch.maximum(m_bt, s2_bt)
    a1 = torch.exp(m_bt - m_new)
    a2 = torch.exp(s2_bt - m_new)
    inv = 1.0 / (a1 * l_bt + a2)  # per-token scalars first: two full-size passes instead of four
    return torch.addcmul(o_btd * (a1 * inv).unsqueeze(-1), p_btd, (a2 * inv).unsqueeze(-1)).to(dtype)


def depth_read(
    state: DepthState,
    sublayer: int,
    q_d: torch.Tensor,
    eps: float,
    two_phase: bool,
    impl: str = "reference",
    views: Optional[DepthViews] = None,
) -> torch.Tensor:
    """The input of ``sublayer`` (or of the output head): the AttnRes mix over the state's sources."""
    if not state.blocks:
        raise ValueError("AttnRes read needs at least the embedding block in DepthState.blocks")
    if len(state.blocks) == 1 and state.partial is None:
        return state.blocks[0]  # softmax over a single source is exactly that source
    if not two_phase:
        return mix_direct(state.sources(), q_d, eps)
    stats = state.phase1.get(sublayer)
    if isinstance(stats, torch.Tensor):  # the finished read of a block's first sublayer (SegmentLogits.phase1)
        if state.partial is not None:
            raise RuntimeError(f"sublayer {sublayer}: a finished read was precomputed, but it merges a partial sum")
        return stats
    if stats is None:
        stats = phase1(state.blocks, q_d.unsqueeze(0), eps, impl, views)[0]
    return phase2(stats, state.partial, q_d, eps, state.blocks[0].dtype, impl, views)


def depth_weights(state: DepthState, q_d: torch.Tensor, eps: float) -> torch.Tensor:
    """Softmax weights over the state's sources ``[n, B, T]`` (fp32) — for diagnostics and analysis."""
    sources = state.sources()
    cdt = compute_dtype(sources[0].dtype)
    v_nbtd = torch.stack(sources).to(cdt)
    return torch.softmax(normalized_keys(v_nbtd, eps) @ q_d.to(cdt), dim=0)
