"""Every parallel layout equals the single-process model: loss, every gradient, 3 AdamW steps + router biases.

One process spawn per layout (gloo, fp64); inside it all three residual modes (prenorm, full, block with random
non-zero pseudo-queries) run through the real training path: ``build_parallel_context`` ->
``TrainModule`` (``parallelize_model``: TP/SP -> EP -> FSDP2/HSDP/replicate; microbatches with no-sync
accumulation; token-weighted loss normalisation; DTensor-aware clipping; AdamW; router-bias update over the
data-parallel group). The reference is the plain model, built in every rank's process from the same seed, on
the whole global batch, with torch's own ``clip_grad_norm_`` and the model's own bias update.

Compared (max-abs error relative to the reference tensor's max magnitude, fp64):
loss, aux loss and grad norm of every step; EVERY parameter gradient (gathered to full tensors: FSDP, TP and
EP DTensors) of every step; the global expert loads; and after 3 optimizer steps every parameter and every
router bias.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

B, T = 4, 8  # global batch: B sequences of T tokens (+1 for the shifted labels)
STEPS = 3
TOL = 1e-10
MODES = (("prenorm", None), ("full", None), ("block", 2))

# name -> (world size, parallel config, tags); "ac" adds activation checkpointing (FSDP hooks inside the
# recomputed layer; EP's all-to-all replayed in backward)
LAYOUTS = {
    "dp2": (2, dict(dp_replicate=2, dp_shard=1), ()),
    "fsdp2_ac": (2, dict(dp_shard=2), ("ac",)),
    "tp2": (2, dict(dp_shard=1, tp=2), ("tensor",)),
    "tp2_sp": (2, dict(dp_shard=1, tp=2, sp=True), ("tensor",)),
    "ep2": (2, dict(dp_replicate=2, dp_shard=1, ep=2), ("expert",)),  # replicate (DDP) + EP
    "ep4": (4, dict(dp_shard=4, ep=4), ("expert",)),  # FSDP + EP, experts not FSDP-sharded further
    "tp2_ep2": (4, dict(dp_replicate=2, dp_shard=1, tp=2, ep=2), ("tensor", "expert")),
    "fsdp2_tp2_ep2": (4, dict(dp_shard=2, tp=2, ep=2), ("tensor", "expert")),
    "fsdp2_tp2_sp_ep2": (4, dict(dp_shard=2, tp=2, sp=True, ep=2), ("tensor", "expert")),
    # beyond the list: HSDP, and experts FSDP-sharded over the leftover dp_shard (edp_shard = 2)
    "hsdp2x2_ep2_ac": (4, dict(dp_replicate=2, dp_shard=2, ep=2), ("expert", "ac")),
    "fsdp4_ep2": (4, dict(dp_shard=4, ep=2), ("expert",)),
}


def model_cfg(mode, num_blocks):
    from attnres_train.config.model import KDAConfig, MLAConfig, ModelConfig, MoEConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, mla_layers=[1])
    cfg.kda = KDAConfig(num_heads=2, head_dim=16, chunk_size=8)
    cfg.mla = MLAConfig(num_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    cfg.moe = MoEConfig(
        num_experts=8,
        top_k=2,
        intermediate_size=16,
        num_shared_experts=1,
        first_k_dense=1,
        dense_intermediate_size=32,
        seq_aux_loss_coef=0.01,
    )
    cfg.residual.mode = mode
    cfg.residual.num_blocks = num_blocks
    return cfg


def optim_cfg():
    from attnres_train.config.train import OptimConfig

    # grad_clip small enough that clipping is active (the clipped path is the one worth comparing)
    return OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, warmup_steps=1, schedule="constant", grad_clip=0.05)


def global_batch():
    return torch.randint(0, 64, (B, T + 1), generator=torch.Generator().manual_seed(123))


def build_reference(mode, nb, cfg_fn=None):
    """The fp64 single-process reference from the same seed (``cfg_fn(mode, nb)``, default :func:`model_cfg`)."""
    from attnres_train.model import build_model
    from tests.model.helpers import randomize_queries

    torch.manual_seed(0)
    model = build_model((cfg_fn or model_cfg)(mode, nb)).to(torch.float64)
    if mode != "prenorm":
        randomize_queries(model)
    model.train()
    return model


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _worst(errs: dict) -> tuple:
    name = max(errs, key=errs.get)
    return name, errs[name]


# ------------------------------------------------------------------------------------------------ rank body
def _layout_body(parallel_kw, ac=False):
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.model.moe import MoE
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.parallel.wrap import is_checkpointed
    from attnres_train.train.optim import build_optimizers, set_lr
    from attnres_train.train.train_module import TrainModule
    from tests.full_tensors import full_grads, full_state

    ws = dist.get_world_size()
    pctx = build_parallel_context(ParallelConfig(**parallel_kw), model_cfg("block", 2), seq_len=T, world_size=ws)
    ocfg = optim_cfg()
    # At most 2 microbatches per rank (gradient accumulation with no-sync is exercised wherever dp <= 2;
    # TP's DTensor forwards are slow on CPU, so no more than that).
    micro = max(1, B // pctx.dp_size // 2)
    tcfg = TrainerConfig(micro_batch_size=micro, global_batch_size=B, precision="fp32", activation_checkpointing=ac)
    ids = global_batch()
    x, y = ids[:, :-1], ids[:, 1:]
    out = {"dp_size": pctx.dp_size, "micro_per_rank": B // pctx.dp_size // micro}
    for mode, nb in MODES:
        ref = build_reference(mode, nb)
        par = copy.deepcopy(ref)
        ref_opts = build_optimizers(ref, ocfg)
        module = TrainModule(par, ocfg, tcfg, pctx, max_steps=10)
        mine = local_batch(ids, pctx)
        res = {"loss": [], "aux": [], "norm": [], "grads": [], "counts": [], "bias": [], "clipped": []}
        for step in range(STEPS):
            # reference: one forward over the whole global batch
            o = ref(x, labels=y)
            (o.loss + o.aux_loss).backward()
            # (full mode: layer 0's mixer reads only the embedding, so its pseudo-query has no gradient)
            ref_g = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
            # parallel: this rank's slice, microbatches, sync on the last one
            stats = module.forward_backward(mine)
            par_g = full_grads(par)
            missing = sorted(n for n, g in par_g.items() if (g is None) != (n not in ref_g))
            assert not missing, f"gradient presence differs from the reference for {missing}"
            res["grads"].append(_worst({n: rel_err(par_g[n], ref_g[n]) for n in ref_g}))
            ref_loss, ref_aux = float(o.loss.detach()), float(o.aux_loss.detach())
            res["loss"].append(abs(stats["loss"] - ref_loss) / abs(ref_loss))
            res["aux"].append(abs(stats["aux_loss"] - ref_aux) / abs(ref_aux))
            # global expert loads: the local counters summed over dp (and tp with SP) equal the full-batch ones
            moes = [m for m in par.modules() if isinstance(m, MoE)]
            loads = torch.stack([m.tokens_per_expert.clone() for m in moes])
            pctx.all_reduce_router_loads_(loads)
            ref_loads = torch.stack([m.tokens_per_expert.clone() for m in ref.moe_layers()])
            res["counts"].append(float((loads - ref_loads).abs().max()))
            # optimizer steps
            set_lr(ref_opts, step, ocfg, 10)
            ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), ocfg.grad_clip)
            for opt in ref_opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
            ref.update_router_biases()
            pstats = module.optimizer_step(step)
            res["norm"].append(abs(pstats["grad_norm"] - float(ref_norm)) / float(ref_norm))
            res["clipped"].append(float(ref_norm) > ocfg.grad_clip)
            res["bias"].append(
                max(
                    float((a.gate.e_score_correction_bias - b.gate.e_score_correction_bias).abs().max())
                    for a, b in zip(moes, ref.moe_layers())
                )
            )
        ref_p = dict(ref.named_parameters())
        par_p = full_state(par)
        res["params"] = _worst({n: rel_err(par_p[n], ref_p[n]) for n in ref_p})
        res["n_params"] = len(par_p)
        res["ac"] = "activation_checkpointing" in par.parallel_plan and all(
            is_checkpointed(layer) for layer in par.model.layers
        )
        out[mode] = res
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout):
    world, kw, needs = LAYOUTS[layout]
    results = run_distributed(_layout_body, world, kw, ac="ac" in needs, timeout=120)
    for rank, out in enumerate(results):
        for mode, _ in MODES:
            r = out[mode]
            where = f"{layout} rank {rank} mode {mode}"
            for step in range(STEPS):
                assert r["loss"][step] <= TOL, f"{where} step {step}: loss rel err {r['loss'][step]:.2e}"
                assert r["aux"][step] <= TOL, f"{where} step {step}: aux loss rel err {r['aux'][step]:.2e}"
                name, err = r["grads"][step]
                assert err <= TOL, f"{where} step {step}: grad {name} rel err {err:.2e}"
                assert r["counts"][step] == 0, f"{where} step {step}: expert loads differ by {r['counts'][step]}"
                assert r["norm"][step] <= TOL, f"{where} step {step}: grad norm rel err {r['norm'][step]:.2e}"
                assert r["bias"][step] == 0, f"{where} step {step}: router bias differs by {r['bias'][step]:.2e}"
            assert r["ac"] == ("ac" in needs), f"{where}: activation checkpointing applied = {r['ac']}"
            name, err = r["params"]
            assert err <= TOL, f"{where}: after {STEPS} steps param {name} rel err {err:.2e}"
    assert any(any(out[m]["clipped"]) for out in results for m, _ in MODES), "clipping was never active"
