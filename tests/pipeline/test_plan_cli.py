"""``attnres-plan`` prints the layout, per-hop payloads, the checked schedule and the bubble; bad input exits 2."""

from attnres_train.cli.plan import main


def test_plan_prints_layout_payloads_and_schedule(capsys):
    assert (
        main(
            [
                "--pp",
                "4",
                "--vpp",
                "2",
                "--num-layers",
                "16",
                "--mode",
                "block",
                "--block-size",
                "2",
                "--microbatches",
                "8",
                "--seq-len",
                "128",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "stage rank chunk" in out and "fingerprint=" in out
    assert "hop   3->4   rank 3->0:   3 tensors (naive   5)  shape [3, 1, 128, 128]" in out
    assert "tensors per microbatch per direction: cached 21, naive 35" in out
    assert "rank 0: 0F0 0F1 0F2 0F3 4F0" in out
    assert "(P-1)/(V*M+P-1) = 0.1579" in out and "simulated bubble (F=1, B=2, no comm cost): 0.1579" in out


def test_plan_comms_and_csv(capsys):
    assert main(["--pp", "2", "--vpp", "2", "--num-layers", "4", "--microbatches", "2", "--comms"]) == 0
    assert "0SEND_F0 2RECV_F0" in capsys.readouterr().out
    assert main(["--pp", "2", "--vpp", "2", "--num-layers", "4", "--microbatches", "2", "--csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and rows[0].startswith("0F0,0SEND_F0")


def test_plan_errors_are_one_line(capsys):
    assert main(["--pp", "4", "--vpp", "2", "--num-layers", "16", "--microbatches", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "multiple of P" in err and err.count("\n") == 1
    assert main(["--pp", "2", "--vpp", "2", "--num-layers", "8", "--layers-per-stage", "1,2,3"]) == 2
    assert "pipeline.layers_per_stage" in capsys.readouterr().err
    assert main(["--pp", "2", "--model", "nope"]) == 2


# ------------------------------------------------------------------ memory / traffic estimates (plan_estimates)
import dataclasses  # noqa: E402

import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from attnres_train.config.model import as_model_config  # noqa: E402
from attnres_train.config.parallel import ParallelConfig, resolve_parallel_dims  # noqa: E402
from attnres_train.config.paths import MODEL_PRESET_DIR  # noqa: E402
from attnres_train.model import build_model  # noqa: E402
from attnres_train.model.flops import count_params  # noqa: E402
from attnres_train.parallel import plan_estimates as pe  # noqa: E402


def preset(name, mode="prenorm", **residual):
    cfg = as_model_config(OmegaConf.load(MODEL_PRESET_DIR / f"{name}.yaml"))
    cfg.residual.mode = mode
    cfg.residual.num_blocks = cfg.residual.block_size = None  # a preset's block count is an error outside block mode
    for k, v in residual.items():
        setattr(cfg.residual, k, v)
    return cfg


def dims(world, **kw):
    return resolve_parallel_dims(ParallelConfig(**kw), world)


def _category(name: str) -> str:
    """How the real parallel engine places a parameter (parallel/tensor.py's tables): tp / rep / experts."""
    from attnres_train.parallel.tensor import KDA_PLACEMENTS, MLA_PLACEMENTS

    if ".experts.w" in name:
        return "experts"
    if name.startswith(("model.embed_tokens", "lm_head")) or ".mlp." in name or ".shared_experts." in name:
        return "tp"
    if ".self_attn." in name:
        rel = name.split(".self_attn.", 1)[1]
        placement = {**KDA_PLACEMENTS, **MLA_PLACEMENTS}[rel]
        return "rep" if placement.is_replicate() else "tp"
    return "rep"  # norms, AttnRes queries, router


@pytest.mark.parametrize(
    "name,mode,residual",
    [
        ("tiny", "prenorm", {}),
        ("tiny", "block", {"num_blocks": 2}),
        ("demo", "full", {}),
        ("f1", "block", {"block_size": 2}),
        ("f3", "prenorm", {}),
        ("kimi_linear_48b", "block", {"block_size": 3}),
    ],
)
def test_param_counts_equal_meta_builds(name, mode, residual):
    from attnres_train.train.optim import is_muon_param

    cfg = preset(name, mode, **residual)
    model = build_model(cfg, device="meta")
    est = pe.model_params(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert est.total == real == count_params(cfg).total
    by_cat = {"tp": 0, "rep": 0, "experts": 0}
    muon = 0
    for n, p in model.named_parameters():
        by_cat[_category(n)] += p.numel()
        muon += p.numel() if is_muon_param(n, p) else 0
    assert (est.tp, est.rep, est.experts, est.muon) == (by_cat["tp"], by_cat["rep"], by_cat["experts"], muon)
    # per layer too (the pipeline estimate sums layers per stage)
    for i in (0, cfg.num_layers - 1):
        layer = sum(p.numel() for p in model.model.layers[i].parameters())
        assert pe.layer_params(cfg, i).total == layer


def test_memory_scales_with_the_layout():
    cfg, shape = preset("f3", "block", num_blocks=4), pe.TrainShape(seq_len=2048)
    (a,) = pe.estimate_ranks(cfg, dims(8, dp_shard=8), shape)
    (b,) = pe.estimate_ranks(cfg, dims(16, dp_shard=16), shape)
    for k in ("weights", "grads", "optimizer"):  # fully sharded state halves with dp_shard x2
        assert b.memory[k] == pytest.approx(a.memory[k] / 2)
    assert b.memory["activations"] == a.memory["activations"]  # per-rank activations do not
    (h,) = pe.estimate_ranks(cfg, dims(16, dp_replicate=2, dp_shard=8), shape)
    assert h.memory["weights"] == a.memory["weights"]  # HSDP replicas hold the same shard
    # EP folded into FSDP keeps expert memory (E/ep experts sharded over dp_shard/ep): traffic moves to all-to-all
    (e,) = pe.estimate_ranks(cfg, dims(8, dp_shard=8, ep=4), shape)
    assert e.local_experts == pytest.approx(a.local_experts)
    groups = {r.group for r in pe.estimate_comm(cfg, dims(8, dp_shard=8, ep=4), shape, e)}
    assert "ep" in groups and "edp_shard" in groups
    # TP shards the per-head / FFN / vocab parameters only; SP also shards the residual-stream activations
    (t,) = pe.estimate_ranks(cfg, dims(8, dp_shard=4, tp=2), shape)
    (s,) = pe.estimate_ranks(cfg, dims(8, dp_shard=4, tp=2, sp=True), shape)
    dense = (cfg_p := pe.model_params(cfg)).tp / 2 + cfg_p.rep
    assert t.local_dense == pytest.approx(dense / 4)
    assert s.memory["activations"] < t.memory["activations"]
    ac = pe.estimate_ranks(cfg, dims(8, dp_shard=8), dataclasses.replace(shape, activation_checkpointing=True))[0]
    assert ac.memory["activations"] < a.memory["activations"] / 3
    muon = pe.estimate_ranks(cfg, dims(8, dp_shard=8), dataclasses.replace(shape, optimizer="muon"))[0]
    assert a.memory["optimizer"] / 2 < muon.memory["optimizer"] < a.memory["optimizer"]


def test_pipeline_ranks_partition_the_model_and_follow_the_schedule():
    from attnres_train.parallel.pipeline.layout import PipelineLayout
    from attnres_train.parallel.pipeline.schedules import make_schedule

    cfg = preset("f3", "block", num_blocks=6)
    shape = pe.TrainShape(seq_len=1024, microbatches=8)
    d = dims(8, pp=4, vpp=2, dp_shard=2)
    layout = PipelineLayout.from_model_config(cfg, 4, 2)
    sched = make_schedule("interleaved_1f1b", 4, 2, 8)
    ranks = pe.estimate_ranks(cfg, d, shape, layout, sched)
    assert sum(r.params.total for r in ranks) == pe.model_params(cfg).total
    assert sorted(i for r in ranks for i in r.layers) == list(range(cfg.num_layers))
    # Megatron's warmup: rank r runs 2(P-r-1) + (V-1)G forwards before its first backward, +1 in flight
    assert [r.inflight for r in ranks] == [min(2 * (4 - r - 1) + 4 + 1, 16) for r in range(4)]
    assert ranks[0].inflight == pe.inflight_microbatches(sched, 0)
    assert ranks[0].blocks_cached > 0 and ranks[0].memory["block_cache"] > 0
    naive = pe.estimate_ranks(cfg, d, shape, layout.with_cache(False), sched)
    assert all(r.memory["block_cache"] == 0 for r in naive)
    pp_bytes = [next(c.bytes for c in pe.estimate_comm(cfg, d, shape, r, layout) if c.group == "pp") for r in ranks]
    total = layout.bytes_per_step(8, 1, 1024, shape.comm_bytes)
    assert sum(pp_bytes) == pytest.approx(total)  # every hop's bytes are sent by exactly one rank


def test_plan_48b_on_1024_gpus(capsys):
    assert (
        main(
            [
                "--model",
                "kimi_linear_48b",
                "--world-size",
                "1024",
                "--pp",
                "4",
                "--vpp",
                "2",
                "--tp",
                "2",
                "--sp",
                "--ep",
                "16",
                "--dp-replicate",
                "8",
                "--mode",
                "block",
                "--block-size",
                "3",
                "--microbatches",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "49.12B parameters (49,122,928,512)" in out
    assert "world 1024 = pp 4 x dp_replicate 8 x dp_shard 16 x tp 2 (+sp)" in out
    assert "sparse (pp=4, edp_replicate=8, edp_shard=1, ep=16, tp=2)" in out
    for group in ("dp_shard", "dp_replicate", "edp_replicate", "tp", "ep", "pp"):
        assert f"\n  {group} " in out
    assert main(["--model", "f3", "--world-size", "8", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parallel.dp_shard") and err.count("\n") == 1
