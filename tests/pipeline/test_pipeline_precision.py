"""Pipeline defaults under bf16 and FSDP (pp 2 x dp_shard 2, 4 gloo ranks, 1F1B, 4 microbatches).

* ``pipeline.comm_dtype`` null sends the stage-to-stage messages (activations forward, gradients backward) in the
  compute dtype: bf16 under ``trainer.precision=bf16``, the parameters' dtype in fp32 training; an explicit value
  wins. The bf16 loss stays within bf16 tolerance of the fp32 single-process model.
* FSDP2 under the pipeline keeps a stage's parameters gathered from a microbatch's forward to its backward
  (``reshard_after_forward=False``): counted all-gathers per step drop from one per unit per F and per B (the
  control, resharding forced on) to about one per microbatch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.parallel.test_equivalence import T, build_reference, model_cfg

MICRO, ROWS = 4, 8  # 8 sequences over dp 2: 4 microbatches of 1 per rank
PRELOAD = ("torch", "torch.distributed", "torch.distributed.tensor", "attnres_train.model")


def _cfg(mode, nb):
    cfg = model_cfg(mode, nb)
    cfg.num_layers = 4
    cfg.mla_layers = [1, 3]
    return cfg


def _body(precision, comm_dtype=None, force_reshard=False):
    import attnres_train.parallel.parallelize as parallelize
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.pipeline import PipelineConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.schema import Config
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.train.train_module import build_train_module

    if force_reshard:  # the control: FSDP2's own default (reshard after every forward)
        apply = parallelize.apply_data_parallel
        parallelize.apply_data_parallel = lambda m, pctx, **kw: apply(m, pctx, reshard_after_forward=True, **kw)
    cfg = Config()
    cfg.model = _cfg("block", 2)
    cfg.parallel = ParallelConfig(pp=2, dp_shard=2)
    cfg.pipeline = PipelineConfig(schedule="1f1b", comm_dtype=comm_dtype)
    cfg.trainer = TrainerConfig(micro_batch_size=1, global_batch_size=ROWS, precision=precision)
    pctx = build_parallel_context(cfg.parallel, cfg.model, seq_len=T, world_size=dist.get_world_size())
    ref = build_reference("block", 2, _cfg).float()
    module = build_train_module(copy.deepcopy(ref), cfg, pctx, max_steps=10)
    rt = module.engine.pipe.runtime
    hops, emit = set(), rt._tx.emit
    rt._tx.emit = lambda kind, s, m, t: hops.add((kind, str(t.dtype).replace("torch.", ""))) or emit(kind, s, m, t)
    ids = torch.randint(0, cfg.model.vocab_size, (ROWS, T + 1), generator=torch.Generator().manual_seed(3))
    module.forward_backward(local_batch(ids, pctx))  # FSDP2 lazy init
    module.model.zero_grad(set_to_none=True)
    calls, gather = [], dist.all_gather_single  # FSDP2's all-gather (it looks the function up on each call)
    dist.all_gather_single = lambda *a, **kw: calls.append(1) or gather(*a, **kw)
    try:
        stats = module.forward_backward(local_batch(ids, pctx))
    finally:
        dist.all_gather_single = gather
    gathers = len(calls)
    with torch.no_grad():
        ref_loss = float(ref(ids[:, :-1], labels=ids[:, 1:]).loss)
    return {
        "hops": sorted(hops),
        "loss_err": abs(stats["loss"] - ref_loss) / ref_loss,
        "gathers": gathers,
        "units": len(
            {id(m._get_fsdp_state()) for st in module.engine.pipe.stages for m in st.modules() if hasattr(m, "reshard")}
        ),
    }


def test_pipeline_hops_use_the_compute_dtype():
    bf16 = run_distributed(_body, 4, "bf16", timeout=180, preload=PRELOAD)
    fp32 = run_distributed(_body, 4, "fp32", timeout=180, preload=PRELOAD)
    forced = run_distributed(_body, 4, "bf16", "float32", timeout=180, preload=PRELOAD)
    for rank in range(4):
        assert {d for _, d in bf16[rank]["hops"]} == {"bfloat16"}, bf16[rank]
        assert {d for _, d in fp32[rank]["hops"]} == {"float32"}, fp32[rank]
        assert {d for _, d in forced[rank]["hops"]} == {"float32"}, forced[rank]
        assert bf16[rank]["loss_err"] < 2e-2, bf16[rank]  # bf16 autocast + bf16 hops vs the fp32 model
        assert fp32[rank]["loss_err"] < 1e-5, fp32[rank]
    assert {k for r in bf16 for k, _ in r["hops"]} == {"F", "B"}, bf16  # activations forward, gradients back


def test_pipeline_stages_keep_parameters_gathered_from_forward_to_backward():
    kept = run_distributed(_body, 4, "fp32", timeout=180, preload=PRELOAD)
    control = run_distributed(_body, 4, "fp32", None, True, timeout=180, preload=PRELOAD)
    for rank in range(4):
        units = kept[rank]["units"]
        # resharding after every forward gathers each unit for every F and again for every B
        assert control[rank]["gathers"] >= 2 * MICRO * units, control[rank]
        # kept gathered: about once per microbatch per unit (the schedule's order decides the exact count)
        assert kept[rank]["gathers"] <= (MICRO + 1) * units, (kept[rank], control[rank])
        print(
            f"rank {rank}: {units} FSDP units, all-gathers per step {kept[rank]['gathers']} "
            f"(reshard after forward: {control[rank]['gathers']})"
        )


def test_comm_dtype_without_a_pipeline_is_refused():
    from attnres_train.config.errors import ConfigError
    from attnres_train.config.pipeline import PipelineConfig, validate_pipeline_config

    validate_pipeline_config(PipelineConfig(comm_dtype="bfloat16"), pp=2, num_layers=4)
    with pytest.raises(ConfigError, match="pipeline.comm_dtype.*no effect with parallel.pp=1"):
        validate_pipeline_config(PipelineConfig(comm_dtype="bfloat16"), pp=1, num_layers=4)
