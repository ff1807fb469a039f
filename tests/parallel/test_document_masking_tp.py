"""Document masking under tensor parallelism (± SP), FSDP + activation checkpointing and pipeline parallelism

Why separate from test_equivalence: the document ids are a keyword argument of the token mixers that the TP
wrappers pass through untouched (only the activation is redistributed), and with SP the mixers see the whole
gathered sequence, so the full ``[B, T]`` ids are the right ones. One step, Block AttnRes, fp64, gloo.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

B, T = 4, 16
EOS = 63
TOL = 1e-10


def packed_ids():
    ids = torch.randint(0, EOS, (B, T + 1), generator=torch.Generator().manual_seed(7))
    for b, cuts in enumerate([(3, 8), (5,), (1, 2, 11), (15,)]):  # EOS positions: documents of 1..16 tokens
        for c in cuts:
            ids[b, c] = EOS
    return ids


def _tp_body(parallel_kw, ac):
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.train import OptimConfig
    from attnres_train.model.doc_mask import document_ids
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.parallel.wrap import is_checkpointed
    from attnres_train.train.train_module import TrainModule
    from tests.full_tensors import full_grads
    from tests.parallel.test_equivalence import build_reference, model_cfg, rel_err

    ws = dist.get_world_size()
    pctx = build_parallel_context(ParallelConfig(**parallel_kw), model_cfg("block", 2), seq_len=T, world_size=ws)
    tcfg = TrainerConfig(
        micro_batch_size=B // pctx.dp_size, global_batch_size=B, precision="fp32", activation_checkpointing=ac
    )
    ids = packed_ids()
    x, y = ids[:, :-1], ids[:, 1:]
    ref = build_reference("block", 2)
    par = copy.deepcopy(ref)
    module = TrainModule(par, OptimConfig(), tcfg, pctx, max_steps=10, doc_eos_id=EOS)
    o = ref(x, labels=y, doc_ids=document_ids(x, EOS))
    (o.loss + o.aux_loss).backward()
    ref_g = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    stats = module.forward_backward(local_batch(ids, pctx))
    par_g = full_grads(par)
    plain = float(ref(x, labels=y).loss)
    assert all(is_checkpointed(layer) == ac for layer in par.model.layers)
    return {
        "loss": abs(stats["loss"] - float(o.loss)) / float(o.loss),
        "plain_gap": abs(plain - float(o.loss)),
        "grad": max(rel_err(par_g[n], ref_g[n]) for n in ref_g),
    }


# name -> (parallel config, activation checkpointing: the wrapper must pass doc_ids through)
LAYOUTS = {
    "tp2": (dict(dp_shard=1, tp=2), False),
    "tp2_sp": (dict(dp_shard=1, tp=2, sp=True), False),
    "fsdp2_ac": (dict(dp_shard=2), True),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_document_masking_under_tensor_parallelism(layout):
    results = run_distributed(_tp_body, 2, *LAYOUTS[layout], timeout=180)
    for rank, r in enumerate(results):
        assert r["loss"] <= TOL and r["grad"] <= TOL, f"rank {rank}: {r}"
        assert r["plain_gap"] > 1e-4, "masking made no difference: the check would be vacuous"


def _pp_body(parallel_kw):
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.pipeline import PipelineConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.schema import Config
    from attnres_train.model.doc_mask import document_ids
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.train.train_module import build_train_module
    from tests.full_tensors import full_grads
    from tests.parallel.test_equivalence import build_reference, model_cfg, rel_err

    def cfg_fn(mode, nb):  # 4 layers, MLA on 1 and 3: both mixers on both stages
        c = model_cfg(mode, nb)
        c.num_layers, c.mla_layers = 4, [1, 3]
        return c

    ref = build_reference("block", 2, cfg_fn)
    cfg = Config()
    cfg.model, cfg.parallel, cfg.pipeline = cfg_fn("block", 2), ParallelConfig(**parallel_kw), PipelineConfig()
    pctx = build_parallel_context(cfg.parallel, cfg.model, seq_len=T, world_size=dist.get_world_size())
    cfg.trainer = TrainerConfig(micro_batch_size=B // pctx.dp_size // 2, global_batch_size=B, precision="fp32")
    module = build_train_module(copy.deepcopy(ref), cfg, pctx, max_steps=10, doc_eos_id=EOS)
    ids = packed_ids()
    x, y = ids[:, :-1], ids[:, 1:]
    o = ref(x, labels=y, doc_ids=document_ids(x, EOS))
    (o.loss + o.aux_loss).backward()
    ref_g = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    stats = module.forward_backward(local_batch(ids, pctx))
    par_g = {n: g for n, g in full_grads(module.model).items() if g is not None}
    plain = float(ref(x, labels=y).loss)
    return {
        "loss": abs(stats["loss"] - float(o.loss)) / float(o.loss),
        "plain_gap": abs(plain - float(o.loss)),
        "grad": max(rel_err(g, ref_g[n]) for n, g in par_g.items()),
        "n": len(par_g),
    }


@pytest.mark.slow
def test_document_masking_under_pipeline_parallelism():
    """pp=2 (2 microbatches, 1F1B-style runtime): every stage derives the document ids from the tokens."""
    results = run_distributed(_pp_body, 2, dict(pp=2, dp_shard=1), timeout=180)
    for rank, r in enumerate(results):
        assert r["n"] > 5 and r["loss"] <= TOL and r["grad"] <= TOL, f"rank {rank}: {r}"
        assert r["plain_gap"] > 1e-4
