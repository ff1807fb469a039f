"""Training-step time of Block AttnRes (N=8) and Full AttnRes relative to the PreNorm baseline, and MFU.

Why interleaved: these machines are noisy, so the variants run round-robin (one step each per round, the order
rotating every round) and we report the ratio of medians measured side by side in the same process. Same
weights (AttnRes models load the baseline's state dict; pseudo-queries are set non-zero so no shortcut
applies), same batch. A training step is forward + backward (+ the optimizer step with ``--optimizer adamw``,
the default: fused AdamW where this torch has it, as the trainer uses).

MFU: useful model FLOPs (``attnres_train.model.flops.train_flops_per_token``: active experts only, causal MLA,
KDA's chunked formula, AttnRes reads) per second of median step time, divided by the throughput of a plain
``n x n`` fp32/bf16 matmul (``--probe-n``) measured at the start of every round, i.e. against what this
machine's BLAS delivers right now, not a datasheet peak: MFU per round, median over rounds. The whole measurement
runs ``--repeats`` times (default 3); each ``RESULT`` is the median over repeats with its min..max. CPU time
(``process_time``) medians are printed too: on a shared machine they are less disturbed than wall time.

Resolution: ``prenorm_copy`` (in the default variants) is a second PreNorm model with the same weights, built and
stepped like the others. Its ratio to ``prenorm`` is what the bench reports for two identical models: on a
shared CPU it strays by several percent, which bounds what the full-step ratios can settle. The in-step figure
(``depth_timers.py``) times the depth-mixing functions inside every AttnRes step of the real model and states
them as ``1 + their time / PreNorm median step``: the same question, asked within each step. It is a lower
bound: autograd's sums of each block's gradients and the Python bookkeeping around the functions are not in
it (in ``--stub-sublayers`` runs, where the step difference is the whole cost, the functions are ~80 % of it).

``--stub-sublayers`` replaces every token mixer and FFN by a scalar multiply, so the step-time differences are
the depth-mixing cost alone, without the sublayers' cache pressure.

Usage: python bench/attnres_overhead.py [--preset f2] [--vocab 4096] [--batch 2] [--seq 256] [--rounds 8]
       [--repeats 3] [--optimizer adamw|none] [--threads N] [--device cuda --dtype bf16] [--stub-sublayers]
Ends with one ``RESULT`` line per headline figure.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from depth_timers import DepthTimers  # bench/ sibling
from omegaconf import OmegaConf
from torch import nn

from attnres_train.config.model import as_model_config
from attnres_train.model import build_model
from attnres_train.model.flops import train_flops_per_token
from attnres_train.train.host_memory import keep_freed_host_memory

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def make(cfg, mode, base_state=None, num_blocks=None, impl=None):
    c = copy.deepcopy(cfg)
    c.residual.mode, c.residual.num_blocks, c.residual.block_size = mode, num_blocks, None
    if impl is not None:
        c.residual.impl = impl
    torch.manual_seed(0)
    m = build_model(c)
    if base_state is not None:
        m.load_state_dict(base_state, strict=False)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("_res_proj.weight"):
                    p.normal_(0, 0.05)
    return m, c


class _Scale(nn.Module):
    """Stand-in for a token mixer / FFN (``--stub-sublayers``): one learnable scalar, so only the residual
    path (embedding, norms, depth mixing, head) costs anything."""

    def __init__(self, returns_aux: bool):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.returns_aux = returns_aux

    def forward(self, x):
        return (x * self.w, None) if self.returns_aux else x * self.w


def stub_sublayers(model):
    for layer in model.model.layers:
        layer.self_attn = _Scale(False)
        if layer.is_moe:
            layer.block_sparse_moe = _Scale(True)
        else:
            layer.mlp = _Scale(False)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model, device):
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=device.type == "cuda")


def step_time(model, opt, ids, labels):
    """(wall seconds, process CPU seconds) of one training step."""
    _sync(ids.device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss, aux = model.loss(ids, labels)
    if aux is not None:
        loss = loss + aux
    loss.backward()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    _sync(ids.device)
    return time.perf_counter() - t0, time.process_time() - c0


def add_host_memory_flag(ap):
    ap.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="leave glibc's defaults (freed blocks go back to the OS and fault in again every step); "
        "by default the bench keeps freed host memory, as the trainer does on CPU",
    )


def apply_host_memory_flag(args):
    if not args.return_freed_memory:
        keep_freed_host_memory()


def matmul_probe(n, device, dtype, reps=3):
    """FLOP/s of an ``n x n @ n x n`` matmul (best of ``reps``) — the machine's usable matmul throughput now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="f2")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured rounds before the first repeat")
    ap.add_argument("--repeats", type=int, default=3, help="headline figures = median over this many repeats")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--optimizer", choices=("none", "adamw"), default="adamw")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--probe-n", type=int, default=1024, help="matmul size of the throughput probe")
    ap.add_argument(
        "--variants",
        default="prenorm,prenorm_copy,block8,full",
        help="comma list among prenorm, prenorm_copy, block8, full, block8_ref, full_ref (prenorm_copy: a second "
        "identical PreNorm model, the run's control; the *_ref variants run the autograd reference of the depth "
        "mixing, model.residual.impl=reference)",
    )
    ap.add_argument(
        "--stub-sublayers",
        action="store_true",
        help="replace every token mixer and FFN by a scalar multiply: isolates the depth-mixing cost "
        "(step-time differences are then the AttnRes overhead in ms; MFU is meaningless)",
    )
    add_host_memory_flag(ap)
    args = ap.parse_args(argv)
    apply_host_memory_flag(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = as_model_config(OmegaConf.load(CONFIGS / f"{args.preset}.yaml"))
    cfg.vocab_size = args.vocab
    base, base_cfg = make(cfg, "prenorm")
    builders = {
        "prenorm": lambda: (base, base_cfg),
        "prenorm_copy": lambda: make(cfg, "prenorm", base.state_dict()),  # the control: same model, built again
        "block8": lambda: make(cfg, "block", base.state_dict(), num_blocks=min(8, cfg.num_layers)),
        "full": lambda: make(cfg, "full", base.state_dict()),
        # the autograd reference of the depth mixing (model.residual.impl=reference), for before/after
        "block8_ref": lambda: make(
            cfg, "block", base.state_dict(), num_blocks=min(8, cfg.num_layers), impl="reference"
        ),
        "full_ref": lambda: make(cfg, "full", base.state_dict(), impl="reference"),
    }
    names = [v for v in args.variants.split(",") if v]
    if "prenorm" not in names or any(v not in builders for v in names):
        raise SystemExit(f"--variants must include prenorm and be among {sorted(builders)}")
    variants = {k: builders[k]() for k in names}
    if args.stub_sublayers:
        for m, _ in variants.values():
            stub_sublayers(m)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for m, _ in variants.values():
        m.to(device=device, dtype=dtype)
    opts = {k: (make_optimizer(m, device) if args.optimizer == "adamw" else None) for k, (m, _) in variants.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]

    tokens = args.batch * args.seq
    step_flops = {k: train_flops_per_token(variants[k][1], args.seq) * tokens for k in names}
    opt_desc = "none" if args.optimizer == "none" else (f"adamw(fused={opts['prenorm'].defaults.get('fused')})")
    print(
        f"preset={args.preset} d={cfg.hidden_size} layers={cfg.num_layers} vocab={args.vocab} "
        f"batch={args.batch} seq={args.seq} threads={torch.get_num_threads()} rounds={args.rounds} "
        f"repeats={args.repeats} optimizer={opt_desc} device={device} dtype={args.dtype} torch={torch.__version__}"
    )
    if args.stub_sublayers:
        print("  sublayers stubbed out (--stub-sublayers): differences below are the depth-mixing cost")
    reps = []
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}")
        wall, cpu, probe, mixing = run_rounds(args, names, variants, opts, x, y, device, dtype, rep == 0)
        reps.append(summarise(args, names, step_flops, wall, cpu, probe, mixing))
    headline(args, names, reps)


