"""Analytic parameter and FLOP counts per token, for MFU and for planning (no model build needed).

Why analytic: MFU needs *useful* FLOPs (only the top-k routed experts, causal attention, KDA's chunked cost),
which a module walk cannot see, and planning tools must count a 48B model without allocating it
(``tests/model/test_flops.py`` cross-checks the parameter counts against meta-device builds). The counting
conventions are listed in docs/performance.md, "MFU".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.model import ModelConfig, as_model_config, block_starts, is_moe_layer


@dataclass
class ParamCounts:
    total: int  # every parameter (embedding and head included)
    active: int  # parameters touched per token (top-k routed experts only)
    embedding: int  # token embedding + untied LM head
    attnres: int  # AttnRes pseudo-queries and key-norm gains

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def _kda_params(cfg: ModelConfig) -> int:
    d, k = cfg.hidden_size, cfg.kda
    hk = k.num_heads * k.head_dim
    proj = 3 * d * hk + 3 * hk * k.conv_size  # q/k/v + depthwise convs
    gates = (d * k.head_dim + k.head_dim * hk) * 2  # f_a/f_b and g_a/g_b (head_dim rank)
    return proj + gates + k.num_heads + hk + d * k.num_heads + k.head_dim + hk * d  # A_log, dt_bias, b, o_norm, o


def _mla_params(cfg: ModelConfig) -> int:
    d, m = cfg.hidden_size, cfg.mla
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    return (
        d * m.num_heads * qk
        + d * (m.kv_lora_rank + m.qk_rope_head_dim)
        + m.kv_lora_rank
        + m.kv_lora_rank * m.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
        + m.num_heads * m.v_head_dim * d
    )


def count_params(model_cfg) -> ParamCounts:
    cfg = as_model_config(model_cfg)
    d, e = cfg.hidden_size, cfg.moe
    total = active = 0
    mla = set(cfg.mla_layers)
    for i in range(cfg.num_layers):
        mixer = _mla_params(cfg) if i in mla else _kda_params(cfg)
        norms = 2 * d
        if not is_moe_layer(cfg, i):
            ffn_total = ffn_active = 3 * d * e.dense_intermediate_size
        else:
            expert = 3 * d * e.intermediate_size
            shared = 3 * d * e.intermediate_size * e.num_shared_experts
            router = d * e.num_experts  # the correction bias is a buffer, not a parameter
            ffn_total = e.num_experts * expert + shared + router
            ffn_active = e.top_k * expert + shared + router
        total += mixer + norms + ffn_total
        active += mixer + norms + ffn_active
    emb = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    attnres = 0 if cfg.residual.mode == "prenorm" else 2 * d * (2 * cfg.num_layers + 1)
    final = d + emb + attnres
    return ParamCounts(total=total + final, active=active + final, embedding=emb, attnres=attnres)


def _kda_flops(cfg: ModelConfig) -> float:
    k = cfg.kda
    c = min(k.chunk_size or 64, 64)  # null: fla's 64 (the GPU path, where MFU matters)
    core = k.num_heads * (6 * k.head_dim**2 + 3 * c * k.head_dim + c * c)
    return 2 * (_kda_params(cfg) - k.num_heads - k.num_heads * k.head_dim - k.head_dim) + core


def _mla_flops(cfg: ModelConfig, seq_len: int) -> float:
    m = cfg.mla
    ctx = (seq_len + 1) / 2
    attn = 2 * m.num_heads * ctx * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return 2 * (_mla_params(cfg) - cfg.mla.kv_lora_rank) + attn


def forward_flops_per_token(model_cfg, seq_len: int) -> float:
    """Useful forward FLOPs for one token at sequence length ``seq_len``."""
    cfg = as_model_config(model_cfg)
    d, e = cfg.hidden_size, cfg.moe
    mla = set(cfg.mla_layers)
    flops = 0.0
    for i in range(cfg.num_layers):
        flops += _mla_flops(cfg, seq_len) if i in mla else _kda_flops(cfg)
        if not is_moe_layer(cfg, i):
            flops += 2 * 3 * d * e.dense_intermediate_size
        else:
            flops += 2 * (3 * d * e.intermediate_size * (e.top_k + e.num_shared_experts) + d * e.num_experts)
    flops += 2 * d * cfg.vocab_size  # LM head (embedding lookup is free)
    flops += 4 * d * sum(attnres_sources(cfg))
    return flops


def train_flops_per_token(model_cfg, seq_len: int) -> float:
    """Forward + backward FLOPs per token (3 × forward)."""
    return 3.0 * forward_flops_per_token(model_cfg, seq_len)


def attnres_sources(model_cfg) -> list:
    """Number of sources each AttnRes read mixes over (one entry per sublayer, then the output head)."""
    cfg = as_model_config(model_cfg)
    if cfg.residual.mode == "prenorm":
        return []
    starts = set(block_starts(cfg))
    n_blocks, partial, out = 1, False, []
    for j in range(2 * cfg.num_layers):
        if j in starts and partial:
            n_blocks, partial = n_blocks + 1, False
        out.append(n_blocks + int(partial))
        partial = True
    out.append(n_blocks + 1)
    return out
