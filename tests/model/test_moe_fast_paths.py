"""The MoE's hand-written autograd paths (issue 17) against plain implementations built from raw per-row ops.

Why: ``_PerExpertSwiGLU`` (the per-expert fallback: fp64, CPU under compile) and ``_CombineRows`` (the combine
outside autocast) compute their gradients by hand; a plain loop over tokens / rows with autograd is the
independent reference (fp64: equal up to rounding), and the combine is also checked bitwise against the autograd
formulation it replaced (``index_select`` + ``bmm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnres_train.model.moe import GroupedExperts, MoE, _experts_loop

from .test_moe import make_cfg

F64 = torch.float64


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _plain_experts(x_ND, counts, w1, w3, w2):
    """Row by row: expert of row r from the counts, SwiGLU written out with sigmoid, products and sums."""
    expert_of_row = [j for j, c in enumerate(counts) for _ in range(c)]
    rows = []
    for r, j in enumerate(expert_of_row):
        a = (w1[j] * x_ND[r]).sum(-1)
        b = (w3[j] * x_ND[r]).sum(-1)
        h = a * torch.sigmoid(a) * b
        rows.append((w2[j] * h).sum(-1))
    return torch.stack(rows)


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad, allow_unused=True)


def test_per_expert_swiglu_matches_plain_rows_fp64():
    torch.manual_seed(0)
    E, D, FF = 6, 16, 8
    counts = [3, 0, 5, 1, 0, 4]  # two experts without rows: their weight gradients are zero, not garbage
    x = torch.randn(sum(counts), D, dtype=F64)
    ws = [torch.randn(E, FF, D, dtype=F64), torch.randn(E, FF, D, dtype=F64), torch.randn(E, D, FF, dtype=F64)]
    g = torch.randn(sum(counts), D, dtype=F64)
    xa, *wa = (_leaf(t) for t in (x, *ws))
    xb, *wb = (_leaf(t) for t in (x, *ws))
    y = _experts_loop(xa, torch.tensor(counts), *wa)
    ref = _plain_experts(xb, counts, *wb)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-13)
    for got, want in zip(_grads(y, [xa, *wa], g), _grads(ref, [xb, *wb], g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    gw1 = _grads(_experts_loop(_leaf(x), counts, *wa), wa[:1], g)[0]
    assert torch.equal(gw1[1], torch.zeros_like(gw1[1])) and torch.equal(gw1[4], torch.zeros_like(gw1[4]))


def test_per_expert_swiglu_gradcheck_and_partial_inputs():
    torch.manual_seed(1)
    counts = [2, 0, 3]
    x = _leaf(torch.randn(5, 4, dtype=F64))
    ws = [_leaf(torch.randn(3, 6, 4, dtype=F64)), _leaf(torch.randn(3, 6, 4, dtype=F64))]
    w2 = _leaf(torch.randn(3, 4, 6, dtype=F64))
    assert torch.autograd.gradcheck(lambda x, a, b, c: _experts_loop(x, counts, a, b, c), (x, *ws, w2))
    # only the weights need a gradient (x a constant), and a frozen w2
    y = _experts_loop(x.detach(), counts, *ws, w2.detach())
    ref = _plain_experts(x.detach(), counts, *ws, w2.detach())
    g = torch.randn_like(y)
    for got, want in zip(_grads(y, ws, g), _grads(ref, ws, g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_loop_impl_on_a_weight_slice_matches_plain_rows():
    """``GroupedExperts(impl='loop')`` with ``expert_offset`` passes weight slices; gradients land in the slice."""
    torch.manual_seed(2)
    ge = GroupedExperts(6, 16, 8, init_std=0.5, impl="loop").double()
    counts = [3, 0, 4]  # experts 2, 3, 4
    x = torch.randn(7, 16, dtype=F64)
    g = torch.randn(7, 16, dtype=F64)
    ge(x, counts, expert_offset=2).backward(g)
    ws = [_leaf(getattr(ge, n).detach()) for n in ("w1", "w3", "w2")]
    _plain_experts(x, counts, *(w[2:5] for w in ws)).backward(g)
    for name, w in zip(("w1", "w3", "w2"), ws):
        torch.testing.assert_close(getattr(ge, name).grad, w.grad, rtol=1e-12, atol=1e-13)


def _plain_combine(y_sorted_ND, weight_TK, order_N):
    """Token by token: the sorted row of slot t*K + k is the r with order_N[r] == t*K + k."""
    T, K = weight_TK.shape
    row_of_slot = {int(slot): r for r, slot in enumerate(order_N)}
    out = []
    for t in range(T):
        acc = torch.zeros_like(y_sorted_ND[0])
        for k in range(K):
            acc = acc + weight_TK[t, k] * y_sorted_ND[row_of_slot[t * K + k]]
        out.append(acc)
    return torch.stack(out)


def test_combine_matches_plain_tokens_fp64():
    torch.manual_seed(3)
    moe = MoE(make_cfg(num_experts=6, top_k=3)).double()
    x = torch.randn(2, 5, 16, dtype=F64)
    idx, w, _ = moe.route(x.reshape(10, 16))
    _, _, plan = moe.dispatch(x.reshape(10, 16), idx)
    y = torch.randn(30, 16, dtype=F64)
    g = torch.randn(2, 5, 16, dtype=F64)
    ya, wa, yb, wb = _leaf(y), _leaf(w), _leaf(y), _leaf(w)
    out = moe.combine(ya, wa, plan, F64, (2, 5))
    ref = _plain_combine(yb, wb, plan.order_N).view(2, 5, 16)
    assert out.shape == (2, 5, 16) and not out._is_view()  # a tensor of its own (FSDP2 hooks)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    for got, want in zip(_grads(out, [ya, wa], g), _grads(ref, [yb, wb], g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(lambda y, w: moe.combine(y, w, plan, F64), (_leaf(y), _leaf(w)))


def test_combine_bitwise_equal_to_autograd_formulation_fp32():
    """The previous combine (permutation ``index_select`` + bmm under autograd): same bits, fwd and bwd."""
    torch.manual_seed(4)
    moe = MoE(make_cfg(num_experts=8, top_k=4))
    x = torch.randn(33, 16)
    idx, w, _ = moe.route(x)
    _, _, plan = moe.dispatch(x, idx)
    y = torch.randn(33 * 4, 16)
    g = torch.randn(33, 16)
    ya, wa, yb, wb = _leaf(y), _leaf(w), _leaf(y), _leaf(w)
    out = moe.combine(ya, wa, plan, torch.float32)
    inverse = torch.empty_like(plan.order_N)
    inverse[plan.order_N] = torch.arange(plan.order_N.numel())

    def previous():
        return torch.bmm(wb.view(-1, 1, 4), yb.index_select(0, inverse).view(-1, 4, 16)).view(33, 16)

    ref = previous()
    assert torch.equal(out, ref)
    for got, want in zip(_grads(out, [ya, wa], g), _grads(ref, [yb, wb], g)):
        assert torch.equal(got, want)
    # an expanded output gradient (from .sum()) takes the same path
    moe.combine(ya, wa, plan, torch.float32).sum().backward()
    previous().sum().backward()
    assert torch.equal(ya.grad, yb.grad) and torch.equal(wa.grad, wb.grad)


def test_moe_layer_fp64_matches_plain_dense_reference():
    """The whole layer on the fp64 (loop) path: every token through its top-k experts with raw ops."""
    torch.manual_seed(5)
    moe = MoE(make_cfg(num_experts=6, top_k=2)).double()
    x = _leaf(torch.randn(1, 9, 16, dtype=F64))
    y, _ = moe(x)
    g = torch.randn_like(y)
    params = list(moe.parameters())
    got = _grads(y, [x, *params], g)
    x2 = _leaf(x)
    idx, w, _ = moe.route(x2[0])
    e = moe.experts
    ref = []
    for t in range(9):
        acc = moe.shared_experts(x2[0, t])
        for k in range(2):
            j = int(idx[t, k])
            h = F.silu(e.w1[j] @ x2[0, t]) * (e.w3[j] @ x2[0, t])
            acc = acc + w[t, k] * (e.w2[j] @ h)
        ref.append(acc)
    ref = torch.stack(ref).view(1, 9, 16)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-13)
    for a, b in zip(got, _grads(ref, [x2, *params], g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
