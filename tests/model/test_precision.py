"""The bf16 precision policy (docs/performance.md, "Precision and memory policy") on CPU autocast.

Under ``torch.autocast(bfloat16)`` the routed experts must compute in bf16 (``F.grouped_mm`` has no autocast
rule, so the model casts; before, the experts ran in fp32 inside a bf16 run), while the router keeps fp32
logits / scores / weights. The loss stays within bf16 tolerance of the fp32 loss. The dtypes are observed at
the ATen level (a dispatch mode), independent of how the model code decides them.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnres_train.model.moe import GroupedExperts, Router

from .helpers import build, randomize_queries, tiny_cfg

EXPERT_OPS = ("_grouped_mm",)


class _OpDtypes(TorchDispatchMode):
    """Records ``(op name, input dtypes)`` of every ATen op whose name is in ``names``."""

    def __init__(self, names):
        super().__init__()
        self.names, self.seen = names, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.names:
            self.seen.append((name, tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def _model():
    cfg = tiny_cfg("block", num_blocks=2, num_layers=3)  # layer 0 dense, layers 1-2 MoE (grouped experts)
    model = build(cfg, dtype=torch.float32)
    randomize_queries(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    return cfg, model, ids


def test_experts_run_in_bf16_router_in_fp32_under_autocast():
    cfg, model, ids = _model()
    assert all(m.impl == "auto" for m in model.modules() if isinstance(m, GroupedExperts))
    router_out = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, inp, out: router_out.append([t.dtype for t in out[1:]]))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # warm-up: the one-off grouped_mm probe
        model(ids[:, :-1], labels=ids[:, 1:])
    router_out.clear()
    probe = _OpDtypes(EXPERT_OPS)
    with torch.autocast("cpu", dtype=torch.bfloat16), probe:
        out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()

    n_moe = sum(1 for m in model.modules() if isinstance(m, GroupedExperts))
    # forward: 3 grouped GEMMs per MoE layer (w1, w3, w2), every operand (rows and weights) bf16
    fwd = [d for name, d in probe.seen if name == "_grouped_mm"]
    assert len(fwd) == 3 * n_moe, probe.seen
    assert all(dt == torch.bfloat16 for dts in fwd for dt in dts[:2]), fwd
    # router weights and scores fp32 (the top-k choice and the balancing bias need it)
    assert len(router_out) == n_moe and all(d == [torch.float32, torch.float32] for d in router_out), router_out
    # master weights and their gradients stay fp32
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), name

    with torch.no_grad():
        ref = model(ids[:, :-1], labels=ids[:, 1:]).loss
    rel = abs(float(out.loss.detach()) - float(ref)) / float(ref)
    assert 0 < rel < 2e-2, (float(out.loss), float(ref))  # bf16 (8-bit mantissa) tolerance, and not fp32


def test_experts_stay_fp32_without_autocast_and_fp64_under_it():
    """The cast follows autocast only: fp32 without it, and fp64 models are never cast down."""
    for dtype, autocast in ((torch.float32, False), (torch.float64, True)):
        cfg, model, ids = _model()
        model.to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():  # warm-up (probe)
            model(ids[:, :-1], labels=ids[:, 1:])
        probe = _OpDtypes(EXPERT_OPS + ("mm",))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), probe:
            model(ids[:, :-1], labels=ids[:, 1:])
        experts = [d for name, d in probe.seen if name == "_grouped_mm"]
        if dtype == torch.float32:
            assert experts and all(dt == dtype for dts in experts for dt in dts[:2]), experts
        else:  # fp64: the per-expert loop (no fp64 grouped_mm); every matmul stays fp64
            assert not experts and all(dt == dtype for _, dts in probe.seen for dt in dts), probe.seen[:4]
