"""Shared builders for model tests: tiny configs and weight transplanting between residual modes."""

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnres_train.config.model import ModelConfig
from attnres_train.model import build_model


def tiny_cfg(mode="prenorm", num_blocks=None, block_size=None, num_layers=4, **kw) -> ModelConfig:
    cfg = ModelConfig(num_layers=num_layers, mla_layers=[i for i in range(num_layers) if i % 4 == 3], **kw)
    cfg.residual.mode = mode
    cfg.residual.num_blocks = num_blocks
    cfg.residual.block_size = block_size
    return cfg


def build(cfg, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return build_model(copy.deepcopy(cfg)).to(dtype)


def randomize_queries(model, seed=1, scale=0.5):
    """Non-zero pseudo-queries and gains (zero queries make the softmax uniform and hide routing bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_res_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
            elif "_res_norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def assert_rel_close(a, b, tol, name=""):
    """Max-abs error relative to the reference tensor's max magnitude (robust for near-zero entries)."""
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max()) / scale
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def set_path(obj, path: str, value):
    """``set_path(cfg, "moe.top_k", 4)``: set a dotted attribute path on nested dataclasses; returns ``obj``."""
    target = obj
    *parents, last = path.split(".")
    for p in parents:
        target = getattr(target, p)
    setattr(target, last, value)
    return obj


# -- depth-mixing inputs and probes, shared by tests/model/test_depth_ops.py and tests/kernels -------------------
DEPTH_EPS = 1e-6


def depth_inputs(n, s, shape, has_p, dtype, seed=0, device="cpu"):
    """n source blocks ``shape``, an optional partial sum, S fp32 queries: leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    blocks = [(torch.randn(*shape, generator=g) * (j + 1)).to(device, dtype).requires_grad_() for j in range(n)]
    partial = (torch.randn(*shape, generator=g) * 2).to(device, dtype).requires_grad_() if has_p else None
    q = (torch.randn(s, shape[-1], generator=g) * 0.5).to(device).requires_grad_()
    return blocks, partial, q


def two_phase(blocks, partial, q, dtype, impl1, impl2=None):
    """All S reads of one block: phase 1 with ``impl1``, phase 2 with ``impl2`` (default the same), stacked."""
    from attnres_train.model import depth

    stats = depth.phase1(blocks, q, DEPTH_EPS, impl1)
    return torch.stack(
        [depth.phase2(stats[i], partial, q[i], DEPTH_EPS, dtype, impl2 or impl1) for i in range(q.shape[0])]
    )


def rel_err(a, b):
    """max |a - b| relative to max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def saved_tensors(fn):
    """(fn(), every tensor autograd saved for backward while running it)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def check_against_truth(impl, n, s, shape, has_p, dtype, tol, device="cpu"):
    """``impl``'s block reads (outputs and every gradient) are as close to the fp64 direct softmax as the
    autograd reference in the same dtype is (within a factor 3, or ``tol["out"]`` / ``tol["grad"]``)."""
    from attnres_train.model import depth

    blocks, partial, q = depth_inputs(n, s, shape, has_p, dtype, device=device)
    sources = blocks + ([partial] if has_p else [])
    inputs = sources + [q]
    out_i = two_phase(blocks, partial, q, dtype, impl)
    out_r = two_phase(blocks, partial, q, dtype, "reference")
    truth = torch.stack([depth.mix_direct([x.double() for x in sources], q[i].double(), DEPTH_EPS) for i in range(s)])
    assert out_i.dtype == dtype and out_i.shape == (s, *shape)
    assert rel_err(out_i, truth) <= max(tol["out"], 3 * rel_err(out_r, truth))

    w = torch.randn(out_i.shape, generator=torch.Generator().manual_seed(1)).to(device)
    g_i = torch.autograd.grad((out_i.float() * w).sum(), inputs)
    g_r = torch.autograd.grad((out_r.float() * w).sum(), inputs)
    g_x = torch.autograd.grad((truth * w.double()).sum(), inputs)
    for name, a, b, x in zip([f"src{j}" for j in range(len(sources))] + ["q"], g_i, g_r, g_x):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert rel_err(a, x) <= max(tol["grad"], 3 * rel_err(b, x)), name


class CountFullSizeOps(TorchDispatchMode):
    """Counts dispatched ops whose output has at least ``numel`` elements (passes over ``[B,T,d]``)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        views = (
            torch.ops.aten.view.default,
            torch.ops.aten.t.default,
            torch.ops.aten.detach.default,
            torch.ops.aten._unsafe_view.default,
            torch.ops.aten.reshape.default,
        )
        if func not in views and any(isinstance(o, torch.Tensor) and o.numel() >= self.numel for o in outs):
            self.count += 1
        return out
