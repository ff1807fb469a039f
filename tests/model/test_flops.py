"""FLOP counter: counts only active experts, matches torch's FlopCounterMode on the matmul parts."""

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from attnres_train.model import build_model
from attnres_train.model.flops import attnres_sources, forward_flops_per_token, train_flops_per_token

from .helpers import tiny_cfg


def test_train_is_three_times_forward_and_only_active_experts_count():
    cfg = tiny_cfg()
    f = forward_flops_per_token(cfg, 64)
    assert train_flops_per_token(cfg, 64) == 3 * f
    more = copy.deepcopy(cfg)
    more.moe.num_experts *= 4  # 4x the experts, same top-k: only the router grows
    router_growth = 2 * cfg.hidden_size * 3 * cfg.moe.num_experts * (cfg.num_layers - cfg.moe.first_k_dense)
    assert forward_flops_per_token(more, 64) - f == router_growth


def test_mla_and_dense_ffn_flops_match_torch_flop_counter():
    cfg = tiny_cfg(num_layers=2, vocab_size=512)
    cfg.mla_layers = [0, 1]
    cfg.moe.first_k_dense = 2  # all dense: a module-walk count is exact
    model = build_model(cfg)
    B, T = 2, 32
    ids = torch.randint(0, 512, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(ids)
    measured = counter.get_total_flops() / (B * T)
    ours = forward_flops_per_token(cfg, T)
    m = cfg.mla
    # torch counts the full T x T score matrix; we count the causal average (T+1)/2.
    attn_full = 2 * m.num_heads * T * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    attn_causal = attn_full * (T + 1) / (2 * T)
    expected = ours - 2 * (attn_causal - attn_full)
    assert abs(measured / expected - 1) < 0.01, (measured, expected)


def test_attnres_source_counts():
    assert attnres_sources(tiny_cfg("full", num_layers=2)) == [1, 2, 3, 4, 5]
    assert attnres_sources(tiny_cfg("block", num_blocks=2, num_layers=4)) == [1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert attnres_sources(tiny_cfg()) == []
