"""GPU readiness check (issue 12, part 5): does the CUDA fast path work, and how fast is it, in one short run.

Why one script: device machines are lent for minutes, so everything that needs a GPU is measured in one process
with small fixed budgets (~5 min on one H200, ``--quick`` about half). Each section is guarded: a failing one
prints ``ERROR <section>: ...``, the others still run, and the exit status is 1.
  a attnres_triton    compiled Triton AttnRes kernels (never TRITON_INTERPRET) vs impl=torch on one block's depth
                      reads (d=2304, N=9, S=6): max abs error of outputs / gradients (fp32, bf16), fwd+bwd speed
  b kda_fla           fla's chunk_kda (KimiDeltaAttention core "fla") vs our torch chunked KDA, same f3-sized
                      layer and input: max abs error of output / all gradients (fp32, bf16 autocast), speed
  c train             training steps of presets f2, f3 (Block AttnRes N=min(8,L); bf16 autocast over fp32
                      weights, clipping, fused AdamW, as the trainer): tokens/s and MFU (model/flops.py over
                      train/metrics.py peak_flops: 989 TFLOP/s dense bf16 on H100/H200)
  d block_vs_prenorm  Block AttnRes / PreNorm step time of f2 (same weights and batch, interleaved rounds)
``--dry-run``: c and d on CPU in fp32 at toy widths (the presets' layer patterns), a and b print
``SKIP <section> (no CUDA)``; tests/test_gpu_check_dry_run.py runs it. Tolerances only catch bugs (O(1) errors).
Usage: bench/gpu_check.sh [--quick] (sets up Python, logs to bench/results/) or
       python bench/gpu_check.py [--quick | --dry-run] [--only a,b,c,d]. Prints ``RESULT <name> <value> <unit>``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run without `pip install -e .` (system python3 on a bare GPU machine)
    sys.path.insert(0, str(REPO))
if importlib.util.find_spec("attnres_kernels") is None:  # kernels/ is installed under that name by pyproject
    _spec = importlib.util.spec_from_file_location(
        "attnres_kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
    )
    sys.modules["attnres_kernels"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["attnres_kernels"])

from attnres_overhead import make  # noqa: E402  (bench/ sibling: the same AttnRes variant builder)
from omegaconf import OmegaConf  # noqa: E402

from attnres_train.config.model import ModelConfig, as_model_config  # noqa: E402
from attnres_train.model import depth  # noqa: E402
from attnres_train.model.flops import train_flops_per_token  # noqa: E402
from attnres_train.model.kda import KimiDeltaAttention  # noqa: E402
from attnres_train.train.metrics import peak_flops  # noqa: E402

CONFIGS = REPO / "configs" / "model"
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s; used when peak_flops() does not know the device name
FAILED: list = []


def result(name, value, unit):
    print(f"RESULT {name} {value:.6g} {unit}", flush=True)


def error(section, msg):
    FAILED.append(section)
    print(f"ERROR {section}: {msg}", flush=True)


def within(section, what, err, scale, tol):
    """Record an ERROR when ``err`` exceeds ``tol`` relative to ``scale`` (tolerances catch bugs, not rounding)."""
    rel = err / max(scale, 1e-30)
    print(f"  {what}: max abs err {err:.3e} (max |ref| {scale:.3e}, rel {rel:.2e}, tol {tol:.0e})")
    if not rel <= tol:
        error(section, f"{what}: relative error {rel:.2e} above {tol:.0e}")


def interleaved(fns, device, rounds, warmup, reps=1):
    """Median ms per call of each fn, run round-robin with a rotating order (no variant always goes first)."""
    names, sync = list(fns), (torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    for k in names:
        for _ in range(warmup):  # compile / autotune kernels, warm the allocator
            fns[k]()
    ms = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                fns[k]()
                sync()
                ms[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in ms.items()}


def max_err(a, b):
    """(max |a - b|, max |b|) over two equally long lists of tensors (None gradients must match)."""
    if [x is None for x in a] != [y is None for y in b]:
        raise RuntimeError("one side has gradients the other lacks")
    a, b = [x for x in a if x is not None], [y for y in b if y is not None]
    return (
        max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b)),
        max(float(y.float().abs().max()) for y in b),
    )


# ------------------------------------------------------------------ a: Triton AttnRes kernels vs torch
def attnres_inputs(d, n, s, tokens, seq, device, dtype):
    g = torch.Generator().manual_seed(0)
    shape = (tokens // seq, seq, d)
    rnd = lambda scale: torch.randn(shape, generator=g) * scale
    blocks = [rnd(1.0 + j).to(device, dtype).requires_grad_() for j in range(n)]
    ys = [rnd(0.5).to(device, dtype) for _ in range(s)]
    ws = [rnd(1.0).to(device) for _ in range(s)]
    q = (torch.randn(s, d, generator=g) * 0.05).to(device).requires_grad_()
    return blocks, ys, ws, q


def attnres_fwd_bwd(impl, blocks, ys, ws, q, eps=1e-5):
    """One block's S depth reads (two-phase: one phase 1, S phase-2 merges with partial_{s+1} = partial_s + y_s),
    then the gradients of sum_s <h_s, w_s> w.r.t. the blocks and queries. Returns (outputs, gradients)."""
    stats = depth.phase1(blocks, q, eps, impl)
    partial, hs = None, []
    for s, y in enumerate(ys):
        hs.append(depth.phase2(stats[s], partial, q[s], eps, blocks[0].dtype, impl))
        partial = y if partial is None else partial + y
    loss = sum((h.float() * w).sum() for h, w in zip(hs, ws))
    return [h.detach() for h in hs], torch.autograd.grad(loss, blocks + [q])


def compare(section, base, run, new, ref, tols, device, rounds, reps=1):
    """Max abs error of ``run(new, case)`` against ``run(ref, case)`` (each returns (outputs, gradients)) for each
    case of ``tols`` (case -> relative tolerance), then both timed on case "bf16", interleaved."""
    for case, tol in tols.items():
        try:
            (o_a, g_a), (o_b, g_b) = run(new, case), run(ref, case)
            for what, (err, scale) in (("out", max_err(o_a, o_b)), ("grad", max_err(g_a, g_b))):
                within(section, f"{what} {case}", err, scale, tol)
                result(f"{base}_{new}_{what}_max_abs_err_{case}", err, "abs")
        except Exception as exc:  # one case failing must not hide the other, nor the timing
            error(section, f"accuracy {case}: {exc!r}")
    ms = interleaved({k: (lambda k=k: run(k, "bf16")) for k in (new, ref)}, device, rounds, 2, reps)
    for k in (new, ref):
        result(f"{base}_{k}_fwd_bwd", ms[k], "ms")
    result(f"{base}_{new}_speedup_vs_{ref}", ms[ref] / ms[new], "x")


def check_attnres_triton(device, d, n, s, tokens, seq, rounds):
    """impl=triton vs impl=torch; device-agnostic (on CPU with the kernels imported under TRITON_INTERPRET=1)."""
    print(f"  shape: N={n} blocks, S={s} queries, B*T={tokens}, d={d}")
    inputs = functools.lru_cache(None)(
        lambda case: attnres_inputs(
            d, n, s, tokens, seq, device, getattr(torch, dict(fp32="float32", bf16="bfloat16")[case])
        )
    )
    compare(
        "attnres_triton",
        "attnres",
        lambda impl, case: attnres_fwd_bwd(impl, *inputs(case)),
        "triton",
        "torch",
        {"fp32": 1e-3, "bf16": 1e-1},
        device,
        rounds,
        reps=3,
    )


def section_attnres_triton(args, device):
    import attnres_kernels

    if not attnres_kernels.triton_importable():
        raise RuntimeError("triton does not import (pip install -e '.[gpu]')")
    import attnres_kernels.attnres_ops  # noqa: F401  (compiles on first launch)

    if attnres_kernels.interpreted():
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1; unset it to time compiled kernels")
    tokens = 4096 if args.quick else 16384
    check_attnres_triton(device, 2304, 9, 6, tokens, min(tokens, 4096), 4 if args.quick else 8)


# ------------------------------------------------------------------ b: fla KDA vs torch KDA
def kda_fwd_bwd(layer, core, x, w, amp):
    """Output and gradients (input, then every parameter) of <layer(x, core), w>."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        y = layer(x, core=core)
    (y.float() * w).sum().backward()
    return [y.detach()], [x.grad] + [p.grad for p in layer.parameters()]


