"""Before/after CPU time of the non-GEMM costs removed for issue 17 item 2, interleaved in one process.

Why: on a shared 2-core box wall time of a whole step moves by more than these changes; CPU time of the changed
code, before and after alternating step by step (1 thread), does not. Each case runs ``--rounds`` interleaved
pairs per repeat, ``--repeats`` times (default 3); RESULT = median over repeats of (after / before) of the
medians, with min..max. The "before" code is the previous formulation, inlined here (bitwise-equal or fp64-exact
to the new one: tests/parallel/test_ep_local_experts.py, tests/model/test_full_segment_cache.py, test_moe.py).

Cases: ``ep_slice`` (EP local experts, f1 sizes, all local experts: sliced vs whole shards), ``kda_conv`` (one
f1 KDA mixer: the short convs' output as a transposed view vs [B,T,C] order), ``moe_combine`` (f1:
mul + sum vs bmm), ``full_cache`` (Full AttnRes f2 with stubbed sublayers, forward + backward: a fused phase 1
per sublayer vs the segment logits cache), ``full_step`` (the same on the real f2 model, one training step
without the optimizer). Usage: OMP_NUM_THREADS=1 python bench/non_gemm_ab.py [--cases a,b] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from attnres_overhead import make, stub_sublayers  # bench/ sibling
from omegaconf import OmegaConf

from attnres_train.config.model import as_model_config
from attnres_train.model import build_model
from attnres_train.model.moe import GroupedExperts, MoE
from attnres_train.parallel.expert import ExpertParallelExperts
from attnres_train.train.host_memory import keep_freed_host_memory

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def _cfg(preset):
    return as_model_config(OmegaConf.load(CONFIGS / f"{preset}.yaml"))


def case_ep_slice():
    """f1: 64 local experts (d 448, ff 208), 512 tokens x top-8 rows, forward + backward."""
    torch.manual_seed(0)
    shard = GroupedExperts(64, 448, 208)
    counts = torch.full((64,), 64)
    x = torch.randn(4096, 448)
    g = torch.randn(4096, 448)

    def before():
        sl = slice(0, 64)
        shard.compute(x, counts.tolist(), shard.w1[sl], shard.w3[sl], shard.w2[sl]).backward(g)
        shard.zero_grad(set_to_none=True)

    def after():
        ExpertParallelExperts.local_experts(shard, x, counts).backward(g)
        shard.zero_grad(set_to_none=True)

    return before, after


def case_moe_combine():
    """f1: combine of 512 tokens x top-8 expert rows (d 448), forward + backward."""
    cfg = _cfg("f1")
    moe = MoE(cfg)
    torch.manual_seed(0)
    T, K, D = 512, cfg.moe.top_k, cfg.hidden_size
    idx = torch.stack([torch.randperm(cfg.moe.num_experts)[:K] for _ in range(T)])
    w = torch.rand(T, K).requires_grad_()
    _, _, plan = moe.dispatch(torch.zeros(T, D), idx)
    y = torch.randn(T * K, D).requires_grad_()
    g = torch.randn(1, T, D)

    def before():  # the previous formulation of MoE.combine
        inverse_N = torch.empty_like(plan.order_N)
        inverse_N[plan.order_N] = torch.arange(plan.order_N.numel())
        y_TKD = y.index_select(0, inverse_N).view(1, T, K, -1)
        (y_TKD * w.view(1, T, K, 1)).sum(dim=-2).to(torch.float32).backward(g)

    def after():
        moe.combine(y, w, plan, torch.float32, (1, T)).backward(g)

    return before, after


def case_kda_conv():
    """f1: one KDA token mixer (4 per f1 step), 512 tokens, forward + backward; the short convolutions' output
    as the transposed view of the conv (before) or copied to [B,T,C] order (after)."""
    from attnres_train.model import kda as kda_module
    from attnres_train.model.kda_ops import short_conv

    def transposed_view(x_btc, weight_c1w, silu=False, doc_ids=None):  # the previous short_conv
        C, W = weight_c1w.shape[0], weight_c1w.shape[-1]
        y_btc = F.conv1d(F.pad(x_btc.transpose(1, 2), (W - 1, 0)), weight_c1w, groups=C).transpose(1, 2)
        return F.silu(y_btc) if silu else y_btc

    cfg = _cfg("f1")
    cfg.vocab_size = 512
    torch.manual_seed(0)
    layer = build_model(cfg).model.layers[0].self_attn
    h = torch.randn(1, 512, cfg.hidden_size)

    def run(conv):
        kda_module.short_conv = conv  # the layer module's name for it, swapped for this bench only
        try:
            y = layer(h.clone().requires_grad_())
            (y[0] if isinstance(y, tuple) else y).sum().backward()
        finally:
            kda_module.short_conv = short_conv
        layer.zero_grad(set_to_none=True)

    return (lambda: run(transposed_view)), (lambda: run(short_conv))


def _full_models(stub):
    cfg = _cfg("f2")
    cfg.vocab_size = 512 if stub else 4096
    model, _ = make(cfg, "full", make(cfg, "prenorm")[0].state_dict())
    if stub:
        stub_sublayers(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 257), generator=torch.Generator().manual_seed(0))
    x, labels = ids[:, :-1], ids[:, 1:]

    def step(cached):
        state = model.embed(x)
        if cached:
            state = model.forward_layers(state)
        else:  # the previous Full path: every sublayer reads through one fused phase 1 over all its sources
            for layer in model.model.layers:
                state = layer(state)
        logits = model.lm_head(model.final_hidden(state))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        (loss if state.aux_loss is None else loss + state.aux_loss).backward()
        model.zero_grad(set_to_none=True)

    return (lambda: step(False)), (lambda: step(True))


CASES = {
    "ep_slice": case_ep_slice,
    "kda_conv": case_kda_conv,
    "moe_combine": case_moe_combine,
    "full_cache": lambda: _full_models(stub=True),
    "full_step": lambda: _full_models(stub=False),
}


def cpu_ms(fn):
    c0 = time.process_time()
    fn()
    return (time.process_time() - c0) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_host_memory()
    print(f"# torch {torch.__version__}, 1 thread, CPU time (process_time), {args.rounds} rounds x {args.repeats}")
    for name in args.cases.split(","):
        before, after = CASES[name]()
        before(), after()  # warm-up
        ratios, meds = [], []
        for rep in range(args.repeats):
            t = {"before": [], "after": []}
            for r in range(args.rounds):
                for k, fn in (
                    (("before", before), ("after", after)) if r % 2 == 0 else (("after", after), ("before", before))
                ):
                    t[k].append(cpu_ms(fn))
            b, a = statistics.median(t["before"]), statistics.median(t["after"])
            ratios.append(a / b)
            meds.append((b, a))
            print(f"{name:12s} repeat {rep}: before {b:8.1f} ms  after {a:8.1f} ms  after/before {a / b:.3f}")
        saved = statistics.median(b - a for b, a in meds)
        print(
            f"RESULT {name}_after_over_before {statistics.median(ratios):.3f} x "
            f"(min {min(ratios):.3f} .. max {max(ratios):.3f}, n={len(ratios)}); saved {saved:.1f} ms CPU per call"
        )


if __name__ == "__main__":
    main()
