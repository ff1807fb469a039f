"""Expert parallelism vs the single-process model (gloo, fp64): loss, every gradient, router counts, DCP.

Each EP rank feeds its own slice of the global batch (EP ranks are data-parallel ranks); the reference is the
plain model on the whole batch. Non-expert gradients are averaged over the ranks as DP would; expert gradients
(the sum over the EP group's losses, on their owners) are gathered with ``full_tensor()`` and divided by the
number of ranks. One spawn per world size runs all cases (process start-up dominates on the 2-core CI box).
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from attnres_train.config.model import ModelConfig, MoEConfig
from attnres_train.model.moe import MoE, _grouped_mm_usable
from attnres_train.parallel.expert import apply_expert_parallel, expert_parallel_parameters
from tests.distributed import DEFAULT_PRELOAD, run_distributed
from tests.model.helpers import assert_rel_close, build, grads, randomize_queries, tiny_cfg

# DTensor.from_local imports torch._dynamo on first use (~3-10 s on the loaded CI box): import it once in the
# forkserver (effective when this module starts it; the default preload otherwise).
PRELOAD = DEFAULT_PRELOAD + ("torch.distributed.tensor", "torch._dynamo", "attnres_train.parallel.expert")
B, T = 4, 8  # global batch: B sequences of T tokens, split over the ranks along B

# (name, mode, num_blocks, extra): "skew" biases the router so every token picks experts 0 and 1 (all other
# experts empty, whole EP ranks idle); "ac" adds activation checkpointing (the exchange is re-run in backward).
MODEL_CASES = [
    ("prenorm", "prenorm", None, ()),
    ("full", "full", None, ()),
    ("block", "block", 2, ()),
    ("block_ac", "block", 2, ("ac",)),
    ("prenorm_skew", "prenorm", None, ("skew",)),
]


def _ids():
    return torch.randint(0, 1024, (B, T + 1), generator=torch.Generator().manual_seed(7))


def _build_case(mode, nb, extra):
    cfg = tiny_cfg(mode, nb)
    model = build(cfg, seed=0)
    if mode != "prenorm":
        randomize_queries(model)
    if "skew" in extra:
        with torch.no_grad():
            for moe in model.moe_layers():
                moe.gate.e_score_correction_bias[:2] = 10.0
    model.train()
    return model


def _reference(mode, nb, extra):
    model = _build_case(mode, nb, extra)
    ids = _ids()
    loss, _ = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    counts = torch.stack([m.tokens_per_expert.clone() for m in model.moe_layers()])
    return float(loss.detach()), grads(model), counts, model


# ------------------------------------------------------------------------------------------ rank bodies
def _model_body(cases, ckpt_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    ws, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    out = {}
    for name, mode, nb, extra in cases:
        model = _build_case(mode, nb, extra)
        apply_expert_parallel(model, mesh)
        if "ac" in extra:
            from attnres_train.parallel.wrap import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        ids = _ids()[rank * B // ws : (rank + 1) * B // ws]
        loss, _ = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()

        ep_names = {n for n, _ in expert_parallel_parameters(model)}
        g = {}
        for n, p in model.named_parameters():
            if n in ep_names:
                assert isinstance(p, DTensor) and p.placements == (Shard(0),)
                assert isinstance(p.grad, DTensor) and p.grad.to_local().shape[0] == p.shape[0] // ws
                g[n] = p.grad.full_tensor() / ws  # owners hold the sum over the EP group's losses
            else:
                t = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(t)
                g[n] = t / ws
        local = torch.stack([m.tokens_per_expert.clone() for m in model.moe_layers()])
        glob = local.clone()
        dist.all_reduce(glob)  # what the train module does before update_bias
        lt = loss.detach().clone()
        dist.all_reduce(lt)
        res = {"loss": float(lt) / ws, "local_counts": local, "global_counts": glob}
        if rank == 0:
            res["grads"] = g
        if name == "prenorm":  # checkpoint layout: names and global shapes kept, each shard saved once
            import torch.distributed.checkpoint as dcp

            sd = get_model_state_dict(model)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            assert all(isinstance(sd[n], DTensor) and sd[n].shape == model.get_parameter(n).shape for n in ep_names)
            assert not any(isinstance(v, DTensor) for v in full.values())
            dcp.save(sd, checkpoint_id=ckpt_dir)
            # ... and loads back into a differently initialised EP model
            other = build(tiny_cfg(mode, nb), seed=5)
            apply_expert_parallel(other, mesh)
            sd2 = get_model_state_dict(other)
            dcp.load(sd2, checkpoint_id=ckpt_dir)
            set_model_state_dict(other, sd2)
            for n in ep_names:
                assert torch.equal(other.get_parameter(n).to_local(), model.get_parameter(n).to_local()), n
            if rank == 0:
                res["state_dict_keys"] = sorted(sd)
                res["full_experts"] = {n: full[n] for n in ep_names}
        out[name] = res
    # meta-device build -> EP -> materialise + init this rank's shards gives the single-process init
    from attnres_train.model import build_model
    from attnres_train.parallel.init import materialize_and_init

    with torch.device("meta"):
        meta = build_model(tiny_cfg())
    apply_expert_parallel(meta, mesh)
    torch.manual_seed(11)
    materialize_and_init(meta, "cpu", meta.config, seed=None)  # seed drawn from the global RNG, as init_weights
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p.detach()) for n, p in meta.named_parameters()}
    out["meta_init"] = full if rank == 0 else None  # full_tensor() is a collective: every rank calls it
    return out


def _check_model_results(results, ws, ckpt_dir):
    import torch.distributed.checkpoint as dcp

    for name, mode, nb, extra in MODEL_CASES:
        ref_loss, ref_grads, ref_counts, ref_model = _reference(mode, nb, extra)
        r0 = results[0][name]
        assert abs(r0["loss"] - ref_loss) <= 1e-12 * abs(ref_loss), (name, r0["loss"], ref_loss)
        assert set(r0["grads"]) == set(ref_grads)
        for n, g in ref_grads.items():
            assert_rel_close(r0["grads"][n], g, 1e-10, f"{name}/{n}")
        # router statistics: per-rank own counts (recorded before the exchange) sum to the global counts once
        assert torch.equal(sum(r[name]["local_counts"] for r in results), ref_counts), name
        for r in results:
            assert torch.equal(r[name]["global_counts"], ref_counts), name
        if "skew" in extra:  # premise: only experts 0 and 1 used -> only EP rank 0 computes, others idle
            assert torch.all(ref_counts[:, 2:] == 0) and torch.all(ref_counts[:, :2] > 0)
        if name == "prenorm":
            assert r0["state_dict_keys"] == sorted(ref_model.state_dict())
            for n, full in r0["full_experts"].items():
                assert torch.equal(full, ref_model.get_parameter(n).detach()), n
            # the EP-sharded checkpoint loads into the plain single-process model (resharding to 1 rank)
            plain = build(tiny_cfg(mode, nb), seed=5)
            sd = plain.state_dict()
            dcp.load(sd, checkpoint_id=ckpt_dir, no_dist=True)
            plain.load_state_dict(sd)
            for n, p in ref_model.state_dict().items():
                assert torch.equal(plain.state_dict()[n], p), n


@pytest.mark.parametrize("ws", [2, 4])
def test_ep_model_matches_single_process(ws, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    results = run_distributed(_model_body, ws, MODEL_CASES, ckpt, timeout=60, preload=PRELOAD)
    _check_model_results(results, ws, ckpt)
    plain = build(tiny_cfg(), seed=3, dtype=torch.float32)
    torch.manual_seed(11)
    plain.init_weights()
    for n, p in plain.named_parameters():
        assert torch.equal(results[0]["meta_init"][n], p.detach()), n


# ----------------------------------------------------------------------- composition with FSDP2 (EP x dp_mod_ep)
def _fsdp_body():
    """4 ranks = dp_mod_ep 2 x ep 2 (torchtitan layout): FSDP2 shards the EP-sharded experts over dp_mod_ep and
    everything else over all 4 data-parallel ranks. The experts' divide factor is the whole DP size."""
    from torch.distributed.fsdp import fully_shard

    from attnres_train.model import build_model

    ws, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_mod_ep", "ep"))
    dp_mesh = mesh._flatten("dp")

    def parallelize(model):
        apply_expert_parallel(model, mesh["ep"])
        for moe in model.moe_layers():
            fully_shard(moe.experts, mesh=mesh["dp_mod_ep"])
            moe.experts.set_gradient_divide_factor(float(ws))
        for layer in model.model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)

    # "full" (not "block"): block mode's two-phase batching reads later layers' pseudo-queries outside their
    # forward (transformer._block_phase1), which per-layer FSDP2 units do not allow (a separate issue).
    model = _build_case("full", None, ())
    parallelize(model)
    ids = _ids()[rank * B // ws : (rank + 1) * B // ws]
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss  # the call (not .loss): FSDP's root hooks
    loss.backward()
    # None: unused on every rank (layer 0's first pseudo-query mixes a single source), zeros as in grads()
    g = {
        n: p.grad.full_tensor() if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype)
        for n, p in model.named_parameters()
    }
    lt = loss.detach().clone()
    dist.all_reduce(lt)
    # meta-device build -> EP -> FSDP2 -> to_empty -> experts.init_weights: the plain module's values for the
    # same RNG state (the whole-model init is not compared: FSDP2-sharded plain params draw DTensor random
    # numbers, per-rank shards from the same CPU RNG stream, so the RNG state reaching the experts differs)
    with torch.device("meta"):
        meta = build_model(tiny_cfg())
    parallelize(meta)
    meta.to_empty(device="cpu")
    experts = meta.moe_layers()[0].experts
    torch.manual_seed(11)
    experts.init_weights(0.02)
    init = {n: p.full_tensor() for n, p in experts.named_parameters()}
    return {"loss": float(lt) / ws, "grads": g, "init": init} if rank == 0 else None


