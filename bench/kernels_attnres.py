"""Forward + backward time and peak memory of one Block AttnRes block's depth reads: Triton kernels vs torch.

Why this unit: with the two-phase schedule a block of S sublayers costs one phase-1 call (S queries against
the N completed blocks) plus S phase-2 merges with the growing partial sum. We time exactly that — the
sublayers themselves are replaced by fixed tensors ``y_s`` (partial_{s+1} = partial_s + y_s) — and compare:
* ``triton``: ``attnres_kernels`` (phase-1 / phase-2 kernels, recomputing backward);
* ``torch``: the reference in ``attnres_train.model.depth`` (what the model runs without the kernels);
* ``residual``: the PreNorm baseline's residual adds for the same S sublayers (h_{s+1} = h_s + y_s).
Loss = Σ_s ⟨h_s, w_s⟩ with fixed random w_s; backward reaches blocks, partial sums and queries. Variants run
interleaved in one process (rotating order), medians over rounds; peak memory is measured above the inputs.

Usage (CUDA only; prints a skip line elsewhere):
  python bench/kernels_attnres.py [--d 2304] [--blocks 9] [--queries 6] [--tokens 16384] [--dtype bf16]
Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from attnres_train.model import depth


def make_inputs(args, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.tokens // args.seq, args.seq, args.d)

    def rnd(scale=1.0, grad=True, dt=dtype):
        return (torch.randn(shape, generator=g) * scale).to(device, dt).requires_grad_(grad)

    blocks = [rnd(1.0 + j) for j in range(args.blocks)]
    ys = [rnd(0.5, grad=False) for _ in range(args.queries)]
    ws = [rnd(1.0, grad=False, dt=torch.float32) for _ in range(args.queries)]
    q = (torch.randn(args.queries, args.d, generator=g) * 0.05).to(device).requires_grad_()
    return blocks, ys, ws, q


def run_block(impl, blocks, ys, ws, q, eps):
    """One block's S depth reads (forward) and the backward of Σ_s ⟨h_s, w_s⟩."""
    dtype = blocks[0].dtype
    if impl == "residual":
        h = blocks[-1]
        loss = 0.0
        for y, w in zip(ys, ws):
            loss = loss + (h.float() * w).sum()
            h = h + y
        loss.backward()
        return
    stats = depth.phase1(blocks, q, eps, impl)
    partial, loss = None, 0.0
    for s, (y, w) in enumerate(zip(ys, ws)):
        h = depth.phase2(stats[s], partial, q[s], eps, dtype, impl)
        loss = loss + (h.float() * w).sum()
        partial = y if partial is None else partial + y
    loss.backward()


def measure(fn, reps):
    """(median ms over ``reps`` calls timed with CUDA events, peak bytes allocated above the baseline)."""
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def check(blocks, ys, ws, q, eps):
    """Max abs difference of outputs and gradients, kernels vs torch (on a slice of the tokens)."""
    sl = [b.detach()[:1, :256].clone().requires_grad_() for b in blocks]
    ys1 = [y[:1, :256] for y in ys]
    q1 = q.detach().clone().requires_grad_()
    outs, grads = {}, {}
    for impl in ("triton", "torch"):
        stats = depth.phase1(sl, q1, eps, impl)
        partial, hs = None, []
        for s, y in enumerate(ys1):
            hs.append(depth.phase2(stats[s], partial, q1[s], eps, sl[0].dtype, impl).float())
            partial = y if partial is None else partial + y
        out = torch.stack(hs)
        grads[impl] = torch.autograd.grad(out.square().sum(), sl + [q1])
        outs[impl] = out.detach()
    d_out = float((outs["triton"] - outs["torch"]).abs().max())
    d_grad = max(
        float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
        for a, b in zip(grads["triton"], grads["torch"])
    )
    return d_out, d_grad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=2304, help="hidden size (Kimi Linear 48B: 2304)")
    ap.add_argument("--blocks", type=int, default=9, help="completed blocks N incl. the embedding")
    ap.add_argument("--queries", type=int, default=6, help="sublayers per block S (48B AttnRes: 3 layers = 6)")
    ap.add_argument("--tokens", type=int, default=16384, help="B*T")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5, help="timed calls per variant per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default="triton,torch,residual")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "SKIP: bench/kernels_attnres.py needs a CUDA device (the Triton kernels are tested on CPU by "
            "tests/kernels under the interpreter, which is far too slow to time)"
        )
        return 0
    import attnres_kernels

    if not attnres_kernels.triton_importable():
        print("SKIP: triton is not importable")
        return 0
    if args.tokens % args.seq:
        raise SystemExit("--tokens must be a multiple of --seq")
    device = torch.device("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    eps = 1e-5
    names = [v for v in args.variants.split(",") if v]
    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {__import__('triton').__version__}"
    )
    print(f"shape: N={args.blocks} blocks, S={args.queries} queries, B*T={args.tokens}, d={args.d}, {args.dtype}")
    blocks, ys, ws, q = make_inputs(args, device, dtype)
    d_out, d_grad = check(blocks, ys, ws, q, eps)
    print(f"check (kernels vs torch, 256 tokens): max |out diff| {d_out:.3e}, max rel grad diff {d_grad:.3e}")

    def fn(impl):
        def call():
            for t in blocks + [q]:
                t.grad = None
            run_block(impl, blocks, ys, ws, q, eps)

        return call

    fns = {k: fn(k) for k in names}
    for k in names:  # compile the kernels, warm the allocator
        for _ in range(args.warmup):
            fns[k]()
    ms = {k: [] for k in names}
    peak = {k: 0 for k in names}
    for r in range(args.rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t, mem = measure(fns[k], args.reps)
            ms[k].append(t)
            peak[k] = max(peak[k], mem)
    med = {k: statistics.median(v) for k, v in ms.items()}
    for k in names:
        print(
            f"{k:9s} fwd+bwd {med[k]:8.3f} ms   (min {min(ms[k]):.3f}, max {max(ms[k]):.3f})   "
            f"peak +{peak[k] / 2**20:8.1f} MiB"
        )
    for k in names:
        print(f"RESULT attnres_block_fwd_bwd_{k} {med[k]:.4f} ms")
        print(f"RESULT attnres_block_peak_mem_{k} {peak[k] / 2**20:.1f} MiB")
    if "triton" in med and "torch" in med:
        print(f"RESULT attnres_triton_speedup_vs_torch {med['torch'] / med['triton']:.3f} x")
    if "triton" in med and "residual" in med:
        print(f"RESULT attnres_triton_over_residual {med['triton'] / med['residual']:.3f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
