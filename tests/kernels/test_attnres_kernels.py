"""AttnRes Triton kernels (phase 1, phase-2 merge, backward) against the torch reference in ``model.depth``.

On CPU the kernels run in Triton's interpreter (see conftest.py), so shapes are tiny. The ground truth is the
direct softmax in fp64 over the same (possibly bf16-rounded) inputs; the torch reference in the input dtype
is measured against the same truth, and the kernels must be as close as it is (a small factor, plus one bf16
ulp: Triton's interpreter rounds fp32 -> bf16 by truncation, the GPU and torch round to nearest).
"""

from __future__ import annotations

import pytest
import torch

from attnres_train.model import depth as R
from tests.model.helpers import DEPTH_EPS as EPS
from tests.model.helpers import check_against_truth, depth_inputs, saved_tensors, two_phase

from .conftest import DEVICE

# (number of completed blocks, queries S, [B, T, d], with a partial sum)
SHAPES = [
    (1, 1, (2, 5, 48), True),  # a single source (+ partial): the output head of a 1-block model
    (1, 2, (1, 6, 32), False),  # a single source alone: o / l must be exactly that source
    (3, 4, (2, 9, 40), True),  # non-power-of-2 d, rows not a multiple of the tile
    (2, 3, (1, 17, 64), False),  # first sublayer of a block: no partial sum
    (5, 2, (3, 7, 100), True),  # d > one column chunk, non-power-of-2
]
IDS = [f"n{n}-S{s}-d{shape[-1]}-{'p' if hp else 'nop'}" for n, s, shape, hp in SHAPES]
TOL = {torch.float32: dict(out=2e-6, grad=2e-5), torch.bfloat16: dict(out=2**-7 + 1e-3, grad=3e-2)}


def _inputs(n, s, shape, has_p, dtype, seed=0):
    return depth_inputs(n, s, shape, has_p, dtype, seed, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,s,shape,has_p", SHAPES, ids=IDS)
def test_kernels_match_reference_outputs_and_grads(kops, n, s, shape, has_p, dtype):
    check_against_truth("triton", n, s, shape, has_p, dtype, TOL[dtype], DEVICE)


def test_phase1_stats_equal_reference(kops):
    blocks, _, q = _inputs(4, 3, (2, 11, 24), False, torch.float32, seed=3)
    for (o_k, m_k, l_k), (o_t, m_t, l_t) in zip(R.phase1(blocks, q, EPS, "triton"), R.phase1(blocks, q, EPS, "torch")):
        assert o_k.dtype == m_k.dtype == l_k.dtype == torch.float32
        torch.testing.assert_close(m_k, m_t, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(l_k, l_t, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(o_k, o_t, rtol=1e-6, atol=1e-5)
        assert not m_k.requires_grad and l_k.requires_grad and o_k.requires_grad


def test_kernel_merge_composes_with_torch_phase1(kops):
    """Phase 2 returns dh/dm, so it is exact on stats whose autograd routes m through amax (the reference)."""
    blocks, partial, q = _inputs(3, 2, (2, 4, 40), True, torch.float32, seed=5)
    stats = R.phase1(blocks, q, EPS, "reference")
    mixed = torch.stack([R.phase2(stats[i], partial, q[i], EPS, torch.float32, "triton") for i in range(2)])
    ref = two_phase(blocks, partial, q, torch.float32, "reference")
    torch.testing.assert_close(mixed, ref, rtol=1e-6, atol=1e-6)
    inputs = blocks + [partial, q]
    for a, b in zip(torch.autograd.grad(mixed.square().sum(), inputs), torch.autograd.grad(ref.square().sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_huge_logits_are_stable(kops):
    blocks, partial, _ = _inputs(4, 1, (1, 5, 32), True, torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(1, 32, generator=g) * 300.0).to(DEVICE).requires_grad_()  # logits ~1e3: naive exp overflows
    out = two_phase(blocks, partial, q, torch.float32, "triton")
    ref = two_phase(blocks, partial, q, torch.float32, "torch")
    assert torch.isfinite(out).all()
    # fp32 logits of magnitude ~1e3 carry rounding of ~6e-5 (one ulp), which the softmax weights inherit
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
    grads = torch.autograd.grad(out.sum(), blocks + [partial, q])
    assert all(torch.isfinite(g).all() for g in grads)


def test_mix_is_the_direct_softmax(kops):
    blocks, _, q = _inputs(3, 1, (2, 3, 20), False, torch.float32, seed=4)
    torch.testing.assert_close(kops.mix(blocks, q[0], EPS), R.mix_direct(blocks, q[0], EPS), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("has_p", [True, False], ids=["partial", "no-partial"])
def test_backward_keeps_no_per_source_fp32_intermediates(kops, has_p):
    """Only references to sources / partial / the output, the queries and per-token scalars are saved.

    The torch reference, by contrast, saves fp32 ``[B, T, d]`` copies of every source (checked too, so the probe
    works).
    """
    n, s, (b, t, d) = 4, 3, (2, 8, 64)
    blocks, partial, q = _inputs(n, s, (b, t, d), has_p, torch.bfloat16)
    rows = b * t

    def big_fp32(saved, allowed):
        ptrs = {x.untyped_storage().data_ptr() for x in allowed}
        return [
            tuple(x.shape)
            for x in saved
            if x.dtype == torch.float32 and x.numel() >= rows * d and x.untyped_storage().data_ptr() not in ptrs
        ]

    out, saved = saved_tensors(lambda: two_phase(blocks, partial, q, torch.bfloat16, "triton"))
    inputs = blocks + ([partial] if has_p else [])
    assert big_fp32(saved, inputs + [out]) == []
    # every saved tensor is a source reference, or at most S·d (queries) / 4·B·T and S·B·T fp32 scalars
    for x in saved:
        if x.untyped_storage().data_ptr() not in {y.untyped_storage().data_ptr() for y in inputs}:
            assert x.numel() <= max(s * d, 4 * rows, s * rows) or x.dtype == torch.bfloat16, tuple(x.shape)
    _, saved_ref = saved_tensors(lambda: two_phase(blocks, partial, q, torch.bfloat16, "reference"))
    assert len(big_fp32(saved_ref, inputs)) >= n  # the reference keeps fp32 [B,T,d] copies of every source


def test_dispatch_uses_kernels_only_when_asked(kops, monkeypatch):
    calls = []
    real = kops.phase1
    monkeypatch.setattr(kops, "phase1", lambda *a: calls.append(1) or real(*a))
    blocks, _, q = _inputs(2, 1, (1, 3, 16), False, torch.float32)
    R.phase1(blocks, q, EPS, "torch")
    R.phase1([b.double() for b in blocks], q.double(), EPS, "triton")  # fp64 always uses the reference
    assert calls == []
    R.phase1(blocks, q, EPS, "triton")
    assert calls == [1]
    assert R.resolve_impl("auto", blocks[0]) == ("triton" if DEVICE.type == "cuda" else "torch")
