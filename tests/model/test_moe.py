"""MoE: router semantics, dropless dense-reference equality (fwd + grads, fp64), aux loss, bias updates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnres_train.config.model import ModelConfig, MoEConfig
from attnres_train.model.moe import GroupedExperts, MoE, Router, _grouped_mm_usable


def make_cfg(**moe) -> ModelConfig:
    base = dict(num_experts=6, top_k=2, intermediate_size=8, num_shared_experts=1)
    base.update(moe)
    return ModelConfig(hidden_size=16, moe=MoEConfig(**base))


def router_with_logits(logits, **moe) -> tuple[Router, torch.Tensor]:
    """A Router whose single token x = e_0 gets exactly ``logits`` (weight column 0)."""
    E = len(logits)
    r = Router(make_cfg(num_experts=E, **moe))
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, 0] = torch.tensor(logits)
    x = torch.zeros(1, 16)
    x[0, 0] = 1.0
    return r, x


# ----------------------------------------------------------------------------------------------- router
def test_router_bias_selects_but_weights_are_unbiased():
    r, x = router_with_logits([2.0, 1.0, 0.0, -1.0], top_k=2, renormalize=False, routed_scaling_factor=1.0)
    s = torch.sigmoid(torch.tensor([2.0, 1.0, 0.0, -1.0]))
    idx, w, scores = r(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    torch.testing.assert_close(scores[0], s)
    r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # expert 2 now beats expert 1
    idx, w, scores = r(x)
    assert idx.dtype == torch.long and w.dtype == torch.float32 and scores.dtype == torch.float32
    pairs = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert set(pairs) == {0, 2}
    assert pairs[2] == pytest.approx(s[2].item(), rel=1e-6)  # unbiased score 0.5, not 5.5
    assert pairs[0] == pytest.approx(s[0].item(), rel=1e-6)
    torch.testing.assert_close(scores[0], s)  # returned scores are unbiased too


def test_router_renormalize_and_scaling():
    r, x = router_with_logits([2.0, 1.0, 0.0, -1.0], top_k=2, renormalize=True, routed_scaling_factor=2.446)
    r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    s = torch.sigmoid(torch.tensor([2.0, 1.0, 0.0, -1.0]))
    idx, w, _ = r(x)
    pairs = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert pairs[0] == pytest.approx(2.446 * s[0].item() / (s[0] + s[2]).item(), rel=1e-6)
    assert pairs[2] == pytest.approx(2.446 * s[2].item() / (s[0] + s[2]).item(), rel=1e-6)
    assert w.sum().item() == pytest.approx(2.446, rel=1e-6)


def test_router_bias_in_weights_quirk():
    r, x = router_with_logits(
        [2.0, 1.0, 0.0, -1.0], top_k=2, renormalize=True, routed_scaling_factor=1.5, bias_in_weights=True
    )
    b = torch.tensor([0.0, 0.0, 5.0, 0.0])
    r.e_score_correction_bias.copy_(b)
    sb = torch.sigmoid(torch.tensor([2.0, 1.0, 0.0, -1.0])) + b
    idx, w, scores = r(x)
    pairs = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert set(pairs) == {0, 2}
    assert pairs[2] == pytest.approx(1.5 * sb[2].item() / (sb[0] + sb[2]).item(), rel=1e-6)
    assert pairs[0] == pytest.approx(1.5 * sb[0].item() / (sb[0] + sb[2]).item(), rel=1e-6)
    torch.testing.assert_close(scores[0], sb - b)  # scores stay unbiased (used by the aux loss)


def test_router_bias_is_fp32_buffer_without_grad():
    moe = MoE(make_cfg())
    names = dict(moe.named_parameters())
    assert "gate.e_score_correction_bias" not in names
    assert "gate.e_score_correction_bias" in moe.state_dict()  # persistent: saved in checkpoints
    assert "tokens_per_expert" not in moe.state_dict()  # non-persistent counter
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.tokens_per_expert.dtype == torch.float32
    y, _ = moe(torch.randn(1, 3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- dropless dense reference
def reference_moe(moe: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """Per-token loop: route from scratch (fp32 router, as specified), run each selected expert densely."""
    cfg_m = moe.gate
    # Logits batched like the module so the fp32 rounding is identical; everything after is per token.
    cdt = torch.promote_types(x_BTD.dtype, torch.float32)  # router logits: at least fp32, fp64 stays fp64
    s_BTE = torch.sigmoid(F.linear(x_BTD.to(cdt), moe.gate.weight.to(cdt)))
    out = torch.zeros_like(x_BTD)
    for b in range(x_BTD.shape[0]):
        for t in range(x_BTD.shape[1]):
            x = x_BTD[b, t]
            s = s_BTE[b, t]
            idx = torch.topk(s + moe.gate.e_score_correction_bias, cfg_m.top_k).indices
            w = s[idx]
            if cfg_m.renormalize:
                w = w / (w.sum() + 1e-20)
            w = w * cfg_m.routed_scaling_factor
            y = torch.zeros_like(x)
            for k, e in enumerate(idx.tolist()):
                h = F.silu(moe.experts.w1[e] @ x) * (moe.experts.w3[e] @ x)
                y = y + w[k].to(x.dtype) * (moe.experts.w2[e] @ h)
            if moe.shared_experts is not None:
                y = y + moe.shared_experts(x)
            out[b, t] = y
    return out


@pytest.mark.parametrize("renormalize,shared", [(True, 1), (False, 0), (True, 2)])
def test_dropless_matches_dense_reference_fp64(renormalize, shared):
    torch.manual_seed(0)
    moe = MoE(make_cfg(renormalize=renormalize, num_shared_experts=shared)).double()
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 6))
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)

    idx, _, _ = moe.route(x.reshape(-1, 16))
    assert idx.shape == (10, 2)
    assert all(len(set(row)) == 2 for row in idx.tolist())  # exactly k distinct experts, none dropped
    _, counts, _ = moe.dispatch(x.reshape(-1, 16), idx)
    assert counts.sum().item() == 10 * 2

    y, aux = moe(x)
    assert aux is None
    y_ref = reference_moe(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    params = [x] + [p for p in moe.parameters()]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for p, a, b in zip(params, grads, grads_ref):
        tol = 1e-5 if p is moe.gate.weight else 1e-10  # the router runs in fp32 by design
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert grads[1 + [n for n, _ in moe.named_parameters()].index("gate.weight")].abs().sum() > 0  # via weights
    if shared:
        assert moe.shared_experts.gate_proj.weight.shape == (8 * shared, 16)


def test_shared_expert_is_added():
    torch.manual_seed(1)
    moe = MoE(make_cfg()).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    y, _ = moe(x)
    shared = moe.shared_experts
    moe.shared_experts = None
    y_routed, _ = moe(x)
    torch.testing.assert_close(y - y_routed, shared(x), rtol=1e-12, atol=1e-13)
    assert shared(x).abs().max() > 1e-6


def test_dispatch_combine_roundtrip():
    torch.manual_seed(2)
    moe = MoE(make_cfg())
    x = torch.randn(7, 16)
    idx, w, _ = moe.route(x)
    xs, counts, plan = moe.dispatch(x, idx)
    sorted_experts = torch.repeat_interleave(torch.arange(6), counts)
    assert torch.equal(sorted_experts, idx.reshape(-1)[plan.order_N])  # rows grouped by expert
    # Identity "experts" + unit weights: combine must give K * x back.
    y = moe.combine(xs, torch.ones_like(w), plan, x.dtype)
    torch.testing.assert_close(y, 2 * x)


# ------------------------------------------------------------------------------------- grouped experts
def test_grouped_experts_expert_subset():
    torch.manual_seed(3)
    ge = GroupedExperts(6, 16, 8, init_std=0.5).double()
    counts = [3, 0, 4]  # rows for experts 2, 3, 4
    x = torch.randn(7, 16, dtype=torch.float64)
    y = ge(x, torch.tensor(counts), expert_offset=2)
    ref = []
    start = 0
    for j, c in enumerate(counts):
        e = 2 + j
        xe = x[start : start + c]
        ref.append((F.silu(xe @ ge.w1[e].T) * (xe @ ge.w3[e].T)) @ ge.w2[e].T)
        start += c
    torch.testing.assert_close(y, torch.cat(ref), rtol=1e-12, atol=1e-13)
    local = GroupedExperts(3, 16, 8).double()  # an EP rank that stores only experts [2, 5)
    with torch.no_grad():
        for n in ("w1", "w2", "w3"):
            getattr(local, n).copy_(getattr(ge, n)[2:5])
    torch.testing.assert_close(local(x, counts), y, rtol=0, atol=0)
    with pytest.raises(ValueError):
        ge(x, counts, expert_offset=4)
    with pytest.raises(ValueError):
        ge(x[:5], counts, expert_offset=2)


def test_grouped_experts_all_experts_uses_whole_weights():
    """All experts at offset 0 run on the parameters themselves (no full-range slice); same values and grads."""
    torch.manual_seed(6)
    ge = GroupedExperts(3, 16, 8, init_std=0.5).double()
    counts = [2, 0, 3]
    x = torch.randn(5, 16, dtype=torch.float64)
    y = ge(x, counts)
    g = torch.randn_like(y)
    y.backward(g)
    got = [ge.w1.grad.clone(), ge.w3.grad.clone(), ge.w2.grad.clone()]
    ge.zero_grad(set_to_none=True)
    sl = slice(0, 3)
    ref = ge.compute(x, counts, ge.w1[sl], ge.w3[sl], ge.w2[sl])
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for a, b in zip(got, (ge.w1.grad, ge.w3.grad, ge.w2.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got[0][1].abs().max() == 0  # the expert without rows gets a zero gradient


def test_grouped_mm_matches_loop_fp32():
    torch.manual_seed(4)
    x = torch.randn(11, 16)
    if not _grouped_mm_usable(x, 32):
        pytest.skip("torch.nn.functional.grouped_mm not usable here")
    fast = GroupedExperts(4, 16, 32, init_std=0.3, impl="grouped_mm")
    slow = GroupedExperts(4, 16, 32, impl="loop")
    slow.load_state_dict(fast.state_dict())
    counts = torch.tensor([5, 0, 2, 4])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa, counts), slow(xb, counts)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for n in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(fast, n).grad, getattr(slow, n).grad, rtol=1e-5, atol=1e-6)
    assert fast.w1.grad[1].abs().max() == 0  # the empty expert gets a zero gradient
    fast(xa, counts).sum().backward()  # expanded (stride-0) output gradient is accepted


# ------------------------------------------------------------------------------------------- aux loss
def test_seq_aux_loss_hand_computed():
    torch.manual_seed(5)
    E, K, B, T, coef = 4, 2, 2, 3, 0.01
    moe = MoE(make_cfg(num_experts=E, top_k=K, seq_aux_loss_coef=coef))
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)
    x = torch.randn(B, T, 16)
    _, aux = moe(x)
    idx, _, scores = moe.route(x.reshape(-1, 16))
    expected = 0.0
    for b in range(B):
        total = 0.0
        for i in range(E):
            hits = sum(1 for t in range(T) if i in idx[b * T + t].tolist())
            f_i = E / (K * T) * hits
            P_i = sum((scores[b * T + t, i] / scores[b * T + t].sum()).item() for t in range(T)) / T
            total += f_i * P_i
        expected += coef * total / B
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    aux.backward()
    assert moe.gate.weight.grad.abs().sum() > 0  # gradient flows through P (scores)
    moe.seq_aux_loss_coef = 0.0
    assert moe(x)[1] is None


# ------------------------------------------------------------------------------- load statistics / bias
def test_tokens_per_expert_counts_training_forwards_only():
    moe = MoE(make_cfg())
    x = torch.randn(2, 5, 16)
    moe.train()
    moe(x)
    moe(x)
    assert moe.tokens_per_expert.sum().item() == 2 * 2 * 5 * 2
    assert moe.last_tokens_per_expert.sum().item() == 2 * 5 * 2
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum().item() == 40  # eval forwards are not counted
    assert moe.load_imbalance() >= 1.0


def test_checkpoint_recompute_not_double_counted():
    moe = MoE(make_cfg()).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = checkpoint(lambda t: moe(t)[0], x, use_reentrant=False)
    y.square().sum().backward()
    assert moe.tokens_per_expert.sum().item() == 2 * 5 * 2
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("rule", ["sign", "centered"])
def test_update_bias_rules(rule):
    moe = MoE(make_cfg(num_experts=4, bias_update_rule=rule, bias_update_speed=0.01))
    moe.tokens_per_expert.copy_(torch.tensor([10.0, 0.0, 2.0, 0.0]))  # mean 3: expert 0 overloaded
    assert moe.load_imbalance() == pytest.approx(10 / 3)
    before = moe.gate.e_score_correction_bias.clone()
    moe.update_bias()
    delta = moe.gate.e_score_correction_bias - before
    sign = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    expected = 0.01 * (sign if rule == "sign" else sign - sign.mean())
    torch.testing.assert_close(delta, expected)
    assert delta[0] < 0 and (delta[1:] > 0).all()
    if rule == "centered":
        assert abs(delta.sum().item()) < 1e-7
    assert moe.tokens_per_expert.sum().item() == 0  # counter reset
    assert not moe.gate.e_score_correction_bias.requires_grad
    assert moe.gate.e_score_correction_bias.grad is None


def test_bias_update_rebalances_a_skewed_router():
    torch.manual_seed(6)
    moe = MoE(make_cfg(num_experts=4, top_k=1, bias_update_speed=0.05)).train()
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)
        moe.gate.weight[0, 0] = 6.0  # feature 0 is constant 1: expert 0 is strongly preferred
    x = torch.randn(4, 16, 16)
    x[..., 0] = 1.0
    moe(x)
    imbalance0 = moe.load_imbalance()
    assert imbalance0 > 3.5  # nearly every token on expert 0 (max possible is 4)
    for _ in range(40):
        moe.update_bias()
        moe(x)
    assert moe.gate.e_score_correction_bias[0] < 0
    assert moe.load_imbalance() < 1.5
    moe.tokens_per_expert.zero_()
    moe.update_bias()  # nothing counted: no change, no NaN
    assert torch.isfinite(moe.gate.e_score_correction_bias).all()


# ---------------------------------------------------------------------------------- transformers parity
def test_matches_transformers_kimi_linear_moe():
    tf = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    torch.manual_seed(7)
    hf_cfg = KimiLinearConfig(
        hidden_size=16,
        num_local_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        n_shared_experts=1,
        routed_scaling_factor=2.446,
        norm_topk_prob=True,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    hf = tf.KimiLinearMoE(hf_cfg)
    moe = MoE(make_cfg(routed_scaling_factor=2.446))
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 6))
    sd = moe.state_dict()
    hf_sd = {k: v for k, v in sd.items() if not k.startswith("experts.")}
    hf_sd["experts.gate_up_proj"] = torch.cat([sd["experts.w1"], sd["experts.w3"]], dim=1)
    hf_sd["experts.down_proj"] = sd["experts.w2"]
    hf.load_state_dict(hf_sd, strict=True)
    x = torch.randn(2, 5, 16)
    y, _ = moe(x)
    torch.testing.assert_close(y, hf(x), rtol=1e-5, atol=1e-6)
    assert math.isclose(hf.gate.routed_scaling_factor, moe.gate.routed_scaling_factor)
