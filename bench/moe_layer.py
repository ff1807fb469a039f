"""One f1 MoE layer, forward + backward, CPU time: before/after interleaved, a phase breakdown, a profile.

Why: issue 17 item 2 asks where an MoE layer's time goes beyond its GEMMs. This bench times one ``MoE`` at f1
sizes (configs/model/f1.yaml: T=512 tokens, d=448, 64 experts top-8 + 1 shared, expert FFN 208, fp32, 1
thread), same weights and batch, and prints:

* ``layer``: the previous code (``_BeforeMoE`` below: the combine as ``index_select`` + bmm under plain
  autograd) against the current ``MoE``, alternating step by step, ``--rounds`` pairs per repeat, ``--repeats``
  repeats; outputs and gradients are first checked bitwise equal. ``combine``: the combine alone, same way.
* ``loop``: the layer with ``experts.impl='loop'``, the per-expert fallback that fp64 and CPU under
  ``torch.compile`` run (grouped_mm is not used there): the previous plain-autograd loop vs
  ``_PerExpertSwiGLU`` (checked close: its GEMMs write into slices of one buffer and accumulate dx with
  addmm, so the rounding differs).
* phases: route, dispatch, routed experts, combine and shared expert, each forward + backward on its own;
  floors: the same GEMMs with no autograd (per-expert ``mm`` on the layer's own row counts), and the layer's
  model FLOPs at the rate of a 1024^3 matmul probe timed in the same run.

Then a torch.profiler table of a few steps (self time per op; thread time, so on a loaded box it reads high).
RESULT: median over repeats of the per-repeat medians (speed-ups as before/after). Usage:
``OMP_NUM_THREADS=1 python bench/moe_layer.py [--rounds 12] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from attnres_train.config.model import as_model_config
from attnres_train.model.moe import GroupedExperts, MoE
from attnres_train.train.host_memory import keep_freed_host_memory

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "f1.yaml"


@torch.compiler.disable
def _before_experts_loop(x_ND, counts, w1_EFD, w3_EFD, w2_EDF):
    """The previous per-expert fallback (plain autograd over per-expert slices)."""
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else counts
    outs, start = [], 0
    for j, c in enumerate(counts):
        if c == 0:
            continue
        x = x_ND[start : start + c]
        h = F.silu(x @ w1_EFD[j].t()) * (x @ w3_EFD[j].t())
        outs.append(h @ w2_EDF[j].t())
        start += c
    return torch.cat(outs, dim=0)


class _BeforeExperts(GroupedExperts):
    """``GroupedExperts`` whose ``impl='loop'`` runs the previous fallback (grouped_mm unchanged)."""

    def compute(self, x_ND, counts, w1_EFD, w3_EFD, w2_EDF):
        if self.impl != "loop":
            return super().compute(x_ND, counts, w1_EFD, w3_EFD, w2_EDF)
        return _before_experts_loop(x_ND, counts, w1_EFD, w3_EFD, w2_EDF)


class _BeforeMoE(MoE):
    """The MoE with the previous ``combine`` (before issue 17's ``_CombineRows``) and the previous per-expert
    fallback (before ``_PerExpertSwiGLU``), for the side-by-side."""

    def __init__(self, cfg):
        super().__init__(cfg)
        e = self.experts
        self.experts = _BeforeExperts(e.num_experts, e.hidden_size, e.intermediate_size, impl=e.impl)

    def combine(self, y_sorted_ND, topk_weight_TK, plan, out_dtype, token_shape=None):
        inverse_N = torch.empty_like(plan.order_N)
        inverse_N[plan.order_N] = torch.arange(plan.order_N.numel(), device=plan.order_N.device)
        lead = tuple(token_shape) if token_shape is not None else (plan.num_tokens,)
        y_TKD = y_sorted_ND.index_select(0, inverse_N).view(-1, plan.top_k, y_sorted_ND.shape[-1])
        acc = torch.promote_types(y_TKD.dtype, torch.float32)
        y_TD = torch.bmm(topk_weight_TK.to(acc).reshape(-1, 1, plan.top_k), y_TKD.to(acc)).view(*lead, -1)
        return y_TD.to(out_dtype, copy=True)


def cpu_ms(fn) -> float:
    c0 = time.process_time()
    fn()
    return (time.process_time() - c0) * 1e3


def median_ms(fn, n: int) -> float:
    fn()
    return statistics.median(cpu_ms(fn) for _ in range(n))


def build(seed: int = 0):
    cfg = as_model_config(OmegaConf.load(CONFIG))
    torch.manual_seed(seed)
    after = MoE(cfg)
    for p in after.shared_experts.parameters():  # the model initialises these nn.Linear weights
        torch.nn.init.normal_(p, std=cfg.init_std)
    before = _BeforeMoE(cfg)
    before.load_state_dict(after.state_dict())
    x_BTD = torch.randn(1, 512, cfg.hidden_size)
    g_BTD = torch.randn_like(x_BTD)
    return cfg, before, after, x_BTD, g_BTD


def step(moe: MoE, x_BTD: torch.Tensor, g_BTD: torch.Tensor):
    """One forward + backward; returns the output and the input and parameter gradients."""
    x = x_BTD.clone().requires_grad_()
    y, aux = moe(x)
    if aux is None:
        y.backward(g_BTD)
    else:
        torch.autograd.backward([y, aux], [g_BTD, torch.ones_like(aux)])
    grads = [x.grad] + [p.grad for p in moe.parameters()]
    moe.zero_grad(set_to_none=True)
    return y.detach(), grads


def check_equal(before, after, x_BTD, g_BTD) -> bool:
    yb, gb = step(before, x_BTD, g_BTD)
    ya, ga = step(after, x_BTD, g_BTD)
    return torch.equal(yb, ya) and all(torch.equal(a, b) for a, b in zip(ga, gb))


def loop_close(before, after, x_BTD, g_BTD) -> bool:
    """The two per-expert loops differ only in rounding (GEMMs into buffer slices, dx accumulated by addmm)."""
    yb, gb = step(before, x_BTD, g_BTD)
    ya, ga = step(after, x_BTD, g_BTD)
    close = [torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip([ya, *ga], [yb, *gb])]
    return all(close)


def phases(moe: MoE, x_BTD: torch.Tensor, n: int) -> dict:
    """CPU ms of each step of the layer, forward + backward on its own (random output gradients)."""
    x_TD = x_BTD[0]
    idx_TK, w_TK, _ = moe.route(x_TD)
    xs_ND, counts_E, plan = moe.dispatch(x_TD, idx_TK)
    gs_ND, g_TD = torch.randn_like(xs_ND), torch.randn_like(x_TD)

    def leaf(t):
        return t.detach().clone().requires_grad_()

    def route():
        _, w, s = moe.route(leaf(x_TD))
        torch.autograd.backward([w, s], [torch.ones_like(w), torch.zeros_like(s)])

    def dispatch():
        moe.dispatch(leaf(x_TD), idx_TK)[0].backward(gs_ND)

    def experts():
        moe.experts(leaf(xs_ND), counts_E).backward(gs_ND)

    def combine():
        moe.combine(leaf(xs_ND), leaf(w_TK), plan, x_TD.dtype).backward(g_TD)

    def shared():
        moe.shared_experts(leaf(x_TD)).backward(g_TD)

    out = {}
    for name, fn in (("route", route), ("dispatch", dispatch), ("experts", experts), ("combine", combine)):
        out[name] = median_ms(fn, n)
        moe.zero_grad(set_to_none=True)
    out["shared"] = median_ms(shared, n)
    moe.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def gemm_floor_ms(moe: MoE, x_BTD: torch.Tensor, n: int) -> float:
    """The layer's GEMMs (router, routed experts per expert, shared expert; forward + both backward GEMMs)
    with no autograd, no elementwise work, no permutation: what MKL gives for these shapes."""
    x_TD = x_BTD[0]
    idx_TK, _, _ = moe.route(x_TD)
    xs_ND, counts_E, _ = moe.dispatch(x_TD, idx_TK)
    counts = counts_E.tolist()
    ex, se, gate = moe.experts, moe.shared_experts, moe.gate.weight
    g1, g3, g2 = (torch.empty_like(w) for w in (ex.w1, ex.w3, ex.w2))
    gs_ND = torch.randn_like(xs_ND)

    def swiglu_gemms(x, g, w1, w3, w2, o1, o3, o2):
        a, b = x @ w1.t(), x @ w3.t()
        h = a * b
        torch.mm(h, w2.t())
        dh = g @ w2
        torch.mm(g.t(), h, out=o2)
        torch.addmm(dh @ w1, dh, w3)
        torch.mm(dh.t(), x, out=o1)
        torch.mm(dh.t(), x, out=o3)

    def run():
        s = 0
        for j, c in enumerate(counts):
            swiglu_gemms(xs_ND[s : s + c], gs_ND[s : s + c], ex.w1[j], ex.w3[j], ex.w2[j], g1[j], g3[j], g2[j])
            s += c
        ws = [se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight]
        swiglu_gemms(x_TD, x_TD, *ws, *(torch.empty_like(w) for w in ws))
        logits = x_TD @ gate.t()
        logits @ gate, logits.t() @ x_TD

    return median_ms(run, n)


def layer_flops(cfg, tokens: int) -> float:
    """Model FLOPs of one MoE layer, forward + backward (3x forward), as attnres_train/model/flops.py counts."""
    m = cfg.moe
    d = cfg.hidden_size
    return 3 * tokens * 2 * (3 * d * m.intermediate_size * (m.top_k + m.num_shared_experts) + d * m.num_experts)


def probe_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / median_ms(lambda: a @ b, 5) / 1e6


def interleaved(name: str, before, after, rounds: int, repeats: int) -> list:
    """``repeats`` x (``rounds`` alternating before/after calls); per repeat the two medians and the probe."""
    meds = []
    for rep in range(repeats):
        t = {"before": [], "after": []}
        for r in range(rounds):
            pair = (("before", before), ("after", after))
            for which, fn in pair if r % 2 == 0 else pair[::-1]:
                t[which].append(cpu_ms(fn))
        b, a = statistics.median(t["before"]), statistics.median(t["after"])
        meds.append((b, a))
        print(f"{name:8s} repeat {rep}: before {b:7.1f} ms  after {a:7.1f} ms  before/after {b / a:.3f}")
    return meds


def combine_case(moe: MoE, x_BTD: torch.Tensor, g_BTD: torch.Tensor, previous: MoE):
    """The combine alone (fwd + bwd) at f1 sizes: previous vs current."""
    x_TD = x_BTD[0]
    idx_TK, w_TK, _ = moe.route(x_TD)
    xs_ND, _, plan = moe.dispatch(x_TD, idx_TK)

    def run(m):
        y = xs_ND.detach().clone().requires_grad_()
        w = w_TK.detach().clone().requires_grad_()
        m.combine(y, w, plan, x_TD.dtype, (1, x_TD.shape[0])).backward(g_BTD)

    return (lambda: run(previous)), (lambda: run(moe))


def summary(name: str, meds: list) -> None:
    ratios = [b / a for b, a in meds]
    print(
        f"RESULT {name} {statistics.median(ratios):.3f} x "
        f"(min {min(ratios):.3f} .. max {max(ratios):.3f}, n={len(ratios)}; before "
        f"{statistics.median(b for b, _ in meds):.1f} ms, after {statistics.median(a for _, a in meds):.1f} ms CPU)"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12, help="interleaved before/after pairs per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-rounds", type=int, default=2, help="pairs per repeat of the (slow) impl=loop case")
    ap.add_argument("--profile-steps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_host_memory()
    cfg, before, after, x_BTD, g_BTD = build()
    print(f"# torch {torch.__version__}, 1 thread, CPU time (process_time); f1 MoE: T=512, d={cfg.hidden_size},")
    m = cfg.moe
    print(f"# {m.num_experts} experts top-{m.top_k} + {m.num_shared_experts} shared, ff {m.intermediate_size}, fp32")
    print(f"outputs and gradients bitwise equal before/after: {check_equal(before, after, x_BTD, g_BTD)}")
    print(f"routed experts on this CPU: impl={after.experts.impl} -> grouped_mm usable: ", end="")
    from attnres_train.model.moe import _grouped_mm_usable

    print(_grouped_mm_usable(x_BTD[0], m.intermediate_size))

    meds = interleaved(
        "layer", lambda: step(before, x_BTD, g_BTD), lambda: step(after, x_BTD, g_BTD), args.rounds, args.repeats
    )
    comb = interleaved("combine", *combine_case(after, x_BTD, g_BTD, before), args.rounds * 3, args.repeats)
    # the per-expert fallback: fp64, and CPU under torch.compile (grouped_mm is not used there)
    before.experts.impl = after.experts.impl = "loop"
    print(f"impl=loop outputs and gradients fp32-close before/after: {loop_close(before, after, x_BTD, g_BTD)}")
    loop = interleaved(
        "loop", lambda: step(before, x_BTD, g_BTD), lambda: step(after, x_BTD, g_BTD), args.loop_rounds, args.repeats
    )
    before.experts.impl = after.experts.impl = "auto"

    probe = probe_gflops()
    flops = layer_flops(cfg, x_BTD.shape[0] * x_BTD.shape[1])
    ph = phases(after, x_BTD, args.rounds)
    floor = gemm_floor_ms(after, x_BTD, args.rounds)
    after_ms = statistics.median(a for _, a in meds)
    print("\nphases (after, each fwd+bwd alone, CPU ms): " + "  ".join(f"{k} {v:.1f}" for k, v in ph.items()))
    print(f"sum of phases {sum(ph.values()):.1f} ms; layer {after_ms:.1f} ms")
    print(f"GEMMs alone (no autograd, per-expert mm on the same rows): {floor:.1f} ms")
    print(f"model FLOPs {flops / 1e9:.2f} GFLOP at the probe's {probe:.1f} GFLOP/s: {flops / probe / 1e6:.1f} ms")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            step(after, x_BTD, g_BTD)
    print(f"\ntorch.profiler, {args.profile_steps} after steps (thread time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))

    print(f"RESULT moe_layer_fwd_bwd_ms {after_ms:.1f} ms (median of {args.repeats} repeats)")
    summary("moe_layer_speedup", meds)
    summary("moe_combine_speedup", comb)
    summary("moe_loop_layer_speedup", loop)


if __name__ == "__main__":
    main()
