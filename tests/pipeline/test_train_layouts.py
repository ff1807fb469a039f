"""Pipeline parallelism through the real training path equals the single-process model.

``build_parallel_context`` -> ``build_train_module`` (``TrainModule`` with the pipeline step engine: ``parallelize_pipeline`` = EP ->
TP/SP -> stage cut -> FSDP2 per stage -> the cached interleaved runtime on the pp mesh) -> ``forward_backward``
-> ``optimizer_step`` (grad norm summed over pp, clipping, AdamW, router-bias update), for 2 steps, fp64.
Compared against the plain model on the whole global batch: loss, aux loss, grad norm, every gradient this
rank owns, global expert loads, and every owned parameter and router bias after the steps. Between them the
layouts cover every rank holding a part of every parallelism at once (issue: one combined layout within 8
ranks, e.g. pp2 x tp2 x ep2).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.parallel.test_equivalence import B, T, build_reference, global_batch, model_cfg, optim_cfg, rel_err

STEPS = 2
TOL = 1e-10
NUM_LAYERS = 4

# name -> (world, parallel kw, pipeline kw, mode, num_blocks)
LAYOUTS = {
    "pp2_vpp2_block": (2, dict(pp=2, vpp=2, dp_shard=1), dict(), "block", 3),
    "pp2_fsdp2_full": (4, dict(pp=2, dp_shard=2), dict(schedule="1f1b"), "full", None),
    "pp2_tp2_sp_prenorm": (4, dict(pp=2, dp_shard=1, tp=2, sp=True), dict(), "prenorm", None),
    # the combined layout: every rank is in a pp, a tp, an ep (= dp) and an FSDP group
    "pp2_fsdp2_tp2_ep2": (8, dict(pp=2, dp_shard=2, tp=2, ep=2), dict(layers_per_stage=[1, 3]), "block", 2),
}


def _cfg(mode, nb):
    cfg = model_cfg(mode, nb)
    cfg.num_layers = NUM_LAYERS
    cfg.mla_layers = [1, 3]
    return cfg


def _body(parallel_kw, pipeline_kw, mode, nb, microbatches=2):
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.pipeline import PipelineConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.schema import Config
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.train.optim import build_optimizers, set_lr
    from attnres_train.train.train_module import build_train_module
    from tests.full_tensors import full_grads, full_state

    ref = build_reference(mode, nb, _cfg)
    ws = dist.get_world_size()
    cfg = Config()
    cfg.model = _cfg(mode, nb)
    cfg.parallel = ParallelConfig(**parallel_kw)
    cfg.pipeline = PipelineConfig(**pipeline_kw)
    cfg.optim = optim_cfg()
    pctx = build_parallel_context(cfg.parallel, cfg.model, seq_len=T, world_size=ws)
    micro = max(1, B // pctx.dp_size // microbatches)  # microbatches per pipeline step (default 2)
    cfg.trainer = TrainerConfig(micro_batch_size=micro, global_batch_size=B, precision="fp32")
    par = copy.deepcopy(ref)
    ref_opts = build_optimizers(ref, cfg.optim)
    module = build_train_module(par, cfg, pctx, max_steps=10)
    chunks = module.model
    ids = global_batch()
    x, y = ids[:, :-1], ids[:, 1:]
    mine = local_batch(ids, pctx)
    res = {"loss": [], "aux": [], "norm": [], "grads": [], "counts": [], "bias": [], "owned": []}
    for step in range(STEPS):
        o = ref(x, labels=y)
        (o.loss + o.aux_loss).backward()
        ref_g = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        stats = module.forward_backward(mine)
        par_g = {n: g for n, g in full_grads(chunks).items() if g is not None}
        res["owned"].append(sorted(par_g))
        res["grads"].append(max(((rel_err(g, ref_g[n]), n) for n, g in par_g.items()), default=(0.0, "-")))
        res["loss"].append(abs(stats["loss"] - float(o.loss.detach())) / abs(float(o.loss.detach())))
        res["aux"].append(abs(stats["aux_loss"] - float(o.aux_loss.detach())) / abs(float(o.aux_loss.detach())))
        ref_names = {id(m): n for n, m in ref.named_modules()}
        ref_by_name = {ref_names[id(m)]: m for m in ref.moe_layers()}
        moes = dict((n, m) for n, m in chunks.named_modules() if hasattr(m, "tokens_per_expert"))
        if moes:  # (a stage of only dense layers has none)
            loads = torch.stack([m.tokens_per_expert.clone() for m in moes.values()])
            pctx.all_reduce_router_loads_(loads)
            ref_loads = torch.stack([ref_by_name[n].tokens_per_expert for n in moes])
            res["counts"].append(float((loads - ref_loads).abs().max()))
        else:
            res["counts"].append(0.0)
        set_lr(ref_opts, step, cfg.optim, 10)
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), cfg.optim.grad_clip)
        for opt in ref_opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        ref.update_router_biases()
        pstats = module.optimizer_step(step)
        res["norm"].append(abs(pstats["grad_norm"] - float(ref_norm)) / float(ref_norm))
        res["bias"].append(
            max(
                (
                    float((m.gate.e_score_correction_bias - ref_by_name[n].gate.e_score_correction_bias).abs().max())
                    for n, m in moes.items()
                ),
                default=0.0,
            )
        )
    ref_p = dict(ref.named_parameters())
    res["params"] = max((rel_err(p, ref_p[n]), n) for n, p in full_state(chunks).items())
    res["all_names"] = sorted(ref_g)
    res["pp_rank"] = module.engine.pipe.pp_rank
    return res


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_layout_matches_single_process(layout):
    world, pkw, pipe_kw, mode, nb = LAYOUTS[layout]
    results = run_distributed(_body, world, pkw, pipe_kw, mode, nb, timeout=420)
    for rank, r in enumerate(results):
        where = f"{layout} rank {rank} (pp rank {r['pp_rank']})"
        for step in range(STEPS):
            assert r["loss"][step] <= TOL, f"{where} step {step}: loss rel err {r['loss'][step]:.2e}"
            assert r["aux"][step] <= TOL, f"{where} step {step}: aux rel err {r['aux'][step]:.2e}"
            err, name = r["grads"][step]
            assert err <= TOL, f"{where} step {step}: grad {name} rel err {err:.2e}"
            assert r["counts"][step] == 0, f"{where} step {step}: expert loads differ by {r['counts'][step]}"
            assert r["norm"][step] <= TOL, f"{where} step {step}: grad norm rel err {r['norm'][step]:.2e}"
            assert r["bias"][step] == 0, f"{where} step {step}: router bias differs by {r['bias'][step]:.2e}"
        err, name = r["params"]
        assert err <= TOL, f"{where}: after {STEPS} steps param {name} rel err {err:.2e}"
    # the pp ranks together own every parameter that has a gradient, each exactly once
    by_pp = {}
    for r in results:
        by_pp.setdefault(r["pp_rank"], set()).update(r["owned"][-1])
    owned = [n for names in by_pp.values() for n in names]
    assert sorted(owned) == results[0]["all_names"], "stages do not partition the model's parameters"
