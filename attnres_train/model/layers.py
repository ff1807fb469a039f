"""One decoder layer = token mixer sublayer (KDA or MLA) + FFN sublayer (dense SwiGLU or MoE).

Each sublayer keeps its own PreNorm (``input_layernorm`` / ``post_attention_layernorm``) and reads its input
from the :class:`DepthState`: the running hidden state in PreNorm mode, or the AttnRes softmax mix over the
state's sources in Full/Block mode. The layer takes a state and returns a new one (never mutating the input
state's lists), so a pipeline stage can run any contiguous range of layers on a received state.

AttnRes parameter names follow Kimi-K3 (``self_attention_res_{norm,proj}``, ``mlp_res_{norm,proj}``): the
pseudo-query is ``proj.weight[0]`` (zero-initialised), the learnable key gain is ``norm.weight`` (ones),
folded into the query as in K3.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
from torch import nn

from ..config.model import ModelConfig, block_starts, is_moe_layer
from .depth import DepthState, DepthViews, depth_read
from .kda import KimiDeltaAttention
from .mla import MultiLatentAttention
from .mlp import SwiGLU
from .moe import MoE
from .norms import RMSNorm


def make_depth_query(d: int, eps: float) -> tuple:
    """One sublayer's AttnRes parameters: (key-norm gain ``RMSNorm`` = ones, pseudo-query ``Linear(d, 1)`` = 0)."""
    proj = nn.Linear(d, 1, bias=False)
    nn.init.zeros_(proj.weight)
    return RMSNorm(d, eps), proj


def fold_query(norm: RMSNorm, proj: nn.Linear) -> torch.Tensor:
    """The effective query ``w ⊙ γ`` (the key-norm gain folded into the pseudo-query, as in K3), ``[d]``."""
    return proj.weight[0] * norm.weight


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_idx = layer_idx
        self.mode = cfg.residual.mode
        self.two_phase = cfg.residual.two_phase
        self.residual_impl = cfg.residual.impl
        self.eps = eps
        self.is_mla = layer_idx in set(cfg.mla_layers)
        self.is_moe = is_moe_layer(cfg, layer_idx)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.self_attn = MultiLatentAttention(cfg) if self.is_mla else KimiDeltaAttention(cfg)
        if self.is_moe:
            self.block_sparse_moe = MoE(cfg)
        else:
            self.mlp = SwiGLU(d, cfg.moe.dense_intermediate_size)
        starts = set(block_starts(cfg))
        # Whether sublayer (2i: mixer, 2i+1: FFN) opens a new AttnRes block (closing the open partial sum).
        self.opens_block = (2 * layer_idx in starts, 2 * layer_idx + 1 in starts)
        if self.mode != "prenorm":
            self.self_attention_res_norm, self.self_attention_res_proj = make_depth_query(d, eps)
            self.mlp_res_norm, self.mlp_res_proj = make_depth_query(d, eps)
            self.depth_views = DepthViews()  # a seam (how depth mixing sees its sources), no parameters

    # -- AttnRes helpers -------------------------------------------------------------------------
    def queries(self) -> Sequence[torch.Tensor]:
        """Folded pseudo-queries (w ⊙ γ) of the mixer and FFN sublayers, ``[d]`` each."""
        return (
            fold_query(self.self_attention_res_norm, self.self_attention_res_proj),
            fold_query(self.mlp_res_norm, self.mlp_res_proj),
        )

    def _ffn(self, x: torch.Tensor):
        if self.is_moe:
            return self.block_sparse_moe(x)
        return self.mlp(x), None

    def mix(self, x_btd: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The token mixer; ``doc_ids`` (document masking) is passed only when set, so the default call is the
        plain ``self_attn(x)`` that parallel wrappers see."""
        return self.self_attn(x_btd) if doc_ids is None else self.self_attn(x_btd, doc_ids=doc_ids)

    def forward(self, state: DepthState, doc_ids: Optional[torch.Tensor] = None) -> DepthState:
        """``doc_ids``: ``[B,T]`` document ids (:mod:`attnres_train.model.doc_mask`) or None (no masking).

        Only the token mixer uses them: the FFN and the AttnRes depth mixing act per position.
        """
        if self.mode == "prenorm":
            h = state.partial
            h = h + self.mix(self.input_layernorm(h), doc_ids)
            y, aux = self._ffn(self.post_attention_layernorm(h))
            return replace(state, partial=h + y).add_aux(aux)

        q_attn, q_mlp = self.queries()
        state = self.sublayer(state, 0, q_attn, doc_ids)
        return self.sublayer(state, 1, q_mlp)

    def prepare(self, state: DepthState, k: int) -> DepthState:
        """Close the open block if sublayer ``k`` starts a new one (the state this sublayer reads from)."""
        if self.opens_block[k] and state.partial is not None:
            return replace(state, blocks=state.blocks + [state.partial], partial=None)
        return state

    def sublayer(
        self, state: DepthState, k: int, q_d: torch.Tensor, doc_ids: Optional[torch.Tensor] = None
    ) -> DepthState:
        """Run sublayer ``k`` (0: token mixer, 1: FFN) in AttnRes mode and return the updated state."""
        sub = 2 * self.layer_idx + k
        if self.mode == "full" and sub in state.phase1:
            # Full AttnRes with phase 1 precomputed over the completed blocks (``forward_layers``' segment
            # logits): phase 2 merges the open partial (the previous sublayer's output), which then closes.
            h = depth_read(state, sub, q_d, self.eps, self.two_phase, self.residual_impl, self.depth_views)
            state = self.prepare(state, k)
        else:
            state = self.prepare(state, k)
            h = depth_read(state, sub, q_d, self.eps, self.two_phase, self.residual_impl, self.depth_views)
        if k == 0:
            y, aux = self.mix(self.input_layernorm(h), doc_ids), None
        else:
            y, aux = self._ffn(self.post_attention_layernorm(h))
        partial = y if state.partial is None else state.partial + y
        return replace(state, partial=partial).add_aux(aux)
