"""FSDP2 gradient accumulation keeps gradients sharded, and bf16 training uses FSDP2 mixed precision (gloo).

* Memory: with ``dp_shard = 2`` and 4 microbatches, the bytes of tensor storage alive between microbatches (every
  tensor the garbage collector reaches, and leaves' ``.grad``; not read from FSDP's state) stay within the sharded gradient size plus one
  layer: ``no_grad_sync`` must not keep the whole model's unsharded gradients until the last microbatch.
  The accumulated gradients still equal the fp64 single-process reference.
* bf16: ``trainer.precision=bf16`` gives the layer units bf16 compute parameters and fp32 sharded gradients;
  the root unit (embedding, head, AttnRes queries) keeps fp32; the loss is within bf16 tolerance of fp32.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.parallel.test_equivalence import T, build_reference, model_cfg, rel_err

MICRO = 4


def _batch():
    return torch.randint(0, 64, (2 * MICRO, T + 1), generator=torch.Generator().manual_seed(7))


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process that Python can reach: each tensor object
    the garbage collector tracks, and the ``.grad`` of each leaf (read from the tensors, not from FSDP)."""
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if not isinstance(o, torch.Tensor):
                continue
            for t in (o, o.grad if o.is_leaf else None):
                if t is None or t.is_meta or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
                    continue  # wrapper subclasses (DTensor) hold no storage: their local tensors are counted
                try:
                    st = t.untyped_storage()
                    if st.nbytes():  # FSDP2 frees unsharded parameters by resizing their storage to 0
                        storages[st.data_ptr()] = st.nbytes()
                except RuntimeError:  # a storage without data (invalid / freed)
                    continue
    return sum(storages.values())


