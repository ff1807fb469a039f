"""NoPE MLA: shapes, causality, position-independence, and equality with a naive per-head attention (fp64)."""

from __future__ import annotations

import math

import pytest
import torch

from attnres_train.config.model import MLAConfig, ModelConfig
from attnres_train.model.mla import KV_A_LAYERNORM_EPS, MultiLatentAttention


def make_cfg(rope: int = 4) -> ModelConfig:
    # v_head_dim (6) differs from the qk head dim (8 + rope) on purpose.
    return ModelConfig(
        hidden_size=32,
        mla=MLAConfig(num_heads=3, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=rope, v_head_dim=6),
    )


def make_mla(rope: int = 4, seed: int = 0) -> MultiLatentAttention:
    torch.manual_seed(seed)
    mla = MultiLatentAttention(make_cfg(rope)).double()
    with torch.no_grad():  # non-trivial norm weight so a wrong norm placement shows up
        mla.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return mla


def naive_mla(mla: MultiLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """Explicit per-batch, per-head masked softmax attention written from spec §5."""
    B, T, _ = x.shape
    H, n, p, v, r = mla.num_heads, mla.nope_dim, mla.rope_dim, mla.v_dim, mla.kv_lora_rank
    q_all = x @ mla.q_proj.weight.T  # [B, T, H*(n+p)]
    ckv = x @ mla.kv_a_proj_with_mqa.weight.T  # [B, T, r+p]
    c, k_pe = ckv[..., :r], ckv[..., r:]
    c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * mla.kv_a_layernorm.weight
    kv = c @ mla.kv_b_proj.weight.T  # [B, T, H*(n+v)]
    out = torch.zeros(B, T, H * v, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            q_h = q_all[b, :, h * (n + p) : (h + 1) * (n + p)]
            kv_h = kv[b, :, h * (n + v) : (h + 1) * (n + v)]
            k_h = torch.cat([kv_h[:, :n], k_pe[b]], dim=-1)  # same k_pe for every head, not rotated
            v_h = kv_h[:, n:]
            s = (q_h @ k_h.T) / math.sqrt(n + p)
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            out[b, :, h * v : (h + 1) * v] = torch.softmax(s, dim=-1) @ v_h
    return out @ mla.o_proj.weight.T


def test_parameter_names_and_shapes():
    mla = MultiLatentAttention(make_cfg())
    shapes = {k: tuple(t.shape) for k, t in mla.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (3 * 12, 32),
        "kv_a_proj_with_mqa.weight": (16 + 4, 32),
        "kv_a_layernorm.weight": (16,),
        "kv_b_proj.weight": (3 * (8 + 6), 16),
        "o_proj.weight": (32, 3 * 6),
    }
    assert mla.kv_a_layernorm.eps == KV_A_LAYERNORM_EPS == 1e-6
    y = mla(torch.randn(2, 5, 32))
    assert y.shape == (2, 5, 32) and torch.isfinite(y).all()


@pytest.mark.parametrize("rope", [4, 0])
def test_matches_naive_attention_fp64(rope):
    mla = make_mla(rope)
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    y = mla(x)
    y_ref = naive_mla(mla, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    params = [x] + list(mla.parameters())
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_causal():
    mla = make_mla()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 5:] += torch.randn_like(x2[:, 5:])
    y, y2 = mla(x), mla(x2)
    torch.testing.assert_close(y[:, :5], y2[:, :5], rtol=0, atol=1e-13)
    assert (y[:, 5:] - y2[:, 5:]).abs().min() > 1e-6


def test_nope_position_independent():
    """No positional encoding: permuting the strict prefix of a query leaves that query's output unchanged."""
    mla = make_mla()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2, 5])
    y, y_perm = mla(x), mla(x[:, perm])
    torch.testing.assert_close(y[:, 5], y_perm[:, 5], rtol=1e-12, atol=1e-13)
    assert not torch.allclose(y[:, 3], y_perm[:, 3])


def test_matches_transformers_kimi_linear_attention():
    tf = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    hf_cfg = KimiLinearConfig(
        hidden_size=32,
        num_attention_heads=3,
        num_key_value_heads=3,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        q_lora_rank=None,
        num_hidden_layers=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    hf_cfg._attn_implementation = "eager"
    # fp32: transformers' RMSNorm and eager softmax compute in fp32 even for fp64 inputs, so an fp64
    # comparison would only agree to ~1e-7 anyway.
    hf = tf.KimiLinearAttention(hf_cfg, layer_idx=0)
    mla = make_mla().float()
    assert hf.kv_a_layernorm.variance_epsilon == mla.kv_a_layernorm.eps
    missing, unexpected = hf.load_state_dict(mla.state_dict(), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 7, 32)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    y_hf, _ = hf(x, attention_mask=mask)
    torch.testing.assert_close(mla(x), y_hf, rtol=2e-6, atol=5e-7)  # tight enough to catch eps=1e-5
