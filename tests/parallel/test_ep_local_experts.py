"""An EP rank's local experts run on the whole local shards when the call covers them all (issue 17 item 2).

A full-range slice of the weights costs a zero-filled, copied ``[E/ep, ff, d]`` gradient per weight in backward;
the forward always asks for all local experts. Single process: ``local_experts`` only needs the weights (plain
tensors stand in for the DTensor shards' local parts) and the inherited ``compute``.
"""

import torch
import torch.nn.functional as F

from attnres_train.model.moe import GroupedExperts
from attnres_train.parallel.expert import ExpertParallelExperts


def _graph_names(t: torch.Tensor) -> set:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def _plain_swiglu(x, counts, w1, w3, w2):
    out, start = [], 0
    for e, c in enumerate(counts):
        xe = x[start : start + c]
        out.append((F.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T)
        start += c
    return torch.cat(out)


def test_all_local_experts_use_the_shards_unsliced():
    torch.manual_seed(5)
    shard = GroupedExperts(4, 16, 32, init_std=0.3)  # this rank's 4 local experts (fp32: grouped_mm where usable)
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 16)
    y = ExpertParallelExperts.local_experts(shard, x, torch.tensor(counts))
    assert not any("Slice" in n for n in _graph_names(y)), _graph_names(y)
    g = torch.randn_like(y)
    y.backward(g)
    got = {n: getattr(shard, n).grad.clone() for n in ("w1", "w3", "w2")}
    shard.zero_grad(set_to_none=True)
    # the previous path (a full-range slice): bitwise the same values and gradients
    sl = slice(0, 4)
    ref = shard.compute(x, counts, shard.w1[sl], shard.w3[sl], shard.w2[sl])
    assert "SliceBackward0" in _graph_names(ref)  # the control: this path does slice
    ref.backward(g)
    assert torch.equal(y, ref)
    for n, v in got.items():
        assert torch.equal(v, getattr(shard, n).grad), n
    assert got["w1"][1].abs().max() == 0  # the expert without rows: a zero gradient, not None
    # and the values of a plain per-expert SwiGLU
    torch.testing.assert_close(y, _plain_swiglu(x, counts, shard.w1, shard.w3, shard.w2), rtol=1e-5, atol=1e-6)


def test_a_subset_still_slices():
    torch.manual_seed(6)
    shard = GroupedExperts(4, 16, 8, init_std=0.3).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    y = ExpertParallelExperts.local_experts(shard, x, [2, 3], expert_offset=1)  # local experts 1 and 2
    torch.testing.assert_close(y, _plain_swiglu(x, [2, 3], shard.w1[1:], shard.w3[1:], shard.w2[1:]))
