"""KDA's short convolution: ``[B,T,C]`` in and out, W shifted multiply-adds with a hand-written backward.

The conv used to be ``F.conv1d`` on a transposed copy (issue 17 item 2: the transposes and mkldnn's depthwise
backward cost ~2.5x the taps, bench/kda_layer.py). Values and gradients are checked against a plain loop over
taps and time steps (fp64), with and without the SiLU, for T shorter than the kernel, and in bf16 against the
previous ``F.conv1d`` formulation.
"""

import pytest
import torch
import torch.nn.functional as F

from attnres_train.model.kda_ops import short_conv


def _taps_reference(x, w, silu):
    B, T, C = x.shape
    W = w.shape[-1]
    ref = torch.zeros(B, T, C, dtype=x.dtype)
    for t in range(T):  # y_t[c] = sum_j w[c, W-1-j] x_{t-j}[c], zero before the sequence
        for j in range(min(W, t + 1)):
            ref[:, t] = ref[:, t] + w[:, 0, W - 1 - j] * x[:, t - j]
    return ref * torch.sigmoid(ref) if silu else ref


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("T", [11, 2, 1])
def test_short_conv_output_is_contiguous_and_equals_the_taps_formula(silu, T):
    g = torch.Generator().manual_seed(0)
    B, C, W = 2, 24, 4
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 1, W, generator=g, dtype=torch.float64, requires_grad=True)
    y = short_conv(x, w, silu=silu)
    assert y.is_contiguous() and y.shape == (B, T, C)
    ref = _taps_reference(x, w, silu)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w), gy)
    want = torch.autograd.grad(ref, (x, w), gy)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_short_conv_input_view_and_gradcheck():
    """A column slice of a wider tensor as input (non-contiguous rows); torch's gradcheck on the Function."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(1, 7, 10, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: short_conv(a[..., 2:8], b, silu=True), (wide, w))


def test_short_conv_bf16_matches_conv1d_and_keeps_weight_dtype():
    g = torch.Generator().manual_seed(2)
    B, T, C, W = 2, 9, 16, 4
    x = torch.randn(B, T, C, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(C, 1, W, generator=g, requires_grad=True)  # fp32 master weight, bf16 compute
    y = short_conv(x, w, silu=True)
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), w.to(x.dtype), groups=C).transpose(1, 2))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.shape == w.shape and x.grad.dtype == torch.bfloat16
