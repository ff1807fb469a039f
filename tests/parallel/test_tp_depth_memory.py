"""AttnRes depth mixing under tensor parallelism runs the fused path on local shards (2 gloo ranks).

The reference path (DTensor ops) saves an fp32 copy of every bf16 source for backward; the fused path
(``impl=torch``, and the Triton kernels on CUDA) must save only the sources themselves and per-token scalars, also
when the sources are DTensors (``Shard(1)`` under SP, ``Replicate()`` without). Checked with saved-tensor hooks,
with the reference as the positive control. Values and every gradient (the queries' partial gradients summed
over tp) are checked in fp64 against a plain per-token softmax written here.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import DEFAULT_PRELOAD, run_distributed

PRELOAD = DEFAULT_PRELOAD + ("torch.distributed.tensor",)
B, T, D, N, S, EPS = 2, 8, 64, 4, 3, 1e-6


def _inputs(dtype, placement_name):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    act = Shard(1) if placement_name == "shard" else Replicate()
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(B, T, D, generator=g, dtype=torch.float64) * (j + 1) for j in range(N + 1)]
    q_full = torch.randn(S, D, generator=g, dtype=torch.float64) * 0.5
    w_full = torch.randn(S, B, T, D, generator=g, dtype=torch.float64)  # weights of the test loss
    full = [x.to(dtype) for x in full]
    srcs = [distribute_tensor(x, mesh, [act]).requires_grad_() for x in full]
    q = distribute_tensor(q_full.float() if dtype != torch.float64 else q_full, mesh, [Replicate()]).requires_grad_()
    return full, q_full, w_full, srcs[:N], srcs[N], q


def _reads(blocks, partial, q, dtype, impl):
    """Through the seam tensor parallelism substitutes into the model (``apply_tensor_parallel``)."""
    from attnres_train.model import depth
    from attnres_train.parallel.tensor_depth import ShardedDepthViews

    views = ShardedDepthViews()
    stats = depth.phase1(blocks, q, EPS, impl, views)
    return [depth.phase2(stats[s], partial, q[s], EPS, dtype, impl, views) for s in range(S)]


def _truth(full, q_full, w_full):
    """fp64 per-token softmax over the N blocks + partial (own loops), the test loss and its gradients."""
    vs = [x.double().requires_grad_() for x in full]
    q = q_full.clone().requires_grad_()
    loss = 0.0
    for s in range(S):
        logits = torch.stack([(v @ q[s]) * torch.rsqrt(v.pow(2).mean(-1) + EPS) for v in vs])  # [N+1, B, T]
        a = torch.softmax(logits, 0)
        out = sum(a[j, ..., None] * vs[j] for j in range(len(vs)))
        loss = loss + (out * w_full[s]).sum()
    return loss, torch.autograd.grad(loss, vs + [q])


def _big_fp32_saved(placement_name, impl):
    """Saved fp32 tensors with at least one source's local [B, T_local, D] elements that are not a source."""
    _, _, _, blocks, partial, q = _inputs(torch.bfloat16, placement_name)
    local_srcs = [x.to_local() for x in blocks + [partial]]
    rows_d = local_srcs[0].numel()
    ptrs = {x.untyped_storage().data_ptr() for x in local_srcs}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = _reads(blocks, partial, q, torch.bfloat16, impl)
    sum(o.float().sum() for o in outs).backward()  # the graph is usable
    found = []
    for x in saved:
        x = x.to_local() if hasattr(x, "to_local") else x
        if x.dtype == torch.float32 and x.numel() >= rows_d and x.untyped_storage().data_ptr() not in ptrs:
            found.append(tuple(x.shape))
    return found, q.grad is not None and all(b.grad is not None for b in blocks)


def _memory(placement_name):
    return {impl: _big_fp32_saved(placement_name, impl) for impl in ("torch", "reference")}


