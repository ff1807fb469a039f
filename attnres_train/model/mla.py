"""Multi-head latent attention with NoPE, as in the released Kimi Linear (spec §5).

Why this shape: Kimi Linear's MLA layers are its only full-attention layers and KDA carries all positional
information, so the ``qk_rope_head_dim`` key slice is one shared key vector, never rotated. We keep the released
parameter names so checkpoints map one-to-one, and train with the expanded (per-head K/V) form through
``scaled_dot_product_attention``. ``kv_a_layernorm`` uses eps 1e-6 (:data:`KV_A_LAYERNORM_EPS`, as transformers
and Moonshot's code; vLLM uses ``rms_norm_eps``), not ``cfg.rms_norm_eps``: docs/hf_interop.md.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config.model import ModelConfig
from .doc_mask import causal_document_mask
from .norms import RMSNorm

# Released remote code and transformers' native KimiLinear both use the RMSNorm class default here.
KV_A_LAYERNORM_EPS = 1e-6


class MultiLatentAttention(nn.Module):
    """Causal NoPE MLA: full-rank q, low-rank (latent) kv, one un-rotated shared ``k_pe`` for all heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.mla
        if m.q_lora_rank is not None:
            raise ValueError("only full-rank q (q_lora_rank=None) is supported, as in Kimi Linear")
        d = cfg.hidden_size
        self.num_heads = m.num_heads
        self.nope_dim = m.qk_nope_head_dim
        self.rope_dim = m.qk_rope_head_dim
        self.v_dim = m.v_head_dim
        self.kv_lora_rank = m.kv_lora_rank
        self.qk_head_dim = self.nope_dim + self.rope_dim
        self.scale = self.qk_head_dim**-0.5

        H = self.num_heads
        self.q_proj = nn.Linear(d, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=KV_A_LAYERNORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d, bias=False)

    def init_weights(self, init_std: float) -> None:
        """``kv_a_layernorm`` to ones; the nn.Linear weights are initialised by the model (normal(0, init_std))."""
        self.kv_a_layernorm.init_weights(init_std)

    def project_qkv(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q ``[B,H,T,n+p]``, k ``[B,H,T,n+p]`` (k_pe broadcast to all heads) and v ``[B,H,T,v]``."""
        # Head counts come from the tensors (``-1``), not from ``self.num_heads``: under tensor parallelism the
        # parallel engine hands this module a head slice of q_proj / kv_b_proj / o_proj.
        B, T, _ = x_BTD.shape
        q_BHTQ = self.q_proj(x_BTD).view(B, T, -1, self.qk_head_dim).transpose(1, 2)

        c_BTR, k_pe_BTP = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_BTR = self.kv_a_layernorm(c_BTR)  # k_pe is neither normalised nor rotated (NoPE)
        kv_BTHX = self.kv_b_proj(c_BTR).view(B, T, -1, self.nope_dim + self.v_dim)
        k_nope_BTHN, v_BTHV = kv_BTHX.split([self.nope_dim, self.v_dim], dim=-1)
        k_pe_BTHP = k_pe_BTP.unsqueeze(2).expand(B, T, kv_BTHX.shape[2], self.rope_dim)
        k_BHTQ = torch.cat([k_nope_BTHN, k_pe_BTHP], dim=-1).transpose(1, 2)
        return q_BHTQ, k_BHTQ, v_BTHV.transpose(1, 2)

    def forward(self, x_BTD: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x_BTD`` is the already-normed sublayer input; returns ``[B, T, d]``.

        ``doc_ids`` (``[B,T]``, :mod:`attnres_train.model.doc_mask`): attend within the same document only.
        """
        B, T, _ = x_BTD.shape
        q, k, v = self.project_qkv(x_BTD)
        # SDPA allows v's head dim to differ from q/k's; scale = 1/sqrt(nope + rope) as released.
        if doc_ids is None:
            o_BHTV = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o_BHTV = document_attention(q, k, v, doc_ids, self.scale)
        return self.o_proj(o_BHTV.transpose(1, 2).reshape(B, T, -1))


def document_attention(
    q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor, v_BHTV: torch.Tensor, doc_ids_BT: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention within documents: SDPA with a dense ``[B,1,T,T]`` boolean block-diagonal mask.

    The seam for faster kernels: on CUDA a varlen flash-attention or a flex-attention block mask would skip the
    masked blocks instead of computing them; this dense-mask form runs on every device (O(T^2) mask memory per
    sample) and is the exact reference the document-masking tests check.
    """
    mask_B1TT = causal_document_mask(doc_ids_BT)
    return F.scaled_dot_product_attention(q_BHTQ, k_BHTQ, v_BHTV, attn_mask=mask_B1TT, scale=scale)
