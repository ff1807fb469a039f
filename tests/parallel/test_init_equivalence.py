"""Meta-device construction: every layout starts from bit-identical fp64 parameters, and no rank holds it all.

Each layout builds the model on ``meta`` and goes through the real training path (``TrainModule`` /
``TrainModule``: parallelise, then materialise and initialise only this rank's shards). Every rank
returns the full tensors of what it holds (DTensors gathered with ``full_tensor``), keyed by full parameter name;
the union over ranks must equal, bit for bit, the single-process model built from the same seed — every
parameter, compared by name — and the pipeline ranks must hold only their own stages.

The single-process values themselves are checked against an independent re-derivation of the documented scheme
(docs/parallel.md "Initialisation": row ``i`` of parameter ``name`` drawn from a CPU generator seeded with
``blake2b("seed|name|i")``), written here with its own loop, so "layout independent" cannot mean
"consistently wrong".
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

SEED = 1234
LAYOUTS = {
    "single": (1, dict(), False),
    "fsdp2": (2, dict(dp_shard=2), False),
    "tp2_sp": (2, dict(dp_shard=1, tp=2, sp=True), False),
    "ep2": (2, dict(dp_replicate=2, dp_shard=1, ep=2), False),
    "pp2_vpp2": (2, dict(dp_shard=1, pp=2, vpp=2), True),
    "pp2_fsdp2_tp2_ep2": (8, dict(dp_shard=2, tp=2, sp=True, ep=2, pp=2, vpp=2), True),
}


def model_cfg(tie: bool = False):
    from attnres_train.config.model import KDAConfig, MLAConfig, ModelConfig, MoEConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, mla_layers=[1], tie_word_embeddings=tie)
    cfg.kda = KDAConfig(num_heads=2, head_dim=16, chunk_size=8)
    cfg.mla = MLAConfig(num_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    cfg.moe = MoEConfig(
        num_experts=8, top_k=2, intermediate_size=16, num_shared_experts=1, first_k_dense=1, dense_intermediate_size=32
    )
    cfg.residual.mode, cfg.residual.num_blocks = "block", 2
    return cfg


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _layout_body(parallel_kw, pipelined, tie):
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.pipeline import PipelineConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.train import OptimConfig
    from attnres_train.model import build_model
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.train.train_module import TrainModule

    cfg = model_cfg(tie)
    ws = dist.get_world_size() if dist.is_initialized() else 1
    pctx = build_parallel_context(ParallelConfig(**parallel_kw), cfg, seq_len=8, world_size=ws)
    model = build_model(cfg, device="meta", dtype=torch.float64)
    tcfg = TrainerConfig(micro_batch_size=1, global_batch_size=max(2, pctx.dp_size), precision="fp32")
    module = TrainModule(model, OptimConfig(), tcfg, pctx, 1, seed=SEED, pipeline_cfg=PipelineConfig())
    held = {n: _full(p) for n, p in module.model.named_parameters()}
    held.update({n: _full(b) for n, b in module.model.named_buffers() if "correction_bias" in n})
    meta_left = sum(1 for p in model.parameters() if p.is_meta)  # other stages' tensors never got storage
    return {"held": held, "meta_left": meta_left, "rank": dist.get_rank() if dist.is_initialized() else 0}


def _reference(tie=False):
    from attnres_train.model import build_model

    model = build_model(model_cfg(tie), dtype=torch.float64, seed=SEED)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref.update({n: b.clone() for n, b in model.named_buffers() if "correction_bias" in n})
    return ref


def _row_gen(name: str, row: int) -> torch.Generator:
    h = hashlib.blake2b(f"{SEED}|{name}|{row}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


def test_single_process_values_follow_the_documented_scheme():
    ref = _reference()
    std = model_cfg().init_std
    for name in (
        "model.embed_tokens.weight",
        "model.layers.2.block_sparse_moe.experts.w2",
        "lm_head.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.3.block_sparse_moe.gate.weight",
    ):
        t = ref[name]
        for i in (0, t.shape[0] - 1):
            row = torch.empty(t.shape[1:], dtype=torch.float64).normal_(0.0, std, generator=_row_gen(name, i))
            assert torch.equal(t[i], row), (name, i)
    conv = ref["model.layers.0.self_attn.q_conv1d.weight"]  # [C, 1, W]: kaiming-uniform bound 1/sqrt(W)
    b = 1 / math.sqrt(conv.shape[-1])
    row = torch.empty(conv.shape[1:], dtype=torch.float64).uniform_(
        -b, b, generator=_row_gen("model.layers.0.self_attn.q_conv1d.weight", 5)
    )
    assert torch.equal(conv[5], row)
    a_log = ref["model.layers.0.self_attn.A_log"]  # 1-D: one stream for the whole vector
    want = (
        torch.empty(a_log.shape, dtype=torch.float64)
        .uniform_(1, 16, generator=_row_gen("model.layers.0.self_attn.A_log", 0))
        .log()
    )
    assert torch.equal(a_log, want)
    assert all(float(ref[n].abs().sum()) == 0 for n in ref if n.endswith("_res_proj.weight"))
    assert all(torch.equal(ref[n], torch.ones_like(ref[n])) for n in ref if n.endswith("norm.weight"))
    # a different seed or name gives different numbers; the same seed gives the same model
    from attnres_train.model import build_model

    other = build_model(model_cfg(), dtype=torch.float64, seed=SEED + 1)
    assert not torch.equal(other.model.embed_tokens.weight, ref["model.embed_tokens.weight"])
    again = build_model(model_cfg(), dtype=torch.float64, seed=SEED)
    assert all(torch.equal(p, ref[n]) for n, p in again.named_parameters())


@pytest.mark.parametrize("layout", sorted(LAYOUTS), ids=str)
def test_every_layout_starts_from_the_single_process_values(layout):
    ws, kw, pipelined = LAYOUTS[layout]
    tie = layout == "pp2_vpp2"  # a tied head on a different rank than the embedding: its own copy, same values
    if ws == 1:
        results = [_layout_body(kw, pipelined, tie)]
    else:
        results = run_distributed(_layout_body, ws, kw, pipelined, tie, timeout=600)
    ref = _reference(tie)
    seen = {}
    for res in results:
        for name, t in res["held"].items():
            want = ref["model.embed_tokens.weight"] if (tie and name == "lm_head.weight") else ref[name]
            assert t.dtype == want.dtype and torch.equal(t, want), (layout, res["rank"], name)
            assert t.dtype == (torch.float32 if "correction_bias" in name else torch.float64), name
            seen[name] = True
    assert set(seen) >= set(ref) - ({"lm_head.weight"} if tie else set()), set(ref) - set(seen)
    if pipelined:  # no rank holds the whole model: the other stages' tensors stayed on meta
        assert all(res["meta_left"] > 0 for res in results), [r["meta_left"] for r in results]
        per_rank = [len(res["held"]) for res in results]
        assert max(per_rank) < len(ref), (per_rank, len(ref))
