"""Expert parallelism under bf16 autocast (ep 2, gloo): the token all-to-alls carry bf16 rows (half the bytes
of fp32) and the local experts compute in bf16, while the result stays within bf16 tolerance of an fp32
single-process MoE. Payload dtypes are observed on the collectives themselves (a dispatch mode)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from tests.distributed import run_distributed

D, TOK, E = 32, 8, 8


class _Payloads(TorchDispatchMode):
    """``(op, dtype, rows)`` of every all-to-all and ``_grouped_mm`` operand dtypes."""

    def __init__(self):
        super().__init__()
        self.a2a, self.gmm = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace in ("c10d", "_c10d_functional") and "all" in name and "to" in name:
            t = args[1] if isinstance(args[1], torch.Tensor) else args[0]  # (output, input, ...)
            self.a2a.append((t.dtype, t.shape[0]))
        elif name == "_grouped_mm":
            self.gmm.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


def _setup(ws):
    from attnres_train.config.model import ModelConfig, MoEConfig
    from attnres_train.model.moe import MoE

    cfg = ModelConfig(hidden_size=D, moe=MoEConfig(num_experts=E, top_k=2, intermediate_size=64))
    torch.manual_seed(0)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            w.normal_(0, 0.2, generator=g)
        moe.gate.weight.normal_(0, 0.5, generator=g)
    xs = [torch.randn(1, TOK, D, generator=g) for _ in range(ws)]
    return moe, xs


def _body():
    from torch.distributed.device_mesh import init_device_mesh

    from attnres_train.parallel.expert import apply_expert_parallel

    ws, rank = dist.get_world_size(), dist.get_rank()
    moe, xs = _setup(ws)
    apply_expert_parallel(moe, init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",)))
    x = xs[rank].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # warm-up: the one-off grouped_mm probe
        moe(x)
    probe = _Payloads()
    with probe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = moe(x)
        y.float().square().sum().backward()
    return {
        "y": y.detach().float(),
        "a2a": probe.a2a,
        "gmm": probe.gmm,
        "y_dtype": y.dtype,
        "x_grad_dtype": x.grad.dtype,
    }


def test_ep2_all_to_all_and_experts_in_bf16_under_autocast():
    res = run_distributed(_body, 2, timeout=60)
    moe, xs = _setup(2)
    with torch.no_grad():
        ref = moe(torch.cat(xs))[0]
    for r, out in enumerate(res):
        rows = [n for dt, n in out["a2a"] if n > E]  # the count exchange is [E] int64; the rest are token rows
        assert out["a2a"] and all(dt == torch.bfloat16 for dt, n in out["a2a"] if dt.is_floating_point), out["a2a"]
        # forward: dispatch + return; backward: the two reverse exchanges -> 4 float payloads
        assert sum(1 for dt, _ in out["a2a"] if dt.is_floating_point) == 4, out["a2a"]
        assert rows, out["a2a"]
        assert out["gmm"] and all(d == (torch.bfloat16, torch.bfloat16) for d in out["gmm"]), out["gmm"]
        assert out["y_dtype"] == torch.float32 and out["x_grad_dtype"] == torch.float32  # combine back in fp32
        err = float((out["y"] - ref[r : r + 1]).norm() / ref[r : r + 1].norm())
        assert 0 < err < 2e-2, err  # bf16 experts, not fp32, and close to fp32
