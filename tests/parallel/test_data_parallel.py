"""FSDP2 specifics on gloo: fp32 gradients (SUM-then-divide: gloo has no AVG) and a reduce-scatter on every
microbatch with dp_shard > 1 (accumulation keeps gradients sharded), counted by intercepting the collectives."""

import copy

import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from tests.distributed import run_distributed
from tests.parallel.test_equivalence import B, T, build_reference, global_batch, rel_err


class _Collectives(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _body():
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.train import OptimConfig
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.train.train_module import TrainModule
    from tests.full_tensors import full_grads
    from tests.parallel.test_equivalence import model_cfg

    pctx = build_parallel_context(
        ParallelConfig(dp_shard=2), model_cfg("block", 2), seq_len=T, world_size=dist.get_world_size()
    )
    ref = build_reference("block", 2).float()
    par = copy.deepcopy(ref)
    module = TrainModule(par, OptimConfig(), TrainerConfig(micro_batch_size=1, global_batch_size=B), pctx, 10)
    ids = global_batch()
    o = ref(ids[:, :-1], labels=ids[:, 1:])
    (o.loss + o.aux_loss).backward()
    counter = _Collectives()
    with counter:
        module.forward_backward(local_batch(ids, pctx))  # 2 microbatches on this rank
    g = full_grads(par)
    err = max(rel_err(g[n], p.grad) for n, p in ref.named_parameters() if p.grad is not None)
    from torch.distributed.fsdp import FSDPModule

    # FSDP states = units (a grouped layer unit is one state shared by its modules)
    units = len({id(m._get_fsdp_state()) for m in par.modules() if isinstance(m, FSDPModule)})
    return {
        "err": err,
        "reduce_scatters": counter.names.count("_reduce_scatter_base_")
        + counter.names.count("reduce_scatter_tensor_coalesced_"),
        "units": units,
        "micro": B // 2,
    }


def test_fsdp2_fp32_on_gloo_and_reduce_scatter_every_microbatch():
    for r in run_distributed(_body, 2, timeout=90):
        assert r["err"] < 1e-5, r  # fp32: gloo SUM + divide gives the reference gradient
        assert r["micro"] == 2
        # dp_shard > 1: one reduce-scatter per FSDP unit (3 layers + root) per microbatch, so gradients stay
        # sharded between microbatches (tests/parallel/test_fsdp_grad_accum.py measures the memory)
        assert r["units"] == 4 and r["reduce_scatters"] == r["units"] * r["micro"], r
