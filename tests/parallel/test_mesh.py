"""Parallel layout validation (in-process, no process groups) and the mesh layout on 4 gloo ranks."""

import pytest
import torch.distributed as dist

from attnres_train.config.errors import ConfigError
from attnres_train.config.model import ModelConfig
from attnres_train.config.parallel import ParallelConfig, resolve_parallel_dims
from attnres_train.parallel.mesh import build_parallel_context
from tests.distributed import run_distributed
from tests.model.helpers import set_path


def _model(**kw) -> ModelConfig:
    m = ModelConfig()  # tiny: vocab 1024, kda/mla 2 heads, 8 experts, 4 layers (first dense)
    for key, value in kw.items():
        set_path(m, key, value)
    return m


# (parallel overrides, world size, model overrides, seq_len, field, message fragment)
BAD = [
    (dict(dp_replicate=0), 1, {}, None, "parallel.dp_replicate", "positive integer"),
    (dict(dp_shard=0), 1, {}, None, "parallel.dp_shard", "-1 (fill"),
    (dict(dp_shard=-2), 1, {}, None, "parallel.dp_shard", "-1 (fill"),
    (dict(tp=0), 1, {}, None, "parallel.tp", "positive integer"),
    (dict(ep=0), 1, {}, None, "parallel.ep", "positive integer"),
    (dict(tp=True), 2, {}, None, "parallel.tp", "positive integer"),
    (dict(sp="yes"), 1, {}, None, "parallel.sp", "true or false"),
    (dict(pp=2, dp_shard=2), 2, {}, None, "parallel.dp_shard", "dp_replicate*dp_shard*tp*pp = 1*2*1*2 = 4"),
    (dict(vpp=2), 1, {}, None, "parallel.vpp", "pp > 1"),
    (dict(dp_shard=2, tp=2), 2, {}, None, "parallel.dp_shard", "does not equal the world size 2"),
    (dict(dp_replicate=2, dp_shard=1), 4, {}, None, "parallel.dp_shard", "does not equal the world size 4"),
    (dict(tp=2), 3, {}, None, "parallel.dp_shard", "cannot fill the world"),
    (dict(sp=True), 2, {}, None, "parallel.sp", "needs parallel.tp > 1"),
    (dict(tp=4), 4, {"kda.num_heads": 2}, None, "parallel.tp", "model.kda.num_heads=2"),
    (dict(tp=4), 4, {"kda.num_heads": 4, "mla.num_heads": 2}, None, "parallel.tp", "model.mla.num_heads=2"),
    (dict(tp=2), 2, {"vocab_size": 1025}, None, "parallel.tp", "model.vocab_size=1025"),
    (dict(tp=2), 2, {"moe.dense_intermediate_size": 511}, None, "parallel.tp", "model.moe.dense_intermediate_size"),
    (dict(tp=2), 2, {"moe.intermediate_size": 63}, None, "parallel.tp", "shared expert"),
    (dict(tp=2, sp=True), 2, {}, 63, "data.seq_len", "divisible by parallel.tp=2"),
    (dict(ep=3), 6, {}, None, "parallel.ep", "model.moe.num_experts=8"),
    (dict(ep=4), 2, {}, None, "parallel.ep", "must divide dp_replicate*dp_shard"),
    (dict(ep=2, tp=2), 2, {}, None, "parallel.ep", "must divide dp_replicate*dp_shard = 1*1 = 1"),
    (dict(dp_replicate=2, dp_shard=3, ep=2), 6, {}, None, "parallel.ep", "must divide dp_shard=3 or be a multiple"),
    (dict(ep=2), 2, {"moe.first_k_dense": 4}, None, "parallel.ep", "no MoE layer"),
]


@pytest.mark.parametrize(
    "over,world,model_over,seq_len,field,fragment", BAD, ids=[f"{b[4]}-{i}" for i, b in enumerate(BAD)]
)
def test_each_rule_names_its_field(over, world, model_over, seq_len, field, fragment):
    with pytest.raises(ConfigError) as info:
        resolve_parallel_dims(ParallelConfig(**over), world, model_cfg=_model(**model_over), seq_len=seq_len)
    assert info.value.field == field, str(info.value)
    assert fragment in info.value.message, str(info.value)


def test_validation_runs_before_any_process_group():
    """build_parallel_context rejects a bad layout with ConfigError, never reaching torch.distributed."""
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="parallel.tp"):
        build_parallel_context(ParallelConfig(tp=4), _model(), seq_len=64, world_size=4)


@pytest.mark.parametrize(
    "over,world,expect",
    [
        (dict(), 8, dict(dp_shard=8, dp=8)),
        (dict(tp=2), 8, dict(dp_shard=4, dp=4)),
        (dict(dp_replicate=2, tp=2), 8, dict(dp_shard=2, dp=4)),
        (dict(dp_replicate=2, dp_shard=1), 2, dict(dp_shard=1, dp=2)),
        (dict(ep=2), 8, dict(dp_shard=8, edp_replicate=1, edp_shard=4)),  # EP inside dp_shard
        (dict(dp_replicate=2, ep=2), 8, dict(dp_shard=4, edp_replicate=2, edp_shard=2)),
        (dict(dp_replicate=2, dp_shard=2, ep=4), 4, dict(edp_replicate=1, edp_shard=1)),  # EP spans both dp dims
        (dict(dp_replicate=4, dp_shard=1, ep=2), 4, dict(edp_replicate=2, edp_shard=1)),  # DDP + EP
    ],
)
def test_resolution(over, world, expect):
    dims = resolve_parallel_dims(ParallelConfig(**over), world, model_cfg=_model(), seq_len=64)
    for key, value in expect.items():
        assert getattr(dims, key) == value, (key, dims)
    assert dims.pp * dims.dp * dims.tp == world
    assert dims.edp_replicate * dims.edp_shard * dims.ep == dims.dp


def test_single_process_needs_no_process_group():
    ctx = build_parallel_context(ParallelConfig(), _model(), seq_len=64, world_size=1)
    assert (ctx.dp_rank, ctx.dp_size, ctx.tp_rank, ctx.dp_mesh) == (0, 1, 0, None)
    t = ctx.all_reduce_dp_sum_(__import__("torch").ones(2))
    assert t.tolist() == [1.0, 1.0]


def _groups(kw):
    ctx = build_parallel_context(ParallelConfig(**kw), _model(), seq_len=64)

    def ranks(mesh):
        return None if mesh is None else sorted(dist.get_process_group_ranks(mesh.get_group()))

    out = {name: ranks(ctx.mesh(name)) for name in ("dp", "tp", "ep", "dp_shard", "dp_replicate")}
    out["edp"] = None if ctx.expert_dp_mesh is None else sorted(ctx.expert_dp_mesh.mesh.flatten().tolist())
    out["dp_rank"] = ctx.dp_rank
    return out


def test_mesh_layout_on_four_ranks():
    """tp innermost; EP folded into the innermost data-parallel ranks; dp_rank consistent across tp."""
    res = run_distributed(_groups, 4, dict(dp_shard=2, tp=2, ep=2), timeout=60)
    assert [r["tp"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["ep"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["dp_rank"] for r in res] == [0, 0, 1, 1]
    assert [r["edp"] for r in res] == [[0], [1], [2], [3]]  # each expert shard has one replica
    res = run_distributed(_groups, 4, dict(dp_replicate=2, dp_shard=2, ep=2), timeout=60)
    assert [r["dp"] for r in res] == [[0, 1, 2, 3]] * 4
    assert [r["dp_shard"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp_replicate"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["ep"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # inside dp_shard
    assert [r["edp"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # replicas of an expert shard