def _exact(placement_name):
    full, q_full, w_full, blocks, partial, q = _inputs(torch.float64, placement_name)
    outs = _reads(blocks, partial, q, torch.float64, "torch")
    placements = [o.placements for o in outs]
    rank, n = dist.get_rank(), dist.get_world_size()
    sl = slice(rank * T // n, (rank + 1) * T // n) if placement_name == "shard" else slice(0, T)
    loss_local = sum((o.to_local() * w_full[s][:, sl]).sum() for s, o in enumerate(outs))
    loss_local.backward()
    want_loss, want_grads = _truth(full, q_full, w_full)
    got_grads = [x.grad.full_tensor() for x in blocks + [partial]] + [q.grad.full_tensor()]
    loss = loss_local.detach().clone()
    if placement_name == "shard":
        dist.all_reduce(loss)
    err = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(got_grads, want_grads)]
    return {
        "placements": [str(p) for p in placements],
        "loss_err": abs(float(loss) - float(want_loss)) / abs(float(want_loss)),
        "grad_err": max(err),
        "q_grad_placements": str(q.grad.placements),
    }


@pytest.mark.parametrize("placement", ["shard", "replicate"], ids=["tp2_sp", "tp2"])
def test_tp_depth_mixing_saves_no_fp32_source_copies(placement):
    results = run_distributed(_memory, 2, placement, timeout=120, preload=PRELOAD)
    for rank, res in enumerate(results):
        fused, grads_ok = res["torch"]
        assert fused == [], f"rank {rank}: fused path under TP saved fp32 [B,T,d]-sized tensors {fused}"
        assert grads_ok, f"rank {rank}: no gradient reached the sources / queries"
        ref, _ = res["reference"]  # positive control: the probe sees the reference's fp32 source copies
        assert len(ref) >= N, f"rank {rank}: the probe found only {ref} in the reference path"


@pytest.mark.parametrize("placement", ["shard", "replicate"], ids=["tp2_sp", "tp2"])
def test_tp_depth_mixing_on_shards_is_exact(placement):
    results = run_distributed(_exact, 2, placement, timeout=120, preload=PRELOAD)
    for rank, r in enumerate(results):
        want = "(Shard(dim=1),)" if placement == "shard" else "(Replicate(),)"
        assert all(p == want for p in r["placements"]), f"rank {rank}: output placements {r['placements']}"
        assert r["loss_err"] <= 1e-12, f"rank {rank}: loss rel err {r['loss_err']:.2e}"
        assert r["grad_err"] <= 1e-10, f"rank {rank}: worst gradient rel err {r['grad_err']:.2e}"


def _model_uses_the_seam(placement_name):
    """apply_tensor_parallel must put the sharded seam into the model and its layers, and the model's reads
    must go through it (counted), with a loss equal to the plain fp64 model's."""
    from torch.distributed.device_mesh import init_device_mesh

    from attnres_train.model.depth import DepthViews
    from attnres_train.parallel.tensor import apply_tensor_parallel
    from attnres_train.parallel.tensor_depth import ShardedDepthViews
    from tests.parallel.test_equivalence import build_reference

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    want = float(build_reference("block", 2)(ids, labels=ids).loss)
    model = build_reference("block", 2)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    apply_tensor_parallel(model, mesh, sequence_parallel=placement_name == "shard")
    seams = [type(m).__name__ for m in model.modules() if isinstance(m, DepthViews)]
    calls = {"local": 0}
    real = ShardedDepthViews.local

    def counting(self, x):
        calls["local"] += 1
        return real(self, x)

    ShardedDepthViews.local = counting
    try:
        loss = float(model(ids, labels=ids).loss)
    finally:
        ShardedDepthViews.local = real
    return {"seams": seams, "layers": len(model.model.layers), "calls": calls["local"], "err": abs(loss - want)}


@pytest.mark.parametrize("placement", ["shard", "replicate"], ids=["tp2_sp", "tp2"])
def test_tensor_parallel_model_mixes_through_the_sharded_seam(placement):
    for rank, r in enumerate(run_distributed(_model_uses_the_seam, 2, placement, timeout=120, preload=PRELOAD)):
        assert r["seams"] == ["ShardedDepthViews"] * (r["layers"] + 1), f"rank {rank}: seams {r['seams']}"
        assert r["calls"] > 0, f"rank {rank}: no depth read went through the sharded seam"
        assert r["err"] <= 1e-12, f"rank {rank}: loss differs from the plain model by {r['err']:.2e}"
