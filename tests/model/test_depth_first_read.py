"""The segment cache's finished first read, unread combine outputs, and phase 2 at extreme logit gaps.

``SegmentLogits.phase1(..., first_reads_alone=True)`` normalises a block's first read inside the combine (no
phase-2 pass); the combine gives no gradient passes to outputs nobody read; phase 2 merges with a sigmoid of
the logit gap. Expected values come from the paper-equation reference of ``test_attnres_reference.py``
(own loops, own norms) and stats written here, not from ``attnres_train.model.depth``'s own reference.
"""

from __future__ import annotations

import pytest
import torch

from attnres_train.model.depth import SegmentLogits, phase1, phase2

from .helpers import DEPTH_EPS as EPS
from .helpers import CountFullSizeOps, rel_err
from .test_attnres_reference import attnres_read, rms_norm


def _logits(sources, q):
    """Per source ``[B,T]``: ⟨q, RMSNorm(v)⟩ in fp64 (the paper-equation reference's norm, gain 1)."""
    return [(q.double() * rms_norm(v.double(), 1.0, EPS)).sum(-1) for v in sources]


def _softmax_read(sources, q):
    """The AttnRes read by the paper-equation reference (gain 1: the gain is folded into q), in fp64."""
    return attnres_read([v.double() for v in sources], q.double(), 1.0, EPS)[0]


def _stats(sources, q):
    """Unnormalised phase-1 stats by hand: (Σ e^{s_j - m} v_j, m, Σ e^{s_j - m})."""
    s = _logits(sources, q)
    m = torch.stack(s).amax(0)
    e = [torch.exp(x - m) for x in s]
    return sum(w.unsqueeze(-1) * v.double() for w, v in zip(e, sources)), m, sum(e)


def _inputs(n, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = [(torch.randn(shape, generator=g) * (j + 1)).to(dtype).requires_grad_() for j in range(n)]
    q_all = (torch.randn(5, shape[-1], generator=g) * 0.5).to(
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    return blocks, q_all.requires_grad_()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_first_read_is_the_softmax_read_and_later_entries_are_stats(dtype, tol):
    """Sublayers 1..3 of a segment whose first query row is sublayer 0: entry 0 is sublayer 1's finished read
    (in the blocks' dtype), entries 1-2 the unnormalised stats of sublayers 2-3; all gradients match."""
    blocks, q_all = _inputs(3, (2, 5, 24), dtype)
    got = SegmentLogits(q_all, 0, EPS).phase1(blocks, [1, 2, 3], first_reads_alone=True)
    h = got[0]
    assert isinstance(h, torch.Tensor) and h.dtype == dtype and h.shape == blocks[0].shape
    assert rel_err(h, _softmax_read(blocks, q_all[1])) <= tol
    for (o, m, l_), q in zip(got[1:], (q_all[2], q_all[3])):
        o_x, m_x, l_x = _stats(blocks, q)
        assert rel_err(o, o_x) <= tol and rel_err(m, m_x) <= tol and rel_err(l_, l_x) <= tol

    # o and l are unnormalised against a max whose gradient phase 1 drops (a stabiliser): only o / l is a
    # function of the inputs alone, so the later entries enter the loss as o / l.
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(blocks[0].shape, generator=g, dtype=torch.float64) for _ in range(3)]
    reads = [h.double()] + [o.double() / l_.double().unsqueeze(-1) for o, _, l_ in got[1:]]
    loss = sum((r * wi).sum() for r, wi in zip(reads, w))
    want = sum((_softmax_read(blocks, q_all[k]) * wi).sum() for k, wi in zip((1, 2, 3), w))
    inputs = blocks + [q_all]
    for name, a, b in zip(
        ["b0", "b1", "b2", "q"], torch.autograd.grad(loss, inputs), torch.autograd.grad(want, inputs)
    ):
        assert rel_err(a, b) <= 10 * tol, name


def test_first_read_equals_phase2_of_the_plain_stats_bitwise_where_it_must():
    """The later entries are computed exactly as without the option (bit for bit: the columns are independent)."""
    blocks, q_all = _inputs(4, (1, 7, 16), torch.float32)
    a = SegmentLogits(q_all, 0, EPS).phase1(blocks, [2, 3, 4], first_reads_alone=True)
    b = SegmentLogits(q_all, 0, EPS).phase1(blocks, [2, 3, 4])
    for x, y in zip(a[1:], b[1:]):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    torch.testing.assert_close(a[0], phase2(b[0], None, q_all[2], EPS, torch.float32, "torch"), rtol=2e-6, atol=2e-6)


def test_an_unread_output_costs_no_backward_pass():
    """Reading only the second of two queries makes as many full-size passes in backward as a one-query call
    (before: zero gradients were materialised for the unread output and pushed through every source)."""
    n, shape = 4, (2, 16, 64)
    counts = {}
    for name, subs in (("two", [0, 1]), ("one", [1])):
        blocks, q_all = _inputs(n, shape, torch.float32)
        o = SegmentLogits(q_all, 0, EPS).phase1(blocks, subs)[-1][0]
        with CountFullSizeOps(2 * 16 * 64) as mode:
            grads = torch.autograd.grad((o * o).sum(), blocks + [q_all])
        counts[name] = mode.count
        assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert counts["two"] == counts["one"], counts


@pytest.mark.parametrize("gap", [-80.0, -20.0, 20.0, 80.0])
def test_phase2_merge_at_extreme_logit_gaps(gap):
    """fp32, the partial sum's logit ``gap`` above or below the blocks': output and gradients finite and as
    close to the fp64 softmax as fp32 allows (the merge uses sigmoid(±z), never exp of a large number)."""
    g = torch.Generator().manual_seed(3)
    d = 32
    q = torch.zeros(d)
    q[0] = gap
    blocks = [torch.randn(2, 6, d, generator=g) for _ in range(3)]
    partial = torch.randn(2, 6, d, generator=g)
    for b in blocks:  # the blocks' logits 0, the partial's ≈ ``gap`` (its RMS ≈ 1)
        b[..., 0] = 0.0
    partial[..., 0] = 1.0
    assert float(phase1([partial], q.unsqueeze(0), EPS, "torch")[0][1].abs().min()) > 0.5 * abs(gap)
    leaves = [b.clone().requires_grad_() for b in blocks] + [
        partial.clone().requires_grad_(),
        q.clone().requires_grad_(),
    ]
    *bl, p, qq = leaves
    stats = phase1(bl, qq.unsqueeze(0), EPS, "torch")[0]
    h = phase2(stats, p, qq, EPS, torch.float32, "torch")
    truth = _softmax_read([x.detach().double().requires_grad_() for x in bl + [p]], qq.detach().double())
    assert torch.isfinite(h).all()
    assert rel_err(h, truth) <= 1e-5
    w = torch.randn(h.shape, generator=g)
    got = torch.autograd.grad((h * w).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    want = torch.autograd.grad((_softmax_read(ref_leaves[:4], ref_leaves[4]) * w.double()).sum(), ref_leaves)
    for a, b in zip(got[:4], want[:4]):  # the sources' gradients, however small (e^-80 at gap 80), to 1e-4
        assert torch.isfinite(a).all() and rel_err(a, b) <= 1e-4
    # The query's gradient nearly cancels when one source takes all the weight (~1e-6 here, as in any fp32
    # form of the softmax): bounded against the scale of the read's gradients instead.
    scale = max(float(b.abs().max()) for b in want)
    assert torch.isfinite(got[4]).all() and float((got[4].double() - want[4]).abs().max()) <= 1e-5 * scale