def test_ep_composes_with_fsdp2():
    res = run_distributed(_fsdp_body, 4, timeout=60, preload=PRELOAD)[0]
    ref_loss, ref_grads, _, _ = _reference("full", None, ())
    assert abs(res["loss"] - ref_loss) <= 1e-12 * abs(ref_loss)
    assert set(res["grads"]) == set(ref_grads)
    for n, g in ref_grads.items():
        assert_rel_close(res["grads"][n], g, 1e-10, f"fsdp/{n}")
    plain = build(tiny_cfg(), seed=3, dtype=torch.float32).moe_layers()[0].experts
    torch.manual_seed(11)
    plain.init_weights(0.02)
    assert sorted(res["init"]) == ["w1", "w2", "w3"]
    for n, full in res["init"].items():
        assert torch.equal(full, plain.get_parameter(n).detach()), n


# ------------------------------------------------------------------ MoE layer with designed uneven routing
# Token pairs (the two experts each token of that rank picks). E = 8. With ep=2 (experts 0-3 | 4-7) and ep=4
# (0-1 | 2-3 | 4-5 | 6-7): rank 0 and 3 send nothing to some ranks, experts 2, 3, 6, 7 are empty everywhere,
# at ep=4 EP ranks 1 and 3 receive no rows at all; at ep=2 EP rank 1 gets rows only from itself.
PAIRS = {0: [(0, 1)], 1: [(0, 5), (1, 5)], 2: [(5, 0), (4, 1)], 3: [(0, 1), (1, 0)]}
D, TOK = 16, 6


