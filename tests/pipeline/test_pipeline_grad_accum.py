"""The pipeline's gradient accumulation keeps FSDP2 gradients sharded (pp 2 x dp_shard 2, 4 gloo ranks).

Between the microbatches of one pipeline step, the gradient bytes held on a rank (every leaf's ``.grad`` the
garbage collector reaches, DTensor gradients by their local shard; not read from FSDP's state) must stay within
the stage's sharded gradient size plus one layer unit. Control: the old switch (FSDP2's
``set_requires_gradient_sync(False)`` on every unit until the stage's last backward) holds the stage's unsharded
gradients, and the same probe sees it. Gradient values through the pipeline are compared with the single-process
model in ``test_train_layouts.py`` (``pp2_fsdp2_full`` runs this policy).
"""

from __future__ import annotations

import copy
import gc
import warnings

import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.parallel.test_equivalence import T, build_reference, model_cfg

MICRO = 4
PRELOAD = ("torch", "torch.distributed", "torch.distributed.tensor", "attnres_train.model")


def _cfg(mode, nb):
    cfg = model_cfg(mode, nb)
    cfg.num_layers = 6
    cfg.mla_layers = [1, 4]
    return cfg


def _grad_bytes() -> int:
    """Bytes of every distinct gradient storage reachable from a leaf tensor in this process."""
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if not isinstance(o, torch.Tensor) or not o.is_leaf or o.grad is None:
                continue
            g = o.grad.to_local() if hasattr(o.grad, "to_local") else o.grad
            st = g.untyped_storage()
            if st.nbytes():
                storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _old_switch(pipe):
    """The accumulation switch before the fix: no reduction at all until each stage's last backward."""
    units = {st.stage: [m for m in st.modules() if hasattr(m, "set_requires_gradient_sync")] for st in pipe.stages}

    def set_sync(stages, enabled):
        for s in stages:
            for u in units[s]:
                u.set_requires_gradient_sync(enabled, recurse=False)

    return set_sync


def _body(old: bool):
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.pipeline import PipelineConfig
    from attnres_train.parallel.data_parallel import layer_unit
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.parts import decoder_layers
    from attnres_train.parallel.pipeline.parallelize import parallelize_pipeline

    cfg = _cfg("block", 2)
    pctx = build_parallel_context(ParallelConfig(pp=2, dp_shard=2), cfg, seq_len=T, world_size=dist.get_world_size())
    model = copy.deepcopy(build_reference("block", 2, _cfg)).float()
    pipe = parallelize_pipeline(model, pctx, pipeline_cfg=PipelineConfig(schedule="1f1b"))
    if old:
        pipe._set_grad_sync = _old_switch(pipe)
    g = torch.Generator().manual_seed(5 + pctx.dp_rank)
    mbs = []
    for _ in range(MICRO):
        ids = torch.randint(0, cfg.vocab_size, (1, T + 1), generator=g)
        mbs.append((ids[:, :-1], ids[:, 1:]))

    rt, held = pipe.runtime, []
    backward = rt._backward

    def measured(s, m, split=False):
        backward(s, m, split=split)
        gc.collect()
        held.append((m, _grad_bytes()))

    pipe.step(mbs)  # FSDP2 lazy init and buffers
    for st in pipe.stages:
        st.zero_grad(set_to_none=True)
    rt._backward = measured
    pipe.step(mbs)
    st = pipe.stages[0]
    sharded = sum(p.grad.to_local().numel() * 4 for p in st.parameters() if p.grad is not None)
    full = sum(p.numel() * 4 for p in st.parameters())
    layer = max(sum(p.numel() * 4 for m in layer_unit(lay) for p in m.parameters()) for lay in decoder_layers(st))
    return {"held": held, "sharded": sharded, "full": full, "layer": layer}


def test_pipeline_accumulation_holds_only_sharded_gradients():
    new = run_distributed(_body, 4, False, timeout=180, preload=PRELOAD)
    old = run_distributed(_body, 4, True, timeout=180, preload=PRELOAD)
    for rank, (r, o) in enumerate(zip(new, old)):
        sharded, full, layer = r["sharded"], r["full"], r["layer"]
        assert 2 * sharded >= full - 1024, r  # the premise: the stage is sharded over 2 ranks
        assert full > sharded + layer, r  # so holding its unsharded gradients would break the bound below
        between = [b for m, b in r["held"] if m < MICRO - 1]
        assert len(between) == MICRO - 1, r
        for b in between:
            assert b <= sharded + layer, f"rank {rank}: {b} gradient bytes held between microbatches: {r}"
        old_between = [b for m, b in o["held"] if m < MICRO - 1]
        assert max(old_between) >= full - 1024, f"rank {rank}: the probe missed the old switch's gradients: {o}"
        print(
            f"rank {rank}: held between microbatches {between} (old switch {old_between}); sharded {sharded}, "
            f"full {full}"
        )
