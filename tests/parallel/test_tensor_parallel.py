"""Tensor parallelism (+ sequence parallelism) equals the single-process model, on 2 gloo ranks in fp64.

What is proven here:

* ``apply_tensor_parallel`` (tp=2, with and without SP) reproduces the plain model's loss, logits and *every*
  parameter gradient (DTensor grads gathered with ``full_tensor()``) for each residual mode - PreNorm, Full
  AttnRes and Block AttnRes with non-zero pseudo-queries - to ~1e-13 relative (tolerance 1e-10). The model has
  every layer type: KDA + dense FFN, MLA + MoE (router, routed experts, shared expert), KDA + MoE, and the
  cases also cover tied embeddings, the sequence-wise MoE balance loss, ignored labels, gradient
  accumulation over two backward passes, and (Block) the train module's ``clip_grad_norm_`` plus one AdamW step
  on the DTensor parameters.
* Every gradient has its parameter's placements (replicated parameters' partial gradients were all-reduced).
* The AttnRes depth mixing (``depth_read`` both schedules, ``phase1``, ``phase2``, ``mix_direct``,
  ``depth_weights``) issues no collective on sequence-sharded DTensors and matches the unsharded result, and
  a whole SP forward issues exactly as many collectives in Block/Full AttnRes mode as in PreNorm mode.
* Composition: activation checkpointing on top of TP (Full AttnRes cases), and TP+SP after expert parallelism
  on 4 ranks (dp 2 folded into EP x tp 2), where the EP experts' gradients must also be summed over tp.
* The vocab-parallel cross entropy equals ``F.cross_entropy`` (value and gradient, with ignored rows).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed import DEFAULT_PRELOAD, run_distributed
from tests.model.helpers import build, randomize_queries, tiny_cfg

TOL = 1e-10
# Importing DTensor and its sharding rules takes seconds per process: let the forkserver do it once.
PRELOAD = DEFAULT_PRELOAD + (
    "torch.distributed.tensor",
    "torch.distributed.tensor.parallel",
    "torch.distributed.tensor.debug",
    "torch._dynamo",
    "attnres_train.parallel.tensor",
    "tests.model.helpers",
)
# 3 decoder layers: 0 = KDA + dense SwiGLU, 1 = MLA + MoE, 2 = KDA + MoE (every layer type, fewest DTensor
# op signatures to warm up). Block mode: block_size 2 -> blocks {layers 0-1}, {layer 2}.
CASES = {
    "prenorm": dict(tie_word_embeddings=True),
    "full": dict(),
    "block": dict(block_size=2),
}


def _cfg(mode: str):
    kw = dict(CASES[mode])
    block_size = kw.pop("block_size", None)
    cfg = tiny_cfg(mode, block_size=block_size, num_layers=3, **kw)
    cfg.mla_layers = [1]
    if mode == "block":
        cfg.moe.seq_aux_loss_coef = 0.05  # exercised (and made exact) under SP
    return cfg


def _batch(vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    labels = torch.randint(0, vocab, (2, 16), generator=g)
    labels[0, :3] = -100
    return ids, labels


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _tp_vs_single(mode: str, sp: bool, steps: int):
    """In each rank: the plain model and its TP copy on the same batch; returns error metrics."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from attnres_train.parallel.tensor import apply_tensor_parallel
    from attnres_train.parallel.wrap import apply_activation_checkpointing

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cfg = _cfg(mode)
    ref = build(cfg)  # fp64, same seed on every rank
    if mode != "prenorm":
        randomize_queries(ref)
    model = copy.deepcopy(ref)
    apply_tensor_parallel(model, mesh, sequence_parallel=sp)
    if mode == "full":  # the documented order: TP, then activation checkpointing (recompute re-gathers)
        apply_activation_checkpointing(model)

    ids, labels = _batch(cfg.vocab_size)
    for _ in range(steps):  # steps > 1: gradients accumulate
        out_ref = ref(ids, labels=labels)
        (out_ref.loss + (out_ref.aux_loss if out_ref.aux_loss is not None else 0)).backward()
        out = model(ids, labels=labels)
        (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()

    res = {
        "loss": _rel_err(out.loss.detach(), out_ref.loss.detach()),
        "loss_is_plain": not isinstance(out.loss, DTensor),
        "logits": _rel_err(_full(model(ids).detach()), ref(ids).detach()),  # the fused loss builds no logits
        "aux": None if out_ref.aux_loss is None else _rel_err(out.aux_loss.detach(), out_ref.aux_loss.detach()),
        "grads": {},
        "missing": [],
        "placement_mismatch": [],
        "not_dtensor": [],
    }
    ref_params = dict(ref.named_parameters())
    if mode == "block":  # the train module's clipping and an AdamW step work on the DTensor parameters
        from attnres_train.parallel.train_step import clip_grad_norm_

        norms = [float(_full(clip_grad_norm_(list(m.parameters()), 0.5))) for m in (ref, model)]
        res["grad_norm"] = abs(norms[1] - norms[0]) / norms[0]
        for m in (ref, model):
            torch.optim.AdamW(m.parameters(), lr=1e-2).step()
        res["params_after_step"] = max(
            _rel_err(_full(p.detach()), ref_params[name].detach()) for name, p in model.named_parameters()
        )
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        if not isinstance(p, DTensor):
            res["not_dtensor"].append(name)
        if p.grad is None or g_ref is None:
            if (p.grad is None) != (g_ref is None):
                res["missing"].append(name)
            continue
        if isinstance(p, DTensor) and p.grad.placements != p.placements:
            res["placement_mismatch"].append((name, str(p.grad.placements), str(p.placements)))
        res["grads"][name] = _rel_err(_full(p.grad), g_ref)
    return res


def _check(results, mode, sp):
    for rank, r in enumerate(results):
        tag = f"{mode} {'tp2+sp' if sp else 'tp2'} rank {rank}"
        assert r["loss"] <= TOL, f"{tag}: loss rel err {r['loss']:.2e}"
        assert r["loss_is_plain"], f"{tag}: loss should be a plain tensor"
        assert r["logits"] <= TOL, f"{tag}: logits rel err {r['logits']:.2e}"
        if r["aux"] is not None:
            assert r["aux"] <= TOL, f"{tag}: aux loss rel err {r['aux']:.2e}"
        assert not r["missing"], f"{tag}: grad None on one side only: {r['missing']}"
        assert not r["not_dtensor"], f"{tag}: parameters left plain: {r['not_dtensor']}"
        assert not r["placement_mismatch"], f"{tag}: grad placements differ: {r['placement_mismatch']}"
        worst = sorted(r["grads"].items(), key=lambda kv: -kv[1])[:3]
        assert worst[0][1] <= TOL, f"{tag}: worst gradient errors {worst}"
        assert len(r["grads"]) > 50, f"{tag}: only {len(r['grads'])} gradients compared"
        for key in ("grad_norm", "params_after_step"):
            if key in r:
                assert r[key] <= TOL, f"{tag}: {key} rel err {r[key]:.2e}"


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("mode", list(CASES))
def test_tensor_parallel_matches_single_process(mode, sp):
    steps = 2 if mode == "block" else 1
    results = run_distributed(_tp_vs_single, 2, mode, sp, steps, timeout=150, preload=PRELOAD)
    _check(results, mode, sp)


# ------------------------------------------------------------------------------- composition with EP
def _tp_sp_with_expert_parallel():
    """4 ranks = (dp 2) x (tp 2); EP shards the experts over dp (folded), then TP+SP. Batch per dp index."""
    from torch.distributed.device_mesh import init_device_mesh

    from attnres_train.parallel.expert import apply_expert_parallel
    from attnres_train.parallel.tensor import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"].get_local_rank()
    cfg = _cfg("block")
    cfg.moe.seq_aux_loss_coef = 0.0  # per-rank (per dp batch) aux losses would not sum to one reference loss
    ref = build(cfg)
    randomize_queries(ref)
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, cfg.vocab_size, (2, 17), generator=g) for _ in range(2)]
    ref_loss, ref_grads = [], []
    for b in batches:
        r = copy.deepcopy(ref)
        out = r(b[:, :-1], labels=b[:, 1:])
        out.loss.backward()
        ref_loss.append(out.loss.detach())
        ref_grads.append({n: p.grad for n, p in r.named_parameters()})

    model = copy.deepcopy(ref)
    apply_expert_parallel(model, mesh["dp"])
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)
    b = batches[dp]
    out = model(b[:, :-1], labels=b[:, 1:])
    out.loss.backward()
    errs = {}
    for name, p in model.named_parameters():
        if ref_grads[dp][name] is None:
            continue
        # EP semantics: an expert's gradient is the sum over the EP ranks' losses; everything else is per rank.
        want = ref_grads[0][name] + ref_grads[1][name] if ".experts.w" in name else ref_grads[dp][name]
        errs[name] = _rel_err(_full(p.grad), want)
    return {"loss": _rel_err(out.loss.detach(), ref_loss[dp]), "grads": errs}


