"""The input/weight split of a stage backward (``iw_split``): exact gradients, and W does not re-walk I's graph.

Reference: one plain ``autograd.backward`` over an identical copy (fp64). Re-traversal is measured by counting,
with a pre-hook on every node of the graph, how often each backward node runs in I and in W: the input-side
nodes (activations, the second layer's input matmul) must run once in total, in I; W runs only weight branches.
The old hook (``autograd.backward(roots, inputs=params)`` after I) re-runs them, shown for contrast.
"""

from __future__ import annotations

import collections
import copy

import torch
from torch import nn

from attnres_train.parallel.pipeline.iw_split import backward_input, backward_weight


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.b = nn.Linear(8, 5, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, cached):
        h = torch.nn.functional.silu(self.a(x)) + cached
        h = self.norm(h)
        y = torch.tanh(self.b(h)) * self.scale
        return y, (h**2).mean()  # an output (sent on) and an aux-like scalar root


def _graph_nodes(roots):
    seen, stack = set(), [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack += [f for f, _ in n.next_functions if f is not None]
    return seen


def _counting(nodes):
    counts, handles = collections.Counter(), []
    for n in nodes:
        handles.append(n.register_prehook(lambda g, n=n: counts.update([n.name()])))
    return counts, handles


def _setup(seed=0):
    torch.manual_seed(seed)
    net = _Net().double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    cached = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 5, dtype=torch.float64)
    return net, x, cached, gy


def test_split_gradients_equal_one_backward_and_w_runs_only_weight_branches():
    net, x, cached, gy = _setup()
    ref = copy.deepcopy(net)
    rx, rc = x.detach().clone().requires_grad_(), cached.detach().clone().requires_grad_()
    y, aux = ref(rx, rc)
    torch.autograd.backward([y, aux], [gy, None])

    y, aux = net(x, cached)
    counts, handles = _counting(_graph_nodes([y, aux]))
    (gx, gc), pend = backward_input([y, aux], [gy, None], [x, cached], list(net.parameters()))
    in_i = collections.Counter(counts)
    assert all(p.grad is None for p in net.parameters()), "I must not produce weight gradients"
    counts.clear()
    backward_weight(pend)
    in_w = collections.Counter(counts)
    for h in handles:
        h.remove()

    assert torch.allclose(gx, rx.grad, rtol=1e-12, atol=1e-14) and torch.allclose(gc, rc.grad, rtol=1e-12)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14), name
    # input-side-only nodes ran once, in I only; W runs the join nodes (matmuls, LayerNorm, the scale's Mul)
    # again with only their weight output requested, plus the weight-only branch (the transposes)
    for name in ("SiluBackward0", "TanhBackward0", "PowBackward0", "MeanBackward0", "AddBackward0"):
        assert in_i[name] >= 1 and in_w[name] == 0, (name, in_i, in_w)
    assert set(in_w) <= {"AddmmBackward0", "MmBackward0", "TBackward0", "NativeLayerNormBackward0", "MulBackward0"}, (
        in_w
    )
    assert not pend.groups and not pend.roots  # nothing left once W ran


def test_old_reference_hook_re_traverses_for_contrast():
    net, x, cached, gy = _setup()
    y, aux = net(x, cached)
    counts, handles = _counting(_graph_nodes([y, aux]))
    torch.autograd.grad([y, aux], [x, cached], [gy, None], retain_graph=True)
    counts.clear()
    torch.autograd.backward([y, aux], [gy, None], inputs=list(net.parameters()))
    for h in handles:
        h.remove()
    assert counts["TanhBackward0"] == 1 and counts["SiluBackward0"] == 1  # the old W walked the input side again


def test_stage_without_inputs_runs_everything_in_w():
    net, x, cached, gy = _setup()
    x, cached = x.detach(), cached.detach()  # like stage 0: nothing upstream needs a gradient
    ref = copy.deepcopy(net)
    y, aux = ref(x, cached)
    torch.autograd.backward([y, aux], [gy, None])
    y, aux = net(x, cached)
    got, pend = backward_input([y, aux], [gy, None], [], list(net.parameters()))
    assert got == [] and all(p.grad is None for p in net.parameters())
    backward_weight(pend)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_pending_w_memory_is_bounded_by_the_schedule_not_m():
    """ZB-V on one process (P=1: stages 0 and 1): the intermediate gradients I keeps for W peak at the same
    bytes for M=2 and M=6 (the schedule's pending-W depth bounds them) and are all released by the end."""
    from attnres_train.parallel.pipeline import PipelineRuntime, build_stages

    from .common import Case, make_microbatches, make_model

    peaks = {}
    for M in (2, 6):
        case = Case("pending", 1, 2, M, L=4, block_size=3, schedule="zb_v")
        model = make_model(case.cfg())
        rt = PipelineRuntime(build_stages(model, case.layout(), 0), case.layout(), "zb_v", track_held=True)
        rt.step(make_microbatches(M))
        peaks[M] = rt.held_peak["pending_w"]["bytes"]
        assert rt.held_at_end["pending_w"]["bytes"] == 0
    assert peaks[2] > 0 and peaks[6] == peaks[2], peaks
