"""``plan_estimates.estimate_comm`` against the bytes FSDP2 really sends (dp_shard 2, bf16, 4 microbatches, gloo).

The independent count: every FSDP2 all-gather and reduce-scatter of one training step through the real train
module, read at the collective call (``dist.all_gather_single`` / ``dist.reduce_scatter_single``: dtype and
element count), turned into the bytes a rank sends in a ring (all-gather: its shard to each of the n-1 others;
reduce-scatter: (n-1)/n of its input). The estimate must follow the precision policy: bf16 layer all-gathers
for every microbatch's forward and backward, the fp32 root once per microbatch, fp32 reduce-scatters every
microbatch.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.parallel.test_equivalence import T, build_reference, model_cfg

MICRO, ROWS = 4, 8


def _measure():
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.schema import Config
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.plan_estimates import TrainShape, estimate_comm, estimate_ranks
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.train.train_module import build_train_module

    cfg = Config()
    cfg.model = model_cfg("block", 2)
    cfg.parallel = ParallelConfig(dp_shard=2)
    cfg.trainer = TrainerConfig(micro_batch_size=1, global_batch_size=ROWS, precision="bf16")
    n = dist.get_world_size()
    pctx = build_parallel_context(cfg.parallel, cfg.model, seq_len=T, world_size=n)
    module = build_train_module(copy.deepcopy(build_reference("block", 2).float()), cfg, pctx, max_steps=10)
    batch = local_batch(torch.randint(0, 64, (ROWS, T + 1), generator=torch.Generator().manual_seed(3)), pctx)
    module.forward_backward(batch)  # FSDP2 lazy init
    module.model.zero_grad(set_to_none=True)

    sent = {"all-gather": 0.0, "reduce-scatter": 0.0}
    dtypes = {"all-gather": set(), "reduce-scatter": set()}
    ag, rs = dist.all_gather_single, dist.reduce_scatter_single

    def all_gather(output, input, **kw):
        sent["all-gather"] += (n - 1) * input.numel() * input.element_size()
        dtypes["all-gather"].add(str(input.dtype))
        return ag(output, input, **kw)

    def reduce_scatter(output, input, **kw):
        sent["reduce-scatter"] += (n - 1) / n * input.numel() * input.element_size()
        dtypes["reduce-scatter"].add(str(input.dtype))
        return rs(output=output, input=input, **kw)

    dist.all_gather_single, dist.reduce_scatter_single = all_gather, reduce_scatter
    try:
        module.forward_backward(batch)
    finally:
        dist.all_gather_single, dist.reduce_scatter_single = ag, rs

    shape = TrainShape(micro_batch_size=1, seq_len=T, microbatches=MICRO, act_bytes=2)
    (rank,) = estimate_ranks(cfg.model, pctx.dims, shape)
    est = {"all-gather": 0.0, "reduce-scatter": 0.0}
    for row in estimate_comm(cfg.model, pctx.dims, shape, rank):
        if row.group in ("dp_shard", "edp_shard"):  # ep = 1: the experts travel in their layers' units
            est["all-gather" if "all-gather" in row.collective else "reduce-scatter"] += row.bytes
    return {"sent": sent, "est": est, "dtypes": {k: sorted(v) for k, v in dtypes.items()}}


def test_fsdp_traffic_estimate_matches_the_collectives():
    for r in run_distributed(_measure, 2, timeout=120):
        assert r["dtypes"] == {
            "all-gather": ["torch.bfloat16", "torch.float32"],
            "reduce-scatter": ["torch.float32"],
        }, r
        for kind in ("all-gather", "reduce-scatter"):
            # FSDP2 pads each parameter's dim 0 to a multiple of the shard degree: a few percent on this tiny model
            assert abs(r["est"][kind] - r["sent"][kind]) <= 0.03 * r["sent"][kind], (kind, r)
        print(r)


def test_estimate_reads_the_depth_layout_once_not_per_layer(monkeypatch):
    """A pre-flight estimate of a deep Block config must not redo the O(num_layers) depth layout per layer (that
    made a 20,000-layer config take minutes before its memory error): count the calls."""
    import attnres_train.parallel.plan_estimates as pe
    from attnres_train.config.model import ModelConfig, ResidualConfig
    from attnres_train.config.parallel import ParallelDims

    calls = {"sources": 0}
    real = pe.attnres_sources

    def counting(cfg):
        calls["sources"] += 1
        return real(cfg)

    monkeypatch.setattr(pe, "attnres_sources", counting)
    pe._DEPTH_LAYOUTS.clear()
    cfg = ModelConfig(num_layers=300, residual=ResidualConfig(mode="block", num_blocks=4))
    shape = pe.TrainShape(micro_batch_size=1, seq_len=8, microbatches=1)
    dims = ParallelDims(world_size=1, pp=1, dp_replicate=1, dp_shard=1, tp=1, sp=False, ep=1)
    first = pe.estimate_ranks(cfg, dims, shape)[0].total_memory
    again = pe.estimate_ranks(cfg, dims, shape)[0].total_memory
    assert calls["sources"] == 1
    assert first == again > 0
