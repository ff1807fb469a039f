"""KDA's short convolution returns q/k/v in ``[B,T,C]`` memory order (issue 17 item 2).

The transposed view of the conv output made SiLU's backward and the later per-head ops run on mixed strides;
values are unchanged (the conv itself is the same call), only the layout: checked against a plain loop.
"""

import torch

from attnres_train.model.kda_ops import short_conv


def test_short_conv_output_is_contiguous_and_equals_the_taps_formula():
    g = torch.Generator().manual_seed(0)
    B, T, C, W = 2, 11, 24, 4
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 1, W, generator=g, dtype=torch.float64, requires_grad=True)
    y = short_conv(x, w, silu=True)
    assert y.is_contiguous() and y.shape == (B, T, C)
    ref = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):  # y_t[c] = silu(sum_j w[c, W-1-j] x_{t-j}[c]), zero before the sequence
        for j in range(min(W, t + 1)):
            ref[:, t] = ref[:, t] + w[:, 0, W - 1 - j] * x[:, t - j]
    ref = ref * torch.sigmoid(ref)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w), gy)
    want = torch.autograd.grad(ref, (x, w), gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