def run_rounds(args, names, variants, opts, x, y, device, dtype, warm_up):
    """Round-robin steps; the matmul probe runs at the start of every round. Lists aligned by round.

    ``mixing``: per step, the wall seconds spent inside the depth-mixing functions (``DepthTimers``)."""
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    mixing = {k: [] for k in names}
    probe = []
    warmup = args.warmup if warm_up else 0
    with DepthTimers(active=device.type == "cpu") as timers:  # host timers mean nothing for GPU work
        for r in range(warmup + args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always runs first
            flops = matmul_probe(args.probe_n, device, dtype)
            for k in order:
                m, _ = variants[k]
                before = timers.seconds
                w, c = step_time(m, opts[k], x, y)
                if r >= warmup:
                    wall[k].append(w)
                    cpu[k].append(c)
                    mixing[k].append(timers.seconds - before)
            if r >= warmup:
                probe.append(flops)
    return wall, cpu, probe, mixing


def summarise(args, names, step_flops, wall, cpu, probe, mixing):
    """Print one repeat's table; return its headline figures.

    MFU per round = the variant's FLOPs / its step time / the probe of the same round (a slow phase of a shared
    machine slows both); the repeat's MFU is the median over rounds."""
    med = {k: statistics.median(v) for k, v in wall.items()}
    in_step = {k: statistics.median(v) for k, v in mixing.items()}  # 0 where nothing was timed (PreNorm, *_ref)
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    tokens = args.batch * args.seq
    mfu = {k: statistics.median(step_flops[k] / w / p for w, p in zip(wall[k], probe)) for k in names}
    print(
        f"  matmul probe {args.probe_n}^3: median {statistics.median(probe) / 1e9:.1f} GFLOP/s "
        f"(min {min(probe) / 1e9:.1f}, max {max(probe) / 1e9:.1f})"
    )
    for k in names:
        per_round = ", ".join(f"{100 * step_flops[k] / w / p:.0f}" for w, p in zip(wall[k], probe))
        rate = (
            ""
            if args.stub_sublayers
            else f"  {step_flops[k] / med[k] / 1e9:6.1f} GFLOP/s  MFU {100 * mfu[k]:5.1f} % (rounds: {per_round})"
        )
        print(
            f"  {k:8s} median step {med[k] * 1e3:8.1f} ms  (min {min(wall[k]) * 1e3:.1f} ms)  "
            f"cpu {med_cpu[k] * 1e3:8.1f} ms  {tokens / med[k]:8.1f} tokens/s{rate}"
        )
    for k in [n for n in names if n != "prenorm"]:
        print(
            f"  {k} - prenorm: {(med[k] - med['prenorm']) * 1e3:.1f} ms wall, "
            f"{(med_cpu[k] - med_cpu['prenorm']) * 1e3:.1f} ms cpu per step"
        )
        pairs = statistics.median(a / b for a, b in zip(wall[k], wall["prenorm"]))
        print(
            f"  {k} / prenorm: wall medians {med[k] / med['prenorm']:.3f} x, median of per-round ratios "
            f"{pairs:.3f} x, cpu-time medians {med_cpu[k] / med_cpu['prenorm']:.3f} x, mins "
            f"{min(wall[k]) / min(wall['prenorm']):.3f} x"
        )
        if in_step[k] > 0:
            print(
                f"  {k} depth-mixing functions in its steps: median {in_step[k] * 1e3:.1f} ms per step "
                f"(min {min(mixing[k]) * 1e3:.1f}, max {max(mixing[k]) * 1e3:.1f}), "
                f"1 + that / prenorm median step = {1 + in_step[k] / med['prenorm']:.4f} x"
            )
    out = {"probe": statistics.median(probe)}
    for k in names:
        out[f"mfu_{k}"] = 100 * mfu[k]
        if k != "prenorm":
            out[f"{k}_cost"] = (med[k] - med["prenorm"]) * 1e3
            out[f"{k}_ratio"] = med[k] / med["prenorm"]
            out[f"{k}_cpu_ratio"] = med_cpu[k] / med_cpu["prenorm"]
            if in_step[k] > 0:
                out[f"{k}_in_step_ms"] = in_step[k] * 1e3
                out[f"{k}_in_step_ratio"] = 1 + in_step[k] / med["prenorm"]
    return out


def _spread(reps, key, fmt=".3f"):
    vals = [r[key] for r in reps]
    return f"{statistics.median(vals):{fmt}}", f"(min {min(vals):{fmt}} .. max {max(vals):{fmt}}, n={len(vals)})"


def headline(args, names, reps):
    """RESULT lines: the median over repeats of each repeat's figure, with the spread over repeats."""
    others = [n for n in names if n != "prenorm"]
    if args.stub_sublayers:
        for k in others:
            med, spread = _spread(reps, f"{k}_cost", ".1f")
            print(f"RESULT {k}_depth_mixing_cost {med} ms {spread}")
            if f"{k}_in_step_ms" in reps[0]:
                ms, ms_spread = _spread(reps, f"{k}_in_step_ms", ".1f")
                print(f"RESULT {k}_depth_functions_in_step {ms} ms {ms_spread}")
        return
    label = {"block8": "block", "full": "full", "prenorm_copy": "control"}
    for k in others:
        med, spread = _spread(reps, f"{k}_ratio")
        cmed, cspread = _spread(reps, f"{k}_cpu_ratio")
        print(f"RESULT {label.get(k, k)}_over_prenorm_step_time {med} x {spread}")
        print(f"RESULT {label.get(k, k)}_over_prenorm_cpu_time {cmed} x {cspread}")
        if f"{k}_in_step_ms" in reps[0]:
            med, spread = _spread(reps, f"{k}_in_step_ratio", ".4f")
            ms, ms_spread = _spread(reps, f"{k}_in_step_ms", ".1f")
            print(f"RESULT {label.get(k, k)}_depth_functions_over_prenorm {med} x {spread}")
            print(f"RESULT {label.get(k, k)}_depth_functions_in_step {ms} ms {ms_spread}")
    med, spread = _spread(reps, "probe", ".3g")
    print(f"RESULT matmul_probe_gflops {float(med) / 1e9:.1f} GFLOP/s")
    for k in names:
        med, spread = _spread(reps, f"mfu_{k}", ".1f")
        print(f"RESULT mfu_{k} {med} % {spread}")


if __name__ == "__main__":
    main()
