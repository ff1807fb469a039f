"""How parallelism is applied (docs/parallel.md): names stay, seams are substituted modules, the plan is recorded.

Why: checkpoints, optimizers and exports address parameters by name, so a parallelized model must expose exactly
the plain model's ``named_parameters()`` and ``state_dict`` keys; and what was applied must be readable from the
model (``model.parallel_plan``) instead of flags. 4 gloo ranks: FSDP2 2 x TP 2 + SP x EP 2, with activation
checkpointing, on a meta model materialised afterwards, then one forward/backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

B, T = 4, 8


def _diff(got, want):
    """What differs: the names only on one side, else the first positions whose names differ."""
    return sorted(set(got) ^ set(want)) or [(a, b) for a, b in zip(got, want) if a != b][:4]


def _plan_body():
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.model import build_model
    from attnres_train.model.lm_loss import LMLoss
    from attnres_train.model.moe import MoE, SequenceStats
    from attnres_train.parallel.expert import ExpertParallelExperts
    from attnres_train.parallel.init import materialize_and_init
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.parallelize import ParallelPlan, parallelize_model
    from attnres_train.parallel.tensor import apply_tensor_parallel
    from attnres_train.parallel.tensor_loss import VocabParallelLMLoss
    from attnres_train.parallel.tensor_regions import SequenceParallelStats
    from attnres_train.parallel.wrap import is_checkpointed
    from tests.parallel.test_equivalence import model_cfg

    cfg = model_cfg("block", 2)
    pctx = build_parallel_context(
        ParallelConfig(dp_shard=2, tp=2, sp=True, ep=2), cfg, seq_len=T, world_size=dist.get_world_size()
    )
    plain = build_model(cfg, device="meta")
    model = build_model(cfg, device="meta")
    parallelize_model(model, pctx, TrainerConfig(activation_checkpointing=True))
    materialize_and_init(model, pctx.device, cfg, seed=3)
    out = {
        "plan": model.parallel_plan,
        "expected_plan": ParallelPlan(
            steps=("expert_parallel", "tensor_parallel", "activation_checkpointing", "data_parallel"),
            ep=2,
            tp=2,
            sp=True,
            dp=2,
            pp=1,
        ),
    }
    names, plain_names = [n for n, _ in model.named_parameters()], [n for n, _ in plain.named_parameters()]
    keys, plain_keys = list(model.state_dict()), list(plain.state_dict())
    out["names"] = names == plain_names or _diff(names, plain_names)
    out["keys"] = keys == plain_keys or _diff(keys, plain_keys)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    out["seams"] = (
        isinstance(model.lm_loss, VocabParallelLMLoss)
        and all(isinstance(m.experts, ExpertParallelExperts) for m in moes)
        and all(isinstance(m.sequence_stats, SequenceParallelStats) for m in moes)
        and type(plain.lm_loss) is LMLoss
        and all(type(m.sequence_stats) is SequenceStats for m in plain.modules() if isinstance(m, MoE))
    )
    out["ac"] = all(is_checkpointed(layer) for layer in model.model.layers)
    try:
        parallelize_model(model, pctx)
        out["twice"] = "no error"
    except RuntimeError as e:
        out["twice"] = str(e)

    # One step: the regions swap local views in and back; afterwards every parameter is the registered one.
    params_before = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(
        0, cfg.vocab_size, (B // 2, T + 1), generator=torch.Generator().manual_seed(0)
    )  # same on every rank
    res = model(ids[:, :-1], labels=ids[:, 1:])
    (res.loss + res.aux_loss).backward()
    after = dict(model.named_parameters())
    out["same_params"] = list(after) == list(params_before) and all(after[n] is p for n, p in params_before.items())
    out["all_grads"] = all(p.grad is not None for p in model.parameters())
    # Without FSDP2 on top (whose unshard / reshard hooks would re-register the parameters and so mask a
    # region that leaves its local views behind): TP + SP alone on a fresh model. After a forward every
    # parameter is the registered object again; and a region whose forward raises (after its pre-hook swapped
    # the views in: an unknown keyword only fails at the call of forward itself) swaps them back too
    # (the always_call hook).
    tp_only = build_model(cfg)
    apply_tensor_parallel(tp_only, pctx.tp_mesh, sequence_parallel=True)
    registered = dict(tp_only.named_parameters())
    tp_only(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    out["tp_same_params"] = all(p is registered[n] for n, p in tp_only.named_parameters())
    attn = tp_only.model.layers[0].self_attn
    x = torch.zeros(B // 2, T // 2, cfg.hidden_size)  # this rank's sequence shard (SP)
    try:
        attn(x, bogus_keyword=1)
        out["restored"] = "no error"
    except TypeError as e:
        out["restored"] = (
            "bogus_keyword" in str(e)
            and all(p is registered[f"model.layers.0.self_attn.{n}"] for n, p in attn.named_parameters())
        ) or str(e)
    return out


@pytest.mark.slow
def test_parallelized_names_seams_and_plan():
    for rank, r in enumerate(run_distributed(_plan_body, 4, timeout=240)):
        assert r["names"] is True, f"rank {rank}: named_parameters differ from the plain model: {r['names']}"
        assert r["keys"] is True, f"rank {rank}: state_dict keys differ from the plain model: {r['keys']}"
        assert r["seams"], f"rank {rank}: parallel seams are not the substituted modules"
        assert r["ac"], f"rank {rank}: activation checkpointing missing on some layer"
        assert r["plan"] == r["expected_plan"], f"rank {rank}: {r['plan']}"
        assert "already applied" in r["twice"], f"rank {rank}: applying twice gave {r['twice']!r}"
        assert r["same_params"] and r["all_grads"] and r["tp_same_params"], f"rank {rank}: {r}"
        assert r["restored"] is True, f"rank {rank}: a failing region left its parameters swapped: {r['restored']}"