def _moe_setup(ws, dtype):
    cfg = ModelConfig(hidden_size=D, moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=64))
    torch.manual_seed(0)
    moe = MoE(cfg).to(dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, :8] = torch.eye(8, dtype=dtype)
        for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            w.normal_(0, 0.3, generator=g)
    xs, ws_out = [], []
    for r in range(ws):
        x = 0.1 * torch.randn(1, TOK, D, generator=g, dtype=dtype)
        for t in range(TOK):
            a, b = PAIRS[r][t % len(PAIRS[r])]
            x[0, t, a] += 4.0
            x[0, t, b] += 3.0
        xs.append(x)
        ws_out.append(torch.randn(1, TOK, D, generator=g, dtype=dtype))
    moe.train()
    return moe, xs, ws_out


def _moe_body(cases):
    ws, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    results = []
    for dtype, impl, _tol in cases:
        moe, xs, wts = _moe_setup(ws, dtype)
        moe.experts.impl = impl
        apply_expert_parallel(moe, mesh)
        x = xs[rank].clone().requires_grad_(True)
        y, _ = moe(x)
        (y * wts[rank]).sum().backward()
        gmm = _grouped_mm_usable(x.reshape(-1, D), moe.experts.intermediate_size)
        out = {"y": y.detach(), "x_grad": x.grad, "counts": moe.tokens_per_expert.clone(), "grouped_mm": gmm}
        for n, p in moe.named_parameters():  # the loss is a SUM over ranks: sum the replicated grads
            if isinstance(p, DTensor):
                out[n] = p.grad.full_tensor()
            else:
                t = p.grad.clone()
                dist.all_reduce(t)
                out[n] = t
        results.append(out)
    return results