def _accum_body():
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.parallel.data_parallel import grad_sync, layer_unit
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.parallelize import parallelize_model
    from attnres_train.parallel.parts import decoder_layers
    from attnres_train.parallel.train_step import local_batch
    from tests.full_tensors import full_grads

    pctx = build_parallel_context(
        ParallelConfig(dp_shard=2), model_cfg("block", 2), seq_len=T, world_size=dist.get_world_size()
    )
    ref = build_reference("block", 2).float()
    model = parallelize_model(copy.deepcopy(ref), pctx)
    ids = _batch()
    loc = local_batch(ids, pctx)  # MICRO rows: one sequence per microbatch

    def accumulate(after_micro):
        for i in range(MICRO):
            with grad_sync(model, enabled=(i == MICRO - 1)):
                out = model(loc[i : i + 1, :-1], labels=loc[i : i + 1, 1:])
                ((out.loss + out.aux_loss) / MICRO).backward()
                del out
            after_micro()

    # A first step sets FSDP2 up (lazy init, buffers); the measured one starts from no gradients.
    accumulate(lambda: None)
    model.zero_grad(set_to_none=True)
    gc.collect()
    start = _live_tensor_bytes()
    held = []
    accumulate(lambda: held.append(_live_tensor_bytes() - start))
    sharded = sum(p.grad.to_local().numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    layer = max(sum(p.numel() * 4 for m in layer_unit(lay) for p in m.parameters()) for lay in decoder_layers(model))
    full = sum(p.numel() * 4 for p in model.parameters())
    g = full_grads(model)  # the measured step's gradients only (zeroed after the first)
    # the reference: the mean of the per-sequence losses of the global batch, in fp64
    ref64 = build_reference("block", 2)
    for s in range(ids.shape[0]):
        o = ref64(ids[s : s + 1, :-1], labels=ids[s : s + 1, 1:])
        ((o.loss + o.aux_loss) / ids.shape[0]).backward()
    err = max(rel_err(g[n], p.grad) for n, p in ref64.named_parameters() if p.grad is not None)
    return {"held": held, "sharded": sharded, "layer": layer, "full": full, "err": err}


def test_fsdp2_accumulation_holds_only_sharded_gradients():
    for r in run_distributed(_accum_body, 2, timeout=120):
        held, sharded, layer, full = r["held"], r["sharded"], r["layer"], r["full"]
        assert 2 * sharded >= full - 1024, r  # the premise: sharded over 2 ranks (padding aside)
        assert full > sharded + layer, r  # so holding unsharded gradients would break the bound below
        for b in held[:-1]:  # between microbatches
            assert 0.5 * sharded <= b <= sharded + layer, r
        assert r["err"] < 1e-5, r  # fp32 against the fp64 reference: the accumulation is still exact


def _bf16_body():
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.train import OptimConfig
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.parts import decoder_layers
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.train.train_module import TrainModule

    pctx = build_parallel_context(
        ParallelConfig(dp_shard=2), model_cfg("block", 2), seq_len=T, world_size=dist.get_world_size()
    )
    ref = build_reference("block", 2).float()
    par = copy.deepcopy(ref)
    cfg = TrainerConfig(micro_batch_size=1, global_batch_size=2 * MICRO, precision="bf16")
    module = TrainModule(par, OptimConfig(), cfg, pctx, 10)
    seen = {}

    def record(key, get):  # a forward pre-hook that records the parameter dtype the module computes with
        def hook(mod, args):
            seen.setdefault(key, get(mod).dtype)

        return hook

    layer = decoder_layers(par)[1]
    layer.self_attn.register_forward_pre_hook(record("mixer", lambda m: m.o_proj.weight))
    layer.block_sparse_moe.register_forward_pre_hook(record("experts", lambda m: m.experts.w1))
    par.model.embed_tokens.register_forward_pre_hook(record("embed", lambda m: m.weight))
    stats = module.forward_backward(local_batch(_batch(), pctx))
    grads = {p.grad.dtype for p in par.parameters() if p.grad is not None}
    masters = {p.dtype for p in par.parameters()}
    return {"seen": seen, "grads": grads, "masters": masters, "loss": stats["loss"]}


@pytest.mark.slow  # ~20 s on the 2-core box (two more ranks); the accumulation test above is the fast one
def test_fsdp2_bf16_mixed_precision_policy():
    res = run_distributed(_bf16_body, 2, timeout=120)
    ref = build_reference("block", 2).float()
    ids = _batch()
    with torch.no_grad():
        ref_loss = sum(float(ref(ids[s : s + 1, :-1], labels=ids[s : s + 1, 1:]).loss) for s in range(len(ids))) / len(
            ids
        )
    for r in res:
        assert r["seen"] == {"mixer": torch.bfloat16, "experts": torch.bfloat16, "embed": torch.float32}, r
        assert r["grads"] == {torch.float32} and r["masters"] == {torch.float32}, r
        assert 0 < abs(r["loss"] - ref_loss) / ref_loss < 2e-2, (r["loss"], ref_loss)


def _hsdp_body():
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.train import OptimConfig
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.train.train_module import TrainModule
    from tests.full_tensors import full_grads
    from tests.parallel.test_data_parallel import _Collectives

    pctx = build_parallel_context(
        ParallelConfig(dp_replicate=2, dp_shard=2), model_cfg("block", 2), seq_len=T, world_size=dist.get_world_size()
    )
    ref = build_reference("block", 2)
    par = copy.deepcopy(ref).float()
    module = TrainModule(par, OptimConfig(), TrainerConfig(micro_batch_size=1, global_batch_size=8), pctx, 10)
    ids = _batch()
    counter = _Collectives()
    with counter:
        module.forward_backward(local_batch(ids, pctx))  # 2 microbatches on this rank
    g = full_grads(par)
    o = ref(ids[:, :-1], labels=ids[:, 1:])
    (o.loss + o.aux_loss).backward()
    err = max(rel_err(g[n], p.grad) for n, p in ref.named_parameters() if p.grad is not None)
    names = counter.names
    return {
        "err": err,
        "rs": names.count("_reduce_scatter_base_") + names.count("reduce_scatter_tensor_coalesced_"),
        "ar": names.count("allreduce_") + names.count("all_reduce_"),
        "names": sorted(set(names)),
    }


@pytest.mark.slow  # 4 ranks on the 2-core box
def test_hsdp_accumulation_reduce_scatters_every_microbatch_all_reduces_once():
    """HSDP 2x2, 2 microbatches per rank: reduce-scatter per microbatch (sharded gradients), the replica all-reduce
    deferred to the last one, and the gradient still that of the global batch."""
    for r in run_distributed(_hsdp_body, 4, timeout=240):
        assert r["err"] < 1e-5, r
        units = 4  # 3 decoder layers + root
        assert r["rs"] == 2 * units, r
        # the replica all-reduces of the gradients (one per unit, last microbatch only), plus the trainer's few
        # scalar all-reduces (loss weights, loss statistics) which do not depend on the number of units
        assert units <= r["ar"] < 2 * units, r
