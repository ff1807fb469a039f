"""Training-step time of Block AttnRes (N=8) and Full AttnRes relative to the PreNorm baseline, on CPU.

Why interleaved: these machines are noisy, so the three variants run round-robin (one step each per round)
and we report the ratio of medians measured side by side in the same process. Same weights (AttnRes models
load the baseline's state dict; pseudo-queries are set non-zero so no shortcut applies), same batch.

Usage: python bench/attnres_overhead.py [--preset f2] [--vocab 4096] [--batch 2] [--seq 256] [--rounds 8]
       [--optimizer none|adamw]
Ends with one ``RESULT`` line per headline figure.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from attnres_train.config.model import as_model_config
from attnres_train.model import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def make(cfg, mode, base_state=None, num_blocks=None):
    c = copy.deepcopy(cfg)
    c.residual.mode, c.residual.num_blocks = mode, num_blocks
    torch.manual_seed(0)
    m = build_model(c)
    if base_state is not None:
        m.load_state_dict(base_state, strict=False)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("_res_proj.weight"):
                    p.normal_(0, 0.05)
    return m


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(model, opt, ids, labels):
    _sync(ids.device)
    t0 = time.perf_counter()
    loss, aux = model.loss(ids, labels)
    if aux is not None:
        loss = loss + aux
    loss.backward()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    _sync(ids.device)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="f2")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    # The optimizer step costs the same for every variant (AttnRes adds 2d(2L+1) parameters) and, for a
    # 64-expert MoE on CPU, dwarfs the model's own time; "none" times forward + backward only.
    ap.add_argument("--optimizer", choices=("none", "adamw"), default="none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = as_model_config(OmegaConf.load(CONFIGS / f"{args.preset}.yaml"))
    cfg.vocab_size = args.vocab
    base = make(cfg, "prenorm")
    variants = {
        "prenorm": base,
        "block8": make(cfg, "block", base.state_dict(), num_blocks=min(8, cfg.num_layers)),
        "full": make(cfg, "full", base.state_dict()),
    }
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for m in variants.values():
        m.to(device=device, dtype=dtype)
    opts = {k: (torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True) if args.optimizer == "adamw" else None)
            for k, m in variants.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    times = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        for k, m in variants.items():
            t = step_time(m, opts[k], x, y)
            if r >= args.warmup:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preset={args.preset} d={cfg.hidden_size} layers={cfg.num_layers} vocab={args.vocab} "
          f"batch={args.batch} seq={args.seq} threads={torch.get_num_threads()} rounds={args.rounds} "
          f"optimizer={args.optimizer} device={device} dtype={args.dtype} torch={torch.__version__}")
    for k, v in med.items():
        print(f"  {k:8s} median step {v * 1e3:8.1f} ms  (min {min(times[k]) * 1e3:.1f} ms)")
    # Medians are the headline; the min ratio is printed too because CPU noise here is additive (other
    # processes), so the fastest of several interleaved steps is the least disturbed measurement.
    mins = {k: min(v) for k, v in times.items()}
    print(f"  min-based ratios: block8 {mins['block8'] / mins['prenorm']:.3f} x, full {mins['full'] / mins['prenorm']:.3f} x")
    print(f"RESULT block_over_prenorm_step_time {med['block8'] / med['prenorm']:.3f} x")
    print(f"RESULT full_over_prenorm_step_time {med['full'] / med['prenorm']:.3f} x")


if __name__ == "__main__":
    main()