def check_kda(device, preset, batch, seq, rounds, new="fla", ref="chunk"):
    """KDA core ``new`` vs ``ref`` on one layer and input (fp32, and bf16 autocast as in training)."""
    cfg, d = ModelConfig(hidden_size=preset.hidden_size, kda=copy.deepcopy(preset.kda)), preset.hidden_size
    torch.manual_seed(0)
    layer, g = KimiDeltaAttention(cfg).to(device), torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq, d, generator=g).to(device).requires_grad_()
    w = torch.randn(batch, seq, d, generator=g).to(device)
    print(f"  KDA heads={layer.num_heads} head_dim={layer.head_k_dim} d={d} B={batch} T={seq}: {new} vs {ref}")
    compare(
        "kda_fla",
        "kda",
        lambda core, case: kda_fwd_bwd(layer, core, x, w, case == "bf16"),
        new,
        ref,
        {"fp32": 5e-2, "bf16": 1e-1},
        device,
        rounds,
    )


def section_kda_fla(args, device):
    from attnres_train.model.kda import _fla_chunk_kda

    _fla_chunk_kda()  # raises a RuntimeError naming what is missing
    check_kda(
        device, preset_cfg("f3", args), 2 if args.quick else 4, 2048 if args.quick else 4096, 4 if args.quick else 8
    )


