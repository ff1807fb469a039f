"""Shared builders for the pipeline tests: a small-but-deep model, microbatches, the single-process reference,
and the per-rank body that runs a batch of pipeline configurations in one spawn."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from attnres_train.parallel.pipeline import PipelineLayout, PipelineRuntime, build_stages
from attnres_train.parallel.pipeline.schedules import schedule_placement
from tests.model.helpers import build, randomize_queries, tiny_cfg
from tests.pipeline.controls import DropDepositsRuntime

VOCAB, HIDDEN, BATCH, SEQ = 64, 16, 2, 8


def small_cfg(
    mode="block", num_layers=8, block_size=None, num_blocks=None, tie=False, aux=0.01, partition="decoder_layer"
):
    """Tiny widths, many layers: mostly MLA (cheap on CPU), some KDA, MoE after layer 0 with the seq aux loss."""
    cfg = tiny_cfg(
        mode,
        num_blocks,
        block_size,
        num_layers=num_layers,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        tie_word_embeddings=tie,
    )
    cfg.mla_layers = [i for i in range(num_layers) if i % 3 != 1]
    cfg.kda.head_dim, cfg.kda.num_heads, cfg.kda.chunk_size = 8, 2, 8
    cfg.mla.kv_lora_rank, cfg.mla.qk_nope_head_dim, cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim = 8, 8, 4, 8
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.intermediate_size = 4, 2, 8
    cfg.moe.dense_intermediate_size, cfg.moe.first_k_dense = 16, 1
    cfg.moe.seq_aux_loss_coef = aux
    cfg.residual.partition = partition  # model.residual.partition: sublayer blocks may open at an FFN
    return cfg


def make_model(cfg, dtype=torch.float64):
    model = build(copy.deepcopy(cfg), seed=0, dtype=dtype)
    if cfg.residual.mode != "prenorm":
        randomize_queries(model)  # zero queries make the depth softmax uniform and hide routing bugs
    return model


def make_microbatches(M: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g))
        for _ in range(M)
    ]


def param_names(model) -> dict:
    """id(parameter) -> full-model name (a tied head weight maps to ``model.embed_tokens.weight``)."""
    return {id(p): n for n, p in model.named_parameters()}


def reference(cfg, dtype, M: int):
    """Single-process loss, aux loss and every parameter gradient for the same microbatches (loss/M + aux/M)."""
    model = make_model(cfg, dtype)
    loss_sum, aux_sum = 0.0, 0.0
    for ids, labels in make_microbatches(M):
        out = model(ids, labels=labels)
        total = out.loss / M
        if out.aux_loss is not None:
            total = total + out.aux_loss / M
            aux_sum += float(out.aux_loss.detach()) / M
        total.backward()
        loss_sum += float(out.loss.detach()) / M
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return {"loss": loss_sum, "aux": aux_sum, "grads": grads, "loads": expert_loads(model, model)}


def expert_loads(model, root) -> dict:
    """name -> ``tokens_per_expert`` of every MoE module under ``root`` (names from the full ``model``)."""
    names = {id(m): n for n, m in model.named_modules()}
    return {
        names[id(m)]: m.tokens_per_expert.clone()
        for m in root.modules()
        if hasattr(m, "tokens_per_expert") and id(m) in names
    }


@dataclass
class Case:
    name: str
    P: int
    V: int
    M: int
    mode: str = "block"
    L: int = 8
    block_size: Optional[int] = None
    num_blocks: Optional[int] = None
    partition: str = "decoder_layer"
    schedule: str = "interleaved_1f1b"
    cache: bool = True
    dtype: torch.dtype = torch.float64
    tie: bool = False
    layers: Optional[List[int]] = None
    split_iw: bool = False
    w_delay: Optional[int] = None
    drop_deposits: bool = False  # negative control (tests/pipeline/controls.py)
    steps: int = 1
    eval_too: bool = False
    extra: dict = field(default_factory=dict)

    def cfg(self):
        return small_cfg(self.mode, self.L, self.block_size, self.num_blocks, tie=self.tie, partition=self.partition)

    def layout(self):
        return PipelineLayout.from_model_config(
            self.cfg(),
            self.P,
            self.V,
            layers_per_stage=self.layers,
            block_cache=self.cache,
            placement=schedule_placement(self.schedule),
        )

    def ref_key(self):
        return (self.mode, self.L, self.block_size, self.num_blocks, self.partition, self.tie, self.dtype, self.M)


def run_case(case: Case, rank: int, group=None) -> dict:
    """Run ``case`` on this rank; return this rank's loss, aux, its stages' gradients and comm stats."""
    cfg = case.cfg()
    model = make_model(cfg, case.dtype)
    layout = case.layout()
    stages = build_stages(model, layout, rank)
    runtime_cls = DropDepositsRuntime if case.drop_deposits else PipelineRuntime  # negative control: tests/ only
    rt = runtime_cls(stages, layout, case.schedule, group, split_iw=case.split_iw, w_delay=case.w_delay)
    mbs = make_microbatches(case.M)
    names = param_names(model)
    per_step = []
    t0 = time.perf_counter()
    for _ in range(case.steps):
        for p in model.parameters():
            p.grad = None
        res = rt.step(mbs)
        grads = {}
        for st in stages:
            for p in st.parameters():
                grads[names[id(p)]] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        per_step.append(
            {
                "loss": float(res.loss),
                "aux": None if res.aux_loss is None else float(res.aux_loss),
                "grads": grads,
                "stats": res.stats.as_dict(),
                "state_left": rt._cache is not None,
            }
        )
    out = dict(per_step[-1])
    out["loads"] = {}
    for st in stages:
        out["loads"].update(expert_loads(model, st))
    out["steps"] = per_step
    out["seconds"] = time.perf_counter() - t0
    if case.eval_too:
        ev = rt.step(mbs, eval_mode=True)
        out["eval_loss"] = float(ev.loss)
    return out


def rank_body(cases: List[Case]) -> list:
    """Per-rank entry point for ``tests.distributed.run_distributed``: run every case in order."""
    import torch.distributed as dist

    rank = dist.get_rank()
    return [run_case(c, rank) for c in cases]