@pytest.mark.parametrize("ws", [2, 4])
def test_ep_moe_uneven_and_empty_splits(ws):
    cases = [(torch.float64, "auto", 1e-12)]  # fp64: the loop path
    if ws == 2:  # fp32: the grouped_mm path (where torch has it for CPU fp32) on the local shards
        cases.append((torch.float32, "auto", 2e-5))
    by_rank = run_distributed(_moe_body, ws, cases, timeout=60, preload=PRELOAD)
    for i, (dtype, _impl, tol) in enumerate(cases):
        res = [r[i] for r in by_rank]
        moe, xs, wts = _moe_setup(ws, dtype)
        x = torch.cat(xs).requires_grad_(True)
        y, _ = moe(x)
        (y * torch.cat(wts)).sum().backward()
        counts = moe.tokens_per_expert
        # the premise: uneven splits with zeros, empty experts, idle ranks
        assert counts[[2, 3, 6, 7]].sum() == 0 and counts[[0, 1, 5]].min() > 0
        if ws == 4:
            assert counts[2:4].sum() == 0 and counts[6:8].sum() == 0  # EP ranks 1 and 3 receive nothing
        for r, out in enumerate(res):
            assert_rel_close(out["y"], y[r : r + 1].detach(), tol, f"{dtype} y rank {r}")
            assert_rel_close(out["x_grad"], x.grad[r : r + 1], tol, f"{dtype} x.grad rank {r}")
            per_rank = torch.bincount(
                torch.tensor([e for t in range(TOK) for e in PAIRS[r][t % len(PAIRS[r])]]), minlength=8
            ).float()
            assert torch.equal(out["counts"], per_rank), (r, out["counts"])  # own routing only
        assert torch.equal(sum(o["counts"] for o in res), counts)
        for n, p in moe.named_parameters():
            assert_rel_close(res[0][n], p.grad, tol, f"{dtype} {n}")
            if n.startswith("experts."):
                assert float(res[0][n][[2, 3, 6, 7]].abs().max()) == 0.0  # empty experts: zero grads, not None
        if dtype == torch.float32 and not res[0]["grouped_mm"]:
            pytest.skip("F.grouped_mm unavailable for CPU fp32 here: only the loop path was compared")


class _FakeMesh:
    """Enough of a DeviceMesh for the argument checks, which run before any communication."""

    def __init__(self, ndim, size):
        self.ndim, self._size = ndim, size

    def size(self):
        return self._size

    def get_local_rank(self):
        return 0

    def get_group(self):
        return None


def test_apply_rejects_bad_meshes():
    model = build(tiny_cfg(), seed=0)
    with pytest.raises(ValueError, match="1-D"):
        apply_expert_parallel(model, _FakeMesh(2, 4))
    with pytest.raises(ValueError, match="not divisible by the expert-parallel degree 3"):
        apply_expert_parallel(model, _FakeMesh(1, 3))
