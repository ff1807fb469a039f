"""KDA math and layer tests (design doc kimi_linear.md §4.4).

The chunked WY/UT form must reproduce the per-token recurrence (outputs, final state, gradients) to fp64
round-off, stay finite for extreme gates, and the layer must be causal and match its reference core.
The fla comparison runs only where CUDA and fla are both available.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnres_train.config.model import KDAConfig, ModelConfig
from attnres_train.model.kda import KimiDeltaAttention
from attnres_train.model.kda_intra import intra_chunk_products, sub_sizes
from attnres_train.model.kda_ops import kda_chunked, kda_gate, kda_recurrent, l2norm, short_conv

F64 = torch.float64


def make_inputs(B=2, T=37, H=2, K=8, V=6, dtype=F64, seed=0, g_scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    q = F.normalize(rn(B, T, H, K), dim=-1)
    k = F.normalize(rn(B, T, H, K), dim=-1)
    v = rn(B, T, H, V)
    g = F.logsigmoid(rn(B, T, H, K)) * g_scale
    beta = torch.sigmoid(rn(B, T, H))
    h0 = rn(B, H, K, V)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, g, beta)] + [h0.to(device)]


# ----------------------------------------------------------------------------- (i) forward parity
@pytest.mark.parametrize("chunk_size", [8, 16, 32])
@pytest.mark.parametrize("T", [37, 32, 5])
def test_chunked_matches_recurrent_fp64(chunk_size, T):
    q, k, v, g, beta, h0 = make_inputs(T=T)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = kda_chunked(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    assert o.dtype == F64 and s.dtype == F64 and o.shape == v.shape and s.shape == h0.shape
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)
    # Not trivially equal to the zero-state result: the initial state really enters.
    o0, _ = kda_chunked(q, k, v, g, beta, chunk_size=chunk_size)
    assert (o0 - o).abs().max() > 1e-3


def test_zero_initial_state_and_no_final_state():
    q, k, v, g, beta, _ = make_inputs(T=20)
    o_ref, s_none = kda_recurrent(q, k, v, g, beta)
    o, s_none2 = kda_chunked(q, k, v, g, beta, chunk_size=8)
    assert s_none is None and s_none2 is None
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    # scale argument is honoured identically by both forms
    o_ref2, _ = kda_recurrent(q, k, v, g, beta, scale=0.7)
    o2, _ = kda_chunked(q, k, v, g, beta, scale=0.7, chunk_size=8)
    torch.testing.assert_close(o2, o_ref2, rtol=0, atol=1e-10)
    torch.testing.assert_close(o2, o * 0.7 * math.sqrt(8), rtol=0, atol=1e-10)  # o is linear in q


def test_prefill_then_continue_equals_full_pass():
    q, k, v, g, beta, h0 = make_inputs(T=45)
    o_full, s_full = kda_chunked(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    o1, s1 = kda_chunked(
        *(x[:, :19] for x in (q, k, v, g, beta)), initial_state=h0, output_final_state=True, chunk_size=16
    )
    o2, s2 = kda_chunked(
        *(x[:, 19:] for x in (q, k, v, g, beta)), initial_state=s1, output_final_state=True, chunk_size=16
    )
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full, rtol=0, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=0, atol=1e-10)


def test_zero_padding_is_state_neutral():
    q, k, v, g, beta, h0 = make_inputs(T=13)
    _, s = kda_recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    z = lambda x: torch.cat([x, torch.zeros_like(x[:, :5])], 1)
    _, s_pad = kda_recurrent(z(q), z(k), z(v), z(g), z(beta), initial_state=h0, output_final_state=True)
    torch.testing.assert_close(s_pad, s, rtol=0, atol=1e-12)


def test_fp32_and_bf16_dtypes():
    q, k, v, g, beta, h0 = make_inputs(T=33, dtype=torch.float32)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=h0.float(), output_final_state=True)
    o, s = kda_chunked(q, k, v, g, beta, initial_state=h0.float(), output_final_state=True, chunk_size=16)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-5)
    ob, sb = kda_chunked(
        q.bfloat16(),
        k.bfloat16(),
        v.bfloat16(),
        g,
        beta,
        initial_state=h0.float(),
        output_final_state=True,
        chunk_size=16,
    )
    assert ob.dtype == torch.bfloat16 and sb.dtype == torch.float32  # o in v's dtype, state kept fp32
    assert (ob.float() - o_ref).abs().max() < 0.1


# ----------------------------------------------------------------------------- (ii) gradient parity
def _grads(fn, inputs, seed=1):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, s = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (
        s * torch.randn(s.shape, generator=gen, dtype=s.dtype)
    ).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("chunk_size", [8, 16])
def test_chunked_gradients_match_recurrent_fp64(chunk_size):
    inputs = make_inputs(B=1, T=21, H=2, K=4, V=5)
    ref = _grads(
        lambda q, k, v, g, b, h: kda_recurrent(q, k, v, g, b, initial_state=h, output_final_state=True), inputs
    )
    got = _grads(
        lambda q, k, v, g, b, h: kda_chunked(
            q, k, v, g, b, initial_state=h, output_final_state=True, chunk_size=chunk_size
        ),
        inputs,
    )
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), got, ref):
        assert b.abs().max() > 1e-6, name  # the gradient is non-trivial
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


# ----------------------------------------------------------------------------- (iii) gradcheck
@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_gradcheck(form):
    q, k, v, g, beta, h0 = make_inputs(B=1, T=10, H=1, K=4, V=3, seed=3)
    if form == "recurrent":
        fn = lambda *a: kda_recurrent(*a[:5], initial_state=a[5], output_final_state=True)
    else:
        fn = lambda *a: kda_chunked(*a[:5], initial_state=a[5], output_final_state=True, chunk_size=4)
    args = tuple(x.detach().clone().requires_grad_(True) for x in (q, k, v, g, beta, h0))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- (iv) extreme gates
@pytest.mark.parametrize("g_value", [-50.0, -2500.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_extreme_gates_finite_and_correct(g_value, dtype):
    q, k, v, _, beta, h0 = make_inputs(B=1, T=40, H=2, K=8, V=4, dtype=dtype)
    # constant strong decay, plus a random part so channels differ; cumulative decay per chunk >> 88 nats
    g = (g_value * (1 + torch.rand(q.shape, generator=torch.Generator().manual_seed(5), dtype=F64))).to(dtype)
    h0 = h0.to(dtype)
    inputs = [q, k, v, g, beta, h0]
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, s = kda_chunked(*leaves[:5], initial_state=leaves[5], output_final_state=True, chunk_size=16)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    (o.sum() + s.sum()).backward()
    for x in leaves:
        assert torch.isfinite(x.grad).all()
    # state is essentially forgotten each step: S_t ~ beta_t k_t v_t^T
    o_ref, s_ref = kda_recurrent(*inputs[:5], initial_state=h0, output_final_state=True)
    tol = 1e-10 if dtype == F64 else 1e-5
    torch.testing.assert_close(o.detach(), o_ref, rtol=0, atol=tol)
    torch.testing.assert_close(s.detach(), s_ref, rtol=0, atol=tol)
    if dtype == F64:
        ref = _grads(lambda *a: kda_recurrent(*a[:5], initial_state=a[5], output_final_state=True), inputs)
        got = _grads(lambda *a: kda_chunked(*a[:5], initial_state=a[5], output_final_state=True, chunk_size=16), inputs)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- (iv-b) intra-chunk products
def naive_intra(q, k, G):
    """``[M, M, K]`` reference: D[r,i] = exp(G_r - G_i) for i <= r (masked to -inf before exp)."""
    M = q.shape[-2]
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    D = (G.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~causal[:, :, None], float("-inf")).exp()
    Dk = D * k.unsqueeze(-3)
    return (Dk * q.unsqueeze(-2)).sum(-1), (Dk * k.unsqueeze(-2)).sum(-1)


@pytest.mark.parametrize(
    "M,sizes,g_scale",
    [(64, (16, 4), 1.0), (64, (16, 8), 30.0), (16, (4,), 1.0), (12, (6, 2), 1.0), (8, (), 1.0), (64, (16,), 2500.0)],
)
def test_intra_chunk_products_match_naive(M, sizes, g_scale):
    gen = torch.Generator().manual_seed(M)
    q, k = (torch.randn(2, 3, M, 8, generator=gen, dtype=F64) for _ in range(2))
    G = (F.logsigmoid(torch.randn(2, 3, M, 8, generator=gen, dtype=F64)) * g_scale).cumsum(-2)
    a = [x.clone().requires_grad_(True) for x in (q, k, G)]
    b = [x.clone().requires_grad_(True) for x in (q, k, G)]
    got, ref = intra_chunk_products(*a, sizes), naive_intra(*b)
    wq, wk = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    ((got[0] * wq).sum() + (got[1] * wk).sum()).backward()
    ((ref[0] * wq).sum() + (ref[1] * wk).sum()).backward()
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    for name, x, y in zip("qkG", a, b):
        assert torch.isfinite(x.grad).all(), name
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-11, msg=lambda m, n=name: f"d{n}: {m}")


def test_intra_chunk_products_gradcheck_and_sizes():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 12, 4, generator=gen, dtype=F64, requires_grad=True) for _ in range(2))
    G = F.logsigmoid(torch.randn(1, 1, 12, 4, generator=gen, dtype=F64)).cumsum(-2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: intra_chunk_products(*a, (6, 2)), (q, k, G))
    assert sub_sizes(64) == (16, 8) and sub_sizes(16) == (8,) and sub_sizes(4) == ()
    assert sub_sizes(12, (16, 5)) == (4,) and sub_sizes(37) == (1,)  # clipped to divisors


# ----------------------------------------------------------------------------- (v) gate / helpers
def test_kda_gate_closed_form():
    gen = torch.Generator().manual_seed(0)
    B, T, H, K = 2, 3, 4, 5
    raw = torch.randn(B, T, H, K, generator=gen) * 10  # exercises softplus' threshold branch (> 20)
    A_log = torch.randn(H, generator=gen)
    dt_bias = torch.randn(H * K, generator=gen)
    g = kda_gate(raw, A_log, dt_bias)
    assert g.dtype == torch.float32 and g.shape == raw.shape and (g <= 0).all()
    expected = torch.empty(B, T, H, K, dtype=F64)
    for h in range(H):
        for c in range(K):
            x = raw[..., h, c].double() + float(dt_bias[h * K + c])
            expected[..., h, c] = -math.exp(float(A_log[h])) * torch.log1p(torch.exp(x))
    torch.testing.assert_close(g.double(), expected, rtol=1e-6, atol=1e-6)
    # checkpoint layout [1,1,H,1] for A_log, bf16 raw input -> still fp32 output
    g2 = kda_gate(raw.bfloat16(), A_log.view(1, 1, H, 1), dt_bias)
    assert g2.dtype == torch.float32
    torch.testing.assert_close(g2, kda_gate(raw.bfloat16().float(), A_log, dt_bias))
    assert kda_gate(raw.double(), A_log, dt_bias).dtype == F64


def test_l2norm_and_short_conv():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=gen, dtype=F64)
    torch.testing.assert_close(l2norm(x), x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(l2norm(x).norm(dim=-1), torch.ones(3, 7, dtype=F64), atol=1e-6, rtol=0)
    B, T, C, W = 2, 9, 6, 4
    x = torch.randn(B, T, C, generator=gen, dtype=F64)
    w = torch.randn(C, 1, W, generator=gen, dtype=F64)
    y = short_conv(x, w)
    ref = F.conv1d(x.transpose(1, 2), w, padding=W - 1, groups=C)[..., :T].transpose(1, 2)
    torch.testing.assert_close(y, ref)
    # explicit formula y_t[c] = sum_j w[c, W-1-j] x_{t-j}[c]
    t, c = 5, 2
    assert abs(float(y[1, t, c]) - sum(float(w[c, 0, W - 1 - j] * x[1, t - j, c]) for j in range(W))) < 1e-12
    torch.testing.assert_close(short_conv(x, w, silu=True), F.silu(ref))


# ----------------------------------------------------------------------------- (vi) the layer
def tiny_cfg(**kda):
    base = dict(num_heads=2, head_dim=8, conv_size=4, chunk_size=8, impl="torch")
    base.update(kda)
    return ModelConfig(hidden_size=32, kda=KDAConfig(**base))


def make_layer(dtype=F64, **kda):
    torch.manual_seed(0)
    layer = KimiDeltaAttention(tiny_cfg(**kda))
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.2)  # larger than the model's 0.02 so the core matters numerically
    layer.init_weights(0.02)
    return layer.to(dtype)


def test_layer_parameter_names_and_shapes():
    layer = KimiDeltaAttention(tiny_cfg())
    d, H, K = 32, 2, 8
    expected = {
        "q_proj.weight": (H * K, d),
        "k_proj.weight": (H * K, d),
        "v_proj.weight": (H * K, d),
        "q_conv1d.weight": (H * K, 1, 4),
        "k_conv1d.weight": (H * K, 1, 4),
        "v_conv1d.weight": (H * K, 1, 4),
        "f_a_proj.weight": (K, d),
        "f_b_proj.weight": (H * K, K),
        "A_log": (H,),
        "dt_bias": (H * K,),
        "b_proj.weight": (H, d),
        "g_a_proj.weight": (K, d),
        "g_b_proj.weight": (H * K, K),
        "o_norm.weight": (K,),
        "o_proj.weight": (d, H * K),
    }
    got = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert got == expected


def test_layer_init_weights():
    layer = KimiDeltaAttention(tiny_cfg(num_heads=64, head_dim=16))
    layer.init_weights(0.02)
    A = layer.A_log.exp()
    assert (A >= 1).all() and (A <= 16).all() and A.std() > 1
    dt = F.softplus(layer.dt_bias)  # inverse-softplus round trip -> dt in [1e-4 floor, 1e-1]
    assert dt.min() >= 1e-4 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert dt.log().min() < math.log(3e-3) and dt.log().max() > math.log(3e-2)  # spread over the log range
    bound = 1 / math.sqrt(4)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in), fan_in = W
    for conv in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d):
        assert conv.weight.abs().max() <= bound and conv.weight.std() > 0.1 * bound
    assert torch.equal(layer.o_norm.weight, torch.ones(16))


def test_layer_forward_shape_causality_and_reference():
    layer = make_layer()
    B, T, d = 2, 21, 32  # T not a multiple of chunk_size=8
    x = torch.randn(B, T, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert y.shape == (B, T, d) and y.dtype == F64 and torch.isfinite(y).all() and y.abs().max() > 1e-3
    torch.testing.assert_close(y, layer(x, core="recurrent"), rtol=0, atol=1e-10)
    for t in (0, 7, 8, 15):
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
        y2 = layer(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)
        assert (y2[:, t + 1] - y[:, t + 1]).abs().max() > 1e-6
    # gradients reach every parameter and are finite
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_layer_fp32_finite_and_close_to_fp64():
    layer = make_layer()
    x = torch.randn(2, 40, 32, dtype=F64, generator=torch.Generator().manual_seed(2))
    y64 = layer(x)
    layer32 = make_layer(torch.float32)
    y32 = layer32(x.float())
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all()
    torch.testing.assert_close(y32.double(), y64, rtol=0, atol=1e-4)


def test_layer_impl_selection_on_cpu():
    x = torch.randn(1, 5, 32)
    assert make_layer(torch.float32, impl="auto").resolve_core(x.device) == "chunk"
    assert make_layer(torch.float32, impl="torch").resolve_core(x.device) == "chunk"
    with pytest.raises(RuntimeError, match="CUDA"):
        make_layer(torch.float32, impl="fla")(x)
    with pytest.raises(ValueError, match="core"):
        make_layer(torch.float32)(x, core="nope")


# ----------------------------------------------------------------------------- (vii) fla oracle
def _fla_chunk_kda_or_none():
    if not torch.cuda.is_available():
        return None
    try:
        from fla.ops.kda import chunk_kda
    except Exception:
        return None
    return chunk_kda


def _rel_rmse(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


@pytest.mark.gpu
@pytest.mark.skipif(_fla_chunk_kda_or_none() is None, reason="needs CUDA and flash-linear-attention")
def test_matches_fla_chunk_kda_on_cuda():
    chunk_kda = _fla_chunk_kda_or_none()
    q, k, v, g, beta, h0 = make_inputs(B=2, T=300, H=4, K=64, V=64, dtype=torch.float32, device="cuda", g_scale=0.1)
    h0 = h0.float()
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    o, s = kda_chunked(*leaves[:5], initial_state=leaves[5], output_final_state=True, chunk_size=64)
    fla_leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    o_f, s_f = chunk_kda(*fla_leaves[:5], initial_state=fla_leaves[5], output_final_state=True)
    assert _rel_rmse(o, o_f) < 5e-3 and _rel_rmse(s, s_f) < 5e-3
    do, ds = torch.randn_like(o), torch.randn_like(s)
    torch.autograd.backward((o, s), (do, ds))
    torch.autograd.backward((o_f, s_f), (do, ds))
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), leaves, fla_leaves):
        assert _rel_rmse(a.grad, b.grad) < 5e-3, name
    # the layer's fla path agrees with its torch path
    layer = make_layer(torch.float32, impl="auto", chunk_size=64).cuda()
    x = torch.randn(2, 130, 32, device="cuda")
    assert layer.resolve_core(x.device) == "fla"
    assert _rel_rmse(layer(x), layer(x, core="chunk")) < 5e-3