def test_tensor_and_sequence_parallel_compose_with_expert_parallel():
    for rank, r in enumerate(run_distributed(_tp_sp_with_expert_parallel, 4, timeout=150, preload=PRELOAD)):
        assert r["loss"] <= TOL, f"rank {rank}: loss rel err {r['loss']:.2e}"
        worst = sorted(r["grads"].items(), key=lambda kv: -kv[1])[:3]
        assert worst[0][1] <= TOL, f"rank {rank}: worst gradient errors {worst}"
        assert any(".experts.w" in n for n in r["grads"])


# ------------------------------------------------------------------------------------------- collectives
def _count(fn):
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        out = fn()
    return out, comm.get_total_counts(), {str(k): v for k, v in comm.get_comm_counts().items()}


def _depth_mixing_no_collectives():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from attnres_train.model.depth import DepthState, depth_read, depth_weights, mix_direct, phase1, phase2

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(0)
    B, T, d, eps = 2, 8, 16, 1e-5
    blocks = [torch.randn(B, T, d, generator=g, dtype=torch.float64) for _ in range(3)]
    partial = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    q_sd = torch.randn(3, d, generator=g, dtype=torch.float64)
    shard = [distribute_tensor(b, mesh, [Shard(1)]) for b in blocks]
    dpart = distribute_tensor(partial, mesh, [Shard(1)])
    dq = distribute_tensor(q_sd, mesh, [Replicate()])

    def state(bs, p):
        return DepthState(blocks=list(bs), partial=p)

    checks = {
        "depth_read two-phase": (
            lambda: depth_read(state(shard, dpart), 0, dq[0], eps, True),
            lambda: depth_read(state(blocks, partial), 0, q_sd[0], eps, True),
        ),
        "depth_read direct": (
            lambda: depth_read(state(shard, dpart), 0, dq[1], eps, False),
            lambda: depth_read(state(blocks, partial), 0, q_sd[1], eps, False),
        ),
        "depth_read no partial": (
            lambda: depth_read(state(shard, None), 0, dq[2], eps, True),
            lambda: depth_read(state(blocks, None), 0, q_sd[2], eps, True),
        ),
        "phase1+phase2": (
            lambda: phase2(phase1(shard, dq, eps)[1], dpart, dq[1], eps, torch.float64),
            lambda: phase2(phase1(blocks, q_sd, eps)[1], partial, q_sd[1], eps, torch.float64),
        ),
        "mix_direct": (
            lambda: mix_direct(shard + [dpart], dq[0], eps),
            lambda: mix_direct(blocks + [partial], q_sd[0], eps),
        ),
        "depth_weights": (
            lambda: depth_weights(state(shard, dpart), dq[0], eps),
            lambda: depth_weights(state(blocks, partial), q_sd[0], eps),
        ),
    }
    out = {}
    for name, (sharded_fn, full_fn) in checks.items():
        got, n_comm, _ = _count(sharded_fn)
        want = full_fn()
        seq_dim = got.ndim - 1 if name == "depth_weights" else 1
        out[name] = {
            "comms": n_comm,
            "placements": str(got.placements),
            "err": _rel_err(got.full_tensor(), want),
            "sharded_on_seq": got.placements == (Shard(seq_dim),),
        }
    # Local shards (what a rank holds) mix exactly like the corresponding slice of the full tensors.
    r, n = dist.get_rank(), dist.get_world_size()
    sl = slice(r * T // n, (r + 1) * T // n)
    local, n_comm, _ = _count(
        lambda: depth_read(state([b[:, sl] for b in blocks], partial[:, sl]), 0, q_sd[0], eps, True)
    )
    out["local shards"] = {
        "comms": n_comm,
        "placements": "local",
        "sharded_on_seq": True,
        "err": _rel_err(local, depth_read(state(blocks, partial), 0, q_sd[0], eps, True)[:, sl]),
    }
    return out


def test_depth_mixing_issues_no_collective_under_sequence_parallel():
    results = run_distributed(_depth_mixing_no_collectives, 2, timeout=60, preload=PRELOAD)
    for rank, res in enumerate(results):
        for name, r in res.items():
            assert r["comms"] == 0, f"rank {rank} {name}: {r['comms']} collectives"
            assert r["sharded_on_seq"], f"rank {rank} {name}: output placements {r['placements']}"
            assert r["err"] <= 1e-13, f"rank {rank} {name}: rel err {r['err']:.2e}"


def _forward_collectives(mode: str):
    from torch.distributed.device_mesh import init_device_mesh

    from attnres_train.parallel.tensor import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cfg = _cfg(mode)
    cfg.moe.seq_aux_loss_coef = 0.0
    model = build(cfg)
    if mode != "prenorm":
        randomize_queries(model)
    apply_tensor_parallel(model, mesh, sequence_parallel=True)
    ids, labels = _batch(cfg.vocab_size)
    with torch.no_grad():
        _, n, per_op = _count(lambda: model(ids, labels=labels))
    return n, per_op


def test_attnres_adds_no_collective_to_the_sp_forward():
    """A whole SP forward: Block/Full AttnRes issue exactly the collectives of PreNorm (the mixers', FFNs',
    embedding's, head's and loss's), i.e. the depth mixing between sublayers communicates nothing."""
    counts = {
        mode: run_distributed(_forward_collectives, 2, mode, timeout=120, preload=PRELOAD)[0]
        for mode in ("prenorm", "block")
    }
    n_pre, ops_pre = counts["prenorm"]
    n_block, ops_block = counts["block"]
    # embedding: 1 reduce-scatter; 3 mixers + 1 dense FFN + 2 shared experts: 1 all-gather + 1 reduce-scatter
    # each; LM head: 1 all-gather; vocab-parallel CE: 2 all-reduces.
    assert n_pre == 1 + 2 * 6 + 1 + 2, ops_pre
    assert (n_block, ops_block) == (n_pre, ops_pre)


# ------------------------------------------------------------------------------------------- loss
def _vocab_parallel_ce():
    from attnres_train.parallel.tp_ops import vocab_parallel_cross_entropy

    r, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    out = {}
    for dtype in (torch.float64, torch.float32):
        logits = (torch.randn(3, 5, 12, generator=g, dtype=torch.float64) * 4).to(dtype)
        labels = torch.randint(0, 12, (3, 5), generator=g)
        labels[1, 2:] = -100
        full = logits.clone().requires_grad_()
        want = F.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=-100)
        want.backward()
        V = 12 // n
        local = logits[..., r * V : (r + 1) * V].clone().requires_grad_()
        got = vocab_parallel_cross_entropy(local, labels, r * V, dist.group.WORLD)
        got.backward()
        out[str(dtype)] = (
            _rel_err(got.detach(), want.detach()),
            _rel_err(local.grad, full.grad[..., r * V : (r + 1) * V]),
            got.dtype == dtype,
        )
    return out


def test_vocab_parallel_cross_entropy_matches_full():
    for res in run_distributed(_vocab_parallel_ce, 2, timeout=60, preload=PRELOAD):
        assert res["torch.float64"][0] <= 1e-14 and res["torch.float64"][1] <= 1e-14, res
        assert res["torch.float32"][0] <= 1e-6 and res["torch.float32"][1] <= 1e-6, res
        assert res["torch.float64"][2] and res["torch.float32"][2], res
