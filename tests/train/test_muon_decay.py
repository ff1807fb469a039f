"""Muon's decoupled weight decay is observable: the same gradients with ``weight_decay`` on and off.

Built through the public path (``build_optimizers`` with ``optim.name=muon``). The decay-off run gives each step's
update ``u_k`` (momentum and Newton-Schulz do not depend on the weights); the decay-on weights are then predicted by
hand, ``p_k = p_{k-1} * (1 - lr * wd) - u_k``, from raw tensors, in fp64.
"""

import torch
from torch import nn

from attnres_train.config.train import OptimConfig
from attnres_train.train.optim import BatchedMuon, build_optimizers

LR, WD, STEPS = 0.05, 0.1, 2


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 12, bias=False, dtype=torch.float64)  # 2-D hidden matrix
        self.experts = nn.Module()
        self.experts.w = nn.Parameter(torch.zeros(3, 12, 8, dtype=torch.float64))  # 3-D expert stack


def _run(weight_decay, w0, grads):
    toy = _Toy()
    with torch.no_grad():
        toy.proj.weight.copy_(w0["proj.weight"])
        toy.experts.w.copy_(w0["experts.w"])
    opts = build_optimizers(toy, OptimConfig(name="muon", lr=LR, muon_lr=LR, weight_decay=weight_decay))
    assert [type(o) for o in opts] == [BatchedMuon], "both toy matrices must be under Muon"
    history = []
    for g in grads:
        for n, p in toy.named_parameters():
            p.grad = g[n].clone()
        opts[0].step()
        history.append({n: p.detach().clone() for n, p in toy.named_parameters()})
    return history


def test_muon_weight_decay_shrinks_by_lr_wd_p():
    gen = torch.Generator().manual_seed(0)
    shapes = {"proj.weight": (12, 8), "experts.w": (3, 12, 8)}
    w0 = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()} for _ in range(STEPS)]
    off = _run(0.0, w0, grads)
    on = _run(WD, w0, grads)
    for n in shapes:
        prev_off, expected = w0[n], w0[n]
        for k in range(STEPS):
            update = prev_off - off[k][n]  # u_k: what Muon subtracted without decay
            expected = expected * (1.0 - LR * WD) - update
            prev_off = off[k][n]
            err = (on[k][n] - expected).abs().max().item()
            assert err < 1e-12, f"{n} step {k}: decayed weights differ from p*(1-lr*wd) - u by {err:.2e}"
        # the decay is not negligible next to the tolerance (the check above could not pass without it)
        assert (on[-1][n] - off[-1][n]).abs().max().item() > 1e-3, f"{n}: weight decay had no visible effect"