# ------------------------------------------------------------------ c, d: training steps
def preset_cfg(name, args):
    cfg = as_model_config(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    if args.dry_run:  # the preset's layer pattern (layers, MLA positions, dense layers) at toy widths
        cfg.vocab_size, cfg.hidden_size = 256, 64
        cfg.kda.num_heads, cfg.kda.head_dim, cfg.kda.chunk_size = 2, 16, 16
        m, e = cfg.mla, cfg.moe
        m.num_heads, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 2, 32, 16, 8, 16
        e.num_experts, e.top_k, e.intermediate_size, e.dense_intermediate_size = 4, 2, 32, 128
    return cfg


def with_residual(cfg, mode):
    c = copy.deepcopy(cfg)
    c.residual.mode, c.residual.block_size = mode, None
    c.residual.num_blocks = min(8, c.num_layers) if mode == "block" else None
    return c


def trainee(cfg, device, base_state=None):
    """(model, optimizer) as the trainer has them: fp32 weights on ``device``, fused AdamW where available.
    AttnRes models load ``base_state`` (a PreNorm model's) and get non-zero pseudo-queries."""
    r = cfg.residual
    model = make(cfg, r.mode, base_state, num_blocks=r.num_blocks)[0].to(device).train()  # attnres_overhead's
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def train_step(model, opt, x, y):
    # bf16 autocast on CUDA (the trainer's precision=auto); fp32 on CPU, as the trainer there (--dry-run)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        loss, aux = model.loss(x, y)
    (loss if aux is None else loss + aux).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.update_router_biases()
    return loss.detach()


def batch_for(cfg, args, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def describe_paths(model, cfg, device):
    """Which KDA core and depth-mixing implementation the model runs on ``device`` (impl=auto resolves by device)."""
    kda = next((m for m in model.modules() if isinstance(m, KimiDeltaAttention)), None)
    core = kda.resolve_core(device) if kda is not None else "-"
    impl = (
        depth.resolve_impl(cfg.residual.impl, torch.empty(1, device=device)) if cfg.residual.mode != "prenorm" else "-"
    )
    return f"KDA core {core}, AttnRes impl {impl}"


def section_train(args, device, peak):
    for preset in ("f2", "f3"):
        t0 = time.perf_counter()
        try:
            cfg = with_residual(preset_cfg(preset, args), args.train_mode)
            model, opt = trainee(cfg, device)
            x, y = batch_for(cfg, args, device)
            torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
            step = lambda m=model, o=opt, x=x, y=y: train_step(m, o, x, y)
            ms = interleaved({preset: step}, device, args.steps, args.warmup)[preset]
            loss = float(train_step(model, opt, x, y))
            tokens = args.batch * args.seq
            mfu = train_flops_per_token(cfg, args.seq) * tokens / (ms / 1e3) / peak
            print(
                f"  {preset} {cfg.residual.mode}(N={cfg.residual.num_blocks}) d={cfg.hidden_size} "
                f"L={cfg.num_layers} B={args.batch} T={args.seq} [{describe_paths(model, cfg, device)}]: {ms:.1f} ms/step, "
                f"loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)"
            )
            if not torch.isfinite(torch.tensor(loss)):
                error(f"train_{preset}", f"non-finite loss {loss}")
            result(f"train_{preset}_step", ms, "ms")
            result(f"train_{preset}_tokens_per_s", tokens / (ms / 1e3), "tokens/s")
            result(f"train_{preset}_mfu", 100 * mfu, "%")
            if device.type == "cuda":
                result(f"train_{preset}_peak_mem", torch.cuda.max_memory_allocated(device) / 2**30, "GiB")
            del model, opt
        except Exception:
            error(f"train_{preset}", traceback.format_exc(limit=3).strip().replace("\n", " | "))


def section_block_vs_prenorm(args, device, preset="f2"):
    cfg = preset_cfg(preset, args)
    base, base_opt = trainee(with_residual(cfg, "prenorm"), device)
    blk_cfg = with_residual(cfg, "block")
    blk, blk_opt = trainee(blk_cfg, device, base.state_dict())
    x, y = batch_for(cfg, args, device)
    ms = interleaved(
        {"prenorm": lambda: train_step(base, base_opt, x, y), "block": lambda: train_step(blk, blk_opt, x, y)},
        device,
        args.rounds,
        args.warmup,
    )
    print(
        f"  {preset} B={args.batch} T={args.seq}: prenorm {ms['prenorm']:.1f} ms, block(N={blk_cfg.residual.num_blocks})"
        f" {ms['block']:.1f} ms per step"
    )
    result(f"block_over_prenorm_step_time_{preset}", ms["block"] / ms["prenorm"], "x")


# ------------------------------------------------------------------ driver
def environment(device):
    from importlib.metadata import distributions

    vers = {d.metadata["Name"].lower(): d.version for d in distributions()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}  torch {torch.__version__} (cuda {torch.version.cuda})  triton {vers.get('triton', '-')}  "
        f"fla-core {vers.get('fla-core', '-')}  python {sys.version.split()[0]}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer rounds (about half the time)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy widths: c and d only (a, b print SKIP)")
    ap.add_argument("--only", default="a,b,c,d", help="comma list of sections to run")
    ap.add_argument("--train-mode", default="block", choices=("block", "prenorm", "full"), help="section c's mode")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (0: from the device name)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: this check needs a GPU (use --dry-run for the CPU smoke test)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if args.dry_run:
        torch.set_num_threads(1)
    size = "dry" if args.dry_run else "quick" if args.quick else "full"  # batch, seq, warmup, steps, rounds:
    args.batch, args.seq, args.warmup, args.steps, args.rounds = dict(
        dry=(1, 32, 1, 2, 2), quick=(2, 2048, 2, 4, 4), full=(4, 4096, 3, 8, 8)
    )[size]
    environment(device)
    peak = peak_flops(device, args.peak_tflops * 1e12) or H200_BF16_PEAK
    print(f"MFU peak: {peak / 1e12:.1f} TFLOP/s ({'measured fp32 matmul' if not cuda else 'bf16 dense'})")
    sections = {
        "a": ("attnres_triton", section_attnres_triton, True),
        "b": ("kda_fla", section_kda_fla, True),
        "c": ("train", lambda a, d: section_train(a, d, peak), False),
        "d": ("block_vs_prenorm", section_block_vs_prenorm, False),
    }
    for key in [k for k in args.only.split(",") if k]:
        name, fn, needs_cuda = sections[key]
        print(f"== {key} {name}", flush=True)
        if needs_cuda and not cuda:
            print(f"SKIP {name} (no CUDA)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            fn(args, device)
        except Exception:
            error(name, traceback.format_exc(limit=4).strip().replace("\n", " | "))
        print(f"   {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"gpu_check: {'FAILED ' + ','.join(sorted(set(FAILED))) if FAILED else 'all sections passed'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
