"""torch.profiler table of one CPU training step (forward, backward, fused AdamW, router-bias update).

Why: issue 17 asks what in a step is not GEMM-bound. One thread, so self CPU time per op is the op's cost
(no time-sharing between threads of our own). Prints the top ops by self CPU time, the time per phase
(``record_function`` ranges) and ``RESULT`` lines with the GEMM share of self CPU time (GEMM ops: ``GEMM_OPS``;
SDPA and the rest are counted separately). Results and reading: bench/results/profile_*_2026-12-02.md,
docs/performance.md "Where the time goes".

Usage: OMP_NUM_THREADS=1 python bench/profile_step.py [--preset f1] [--mode block] [--num-blocks 8]
       [--batch 1] [--seq 512] [--vocab 0] [--rows 25] [--warmup 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile, record_function

from attnres_train.config.model import as_model_config
from attnres_train.model import build_model
from attnres_train.train.host_memory import keep_freed_host_memory

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
# matrix products (BLAS/oneDNN calls); everything else is elementwise, reductions, copies, indexing, framework
GEMM_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::bmm",
    "aten::baddbmm",
    "aten::addbmm",
    "aten::_grouped_mm",
    "aten::mv",
    "aten::addmv",
    "aten::addmv_",
}
ATTENTION_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
}
PHASES = ("step.forward", "step.backward", "step.optimizer")


def build(args):
    cfg = as_model_config(OmegaConf.load(CONFIGS / f"{args.preset}.yaml"))
    if args.vocab:
        cfg.vocab_size = args.vocab
    cfg.residual.mode, cfg.residual.block_size = args.mode, None
    cfg.residual.num_blocks = min(args.num_blocks, cfg.num_layers) if args.mode == "block" else None
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.no_grad():  # pseudo-queries start at zero; non-zero so no shortcut applies (as the other benches)
        for n, p in model.named_parameters():
            if n.endswith("_res_proj.weight"):
                p.normal_(0, 0.05)
    return model, cfg


def train_step(model, opt, x, y):
    with record_function("step.forward"):
        loss, aux = model.loss(x, y)
        if aux is not None:
            loss = loss + aux
    with record_function("step.backward"):
        loss.backward()
    with record_function("step.optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="f1")
    ap.add_argument("--mode", choices=("prenorm", "block", "full"), default="block")
    ap.add_argument("--num-blocks", type=int, default=8, help="block mode: N (capped at the layer count)")
    ap.add_argument("--vocab", type=int, default=0, help="override the preset's vocab size (0: keep)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timed", type=int, default=3, help="unprofiled steps timed (CPU time) after the profile")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_host_memory()  # as the trainer does on CPU
    model, cfg = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    for _ in range(args.warmup):
        train_step(model, opt, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c0 = time.process_time()
        train_step(model, opt, x, y)
        prof_cpu = time.process_time() - c0
    plain = []
    for _ in range(args.timed):
        c0 = time.process_time()
        train_step(model, opt, x, y)
        plain.append(time.process_time() - c0)

    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    ops = [e for e in events if e.key.startswith("aten::") or e.key.startswith("mkldnn")]
    self_total = sum(e.self_cpu_time_total for e in events if e.key not in PHASES)
    gemm = sum(e.self_cpu_time_total for e in ops if e.key in GEMM_OPS)
    attn = sum(e.self_cpu_time_total for e in ops if e.key in ATTENTION_OPS)
    res = cfg.residual
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# preset={args.preset} d={cfg.hidden_size} layers={cfg.num_layers} vocab={cfg.vocab_size} "
        f"residual={res.mode} num_blocks={res.num_blocks} params={n_params / 1e6:.1f}M batch={args.batch} "
        f"seq={args.seq} threads=1 fused AdamW torch={torch.__version__}"
    )
    print(
        f"# profiled step: {prof_cpu * 1e3:.0f} ms CPU (profiler on); unprofiled steps: "
        + ", ".join(f"{c * 1e3:.0f}" for c in plain)
        + " ms CPU"
    )
    print(
        "# phases (CPU time incl. children): " + ", ".join(f"{k[5:]} {phases.get(k, 0) / 1e3:.0f} ms" for k in PHASES)
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(
        f"RESULT gemm_share_self_cpu {100 * gemm / self_total:.1f} %  ({gemm / 1e3:.0f} of {self_total / 1e3:.0f} ms)"
    )
    print(f"RESULT sdpa_share_self_cpu {100 * attn / self_total:.1f} %")
    print(f"RESULT non_gemm_self_cpu {(self_total - gemm - attn) / 1e3:.0f} ms")
    print(f"RESULT step_cpu_unprofiled {statistics.median(plain) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
