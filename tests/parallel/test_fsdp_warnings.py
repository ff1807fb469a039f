"""No FSDP2 "returned a view tensor" warning in a data-parallel training step (2 gloo ranks).

FSDP2 registers its pre-backward hook on the output of each unit's last module and warns when that output is a
view (an in-place op on it would drop the hook). The MoE used to return ``y.view(B, T, D)``; docs/parallel.md,
"Data parallelism", has the cause. A positive control (a unit that does return a view) proves the warning is
still raised by this torch, so the test cannot pass because the message changed.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from tests.distributed import run_distributed
from tests.parallel.test_equivalence import B, T, build_reference, global_batch, model_cfg

VIEW_WARNING = "returned a view tensor"

# (parallel config, trainer extras, num_shared_experts): FSDP with activation checkpointing and a shared
# expert; replication (FSDP2 with a size-1 shard dim) under bf16 mixed precision without a shared expert.
CASES = (
    (dict(dp_shard=2), dict(activation_checkpointing=True), 1),
    (dict(dp_replicate=2, dp_shard=1), dict(precision="bf16"), 0),
)


class _ViewOut(nn.Module):
    """Positive control: a unit whose output is a view of a fresh tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).view(-1)


def _view_messages(record) -> list:
    return [str(w.message) for w in record if VIEW_WARNING in str(w.message)]


def _cfg_fn(shared: int):
    def fn(mode, nb):
        cfg = model_cfg(mode, nb)
        cfg.moe.num_shared_experts = shared
        return cfg

    return fn


def _body():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.train import OptimConfig
    from attnres_train.model.moe import MoE
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.train.train_module import TrainModule

    out = {"cases": []}
    for par_kw, trainer_kw, shared in CASES:
        pctx = build_parallel_context(
            ParallelConfig(**par_kw), model_cfg("block", 2), seq_len=T, world_size=dist.get_world_size()
        )
        model = build_reference("block", 2, _cfg_fn(shared)).float()
        tcfg = TrainerConfig(micro_batch_size=1, global_batch_size=B, **trainer_kw)
        module = TrainModule(model, OptimConfig(), tcfg, pctx, 10)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            stats = module.forward_backward(local_batch(global_batch(), pctx))
        units = len({id(m._get_fsdp_state()) for m in model.modules() if isinstance(m, FSDPModule)})
        moe = sum(isinstance(m, MoE) for m in model.modules())
        out["cases"].append({"views": _view_messages(record), "loss": stats["loss"], "units": units, "moe": moe})

    torch.manual_seed(0)
    control = fully_shard(_ViewOut(), mesh=pctx.dp_shard_mesh if pctx.dims.dp_shard > 1 else pctx.fsdp_mesh)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        control(torch.randn(2, 4)).sum().backward()
    out["control"] = _view_messages(record)
    return out


def test_fsdp2_step_returns_no_view_tensor():
    for rank, r in enumerate(run_distributed(_body, 2, timeout=180)):
        assert r["control"], f"rank {rank}: the positive control raised no view warning (torch changed?)"
        for (par_kw, trainer_kw, shared), case in zip(CASES, r["cases"]):
            where = f"rank {rank}, {par_kw} {trainer_kw} shared={shared}"
            assert case["units"] == 4 and case["moe"] == 2, f"{where}: not the FSDP2 layout expected: {case}"
            assert torch.isfinite(torch.tensor(case["loss"])), where
            assert case["views"] == [], f"{where}: {case['views']}"


def _pipeline_body(par_kw: dict, schedule: str):
    """One pipeline step under FSDP2; the view warnings it raised, and how many stage outputs passed a received
    block through (the case that used to hand FSDP2's own input views back to it)."""
    import copy

    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.pipeline import PipelineConfig
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.pipeline.parallelize import parallelize_pipeline
    from attnres_train.parallel.pipeline.stage import PipelineStageModule

    def cfg_fn(mode, nb):
        cfg = model_cfg(mode, nb)
        cfg.num_layers, cfg.mla_layers = 6, [1, 4]
        return cfg

    cfg = cfg_fn("block", 2)
    pctx = build_parallel_context(ParallelConfig(**par_kw), cfg, seq_len=T, world_size=dist.get_world_size())
    model = copy.deepcopy(build_reference("block", 2, cfg_fn)).float()
    pipe = parallelize_pipeline(model, pctx, pipeline_cfg=PipelineConfig(schedule=schedule))
    passed = {"n": 0}
    forward = PipelineStageModule.forward

    def counting(self, state=None, **kw):
        out = forward(self, state, **kw)
        if state is not None and out.state is not None:
            ins = {t.untyped_storage().data_ptr() for t in state.sources()}
            passed["n"] += sum(t.untyped_storage().data_ptr() in ins for t in out.state.sources())
        return out

    g = torch.Generator().manual_seed(5)
    mbs = [(ids[:, :-1], ids[:, 1:]) for ids in (torch.randint(0, 64, (1, T + 1), generator=g) for _ in range(4))]
    PipelineStageModule.forward = counting
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            pipe.step(mbs)
    finally:
        PipelineStageModule.forward = forward
    return {"views": _view_messages(record), "passed": passed["n"]}


def test_fsdp2_pipeline_stages_return_no_view_tensor():
    """Interleaved pp2 x vpp2 x dp_shard 2: chunks pass received blocks through to the next hop."""
    results = run_distributed(_pipeline_body, 4, dict(pp=2, vpp=2, dp_shard=2), "interleaved_1f1b", timeout=240)
    assert sum(r["passed"] for r in results) > 0, f"no stage passed a block through: {results}"
    for rank, r in enumerate(results):
        assert r["views"] == [], f"rank {rank}: {r['views']}"
