"""Bytes per rank at scale: construction peak, pipeline held buffers vs M, and one 48B rank against the plan.

Why: whether a 1,024-GPU run starts is decided by what each rank allocates, so these are the headline numbers of
the scale-ready work (docs/pipeline.md "Memory", docs/launch.md "Dry run of one rank"). Three parts, each in
fresh processes (one thread each) so that peak RSS means one thing:

1. construction: peak RSS of building + one training step of preset ``f1`` (~120M params, fp32, AdamW) in one
   process vs on each rank of ``parallel.pp=4`` (torchrun, gloo);
2. pipeline: bytes the runtime holds at the end of a step and at its peak (``held_tensor_stats``) for
   M = 4, 16, 32 at P=2, V=2 (must not grow with M);
3. ``attnres-plan --simulate-rank 768`` of the 48B preset on 1,024 ranks: measured parameter / gradient /
   optimizer bytes over the plan's, and the largest tensor the rank materialised (skip with ``--skip-48b``;
   needs ~13 GiB of RAM and ~2 minutes).

Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _worker_construct(pp: int, preset: str) -> dict:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from attnres_train.config.model import as_model_config
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.schema import Config
    from attnres_train.model import build_model
    from attnres_train.parallel.init import local_bytes
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.train.train_module import build_train_module

    torch.set_num_threads(1)
    if pp > 1:
        dist.init_process_group("gloo")
    cfg = Config(model=as_model_config(OmegaConf.load(ROOT / "configs" / "model" / f"{preset}.yaml")))
    cfg.data.seq_len, cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = 16, 1, 4
    cfg.trainer.precision, cfg.pipeline.schedule = "fp32", "1f1b"
    cfg.parallel = ParallelConfig(pp=pp, dp_shard=1)
    pctx = build_parallel_context(cfg.parallel, cfg.model, 16, pp)
    module = build_train_module(build_model(cfg.model, device="meta"), cfg, pctx, max_steps=2)
    batch = torch.randint(0, cfg.model.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
    module.train_batch(batch, step=0)
    out = {
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "params": local_bytes(module.model, include_buffers=False),
    }
    if pp > 1:
        dist.destroy_process_group()
    return out


def _worker_pipeline(M: int) -> dict:
    import torch
    import torch.distributed as dist

    from attnres_train.config.model import KDAConfig, MLAConfig, ModelConfig, MoEConfig
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.schema import Config
    from attnres_train.model import build_model
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.train.train_module import build_train_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    T = 64
    cfg = Config(model=ModelConfig(vocab_size=256, hidden_size=128, num_layers=8, mla_layers=[3, 7]))
    cfg.model.kda = KDAConfig(num_heads=2, head_dim=32, chunk_size=16)
    cfg.model.mla = MLAConfig(num_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    cfg.model.moe = MoEConfig(
        num_experts=4, top_k=2, intermediate_size=64, first_k_dense=1, dense_intermediate_size=256
    )
    cfg.model.residual.mode, cfg.model.residual.block_size = "block", 2
    cfg.data.seq_len, cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = T, 1, M
    cfg.trainer.precision = "fp32"
    cfg.parallel = ParallelConfig(pp=2, vpp=2, dp_shard=1)
    pctx = build_parallel_context(cfg.parallel, cfg.model, T, 2)
    module = build_train_module(build_model(cfg.model, device="meta"), cfg, pctx, max_steps=2)
    runtime = module.engine.pipe.runtime
    runtime.track_held = True
    batch = torch.randint(0, 256, (M, T + 1), generator=torch.Generator().manual_seed(M))
    module.forward_backward(batch)
    out = {
        "rank": dist.get_rank(),
        "end": runtime.held_at_end["total"]["bytes"],
        "peak": runtime.held_peak["total"]["bytes"],
        "depth": runtime.inflight_depth(M),
    }
    dist.destroy_process_group()
    return out


def _launch(nproc: int, args: list) -> list:
    """Run a worker on ``nproc`` ranks; each writes its JSON to its own file (stdout lines would interleave)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = (
            [sys.executable]
            + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [])
            + [str(Path(__file__)), *args, "--out", out]
        )
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1800, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=("construct", "pipeline"), help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--M", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="f1", help="model preset for the construction part (default f1)")
    p.add_argument("--skip-48b", action="store_true", help="skip the simulated 48B rank (~13 GiB, ~2 min)")
    args = p.parse_args()
    if args.worker:
        res = _worker_construct(args.pp, args.preset) if args.worker == "construct" else _worker_pipeline(args.M)
        (Path(args.out) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(res))
        return

    results = []
    single = _launch(1, ["--worker", "construct", "--pp", "1", "--preset", args.preset])[0]
    ranks = _launch(4, ["--worker", "construct", "--pp", "4", "--preset", args.preset])
    worst = max(r["rss"] for r in ranks)
    print(
        f"construction ({args.preset}): single process peak RSS {single['rss'] / 2**20:.0f} MiB "
        f"({single['params'] / 2**20:.0f} MiB params); pp=4 ranks {[round(r['rss'] / 2**20) for r in ranks]} MiB "
        f"({[round(r['params'] / 2**20) for r in ranks]} MiB params)"
    )
    results += [
        ("construction_peak_rss_single", single["rss"] / 2**20, "MiB"),
        ("construction_peak_rss_pp4_worst_rank", worst / 2**20, "MiB"),
        ("construction_pp4_over_single", worst / single["rss"], "x"),
    ]

    for M in (4, 16, 32):
        rows = _launch(2, ["--worker", "pipeline", "--M", str(M)])
        print(
            f"pipeline P=2 V=2 M={M}: "
            + "; ".join(
                f"rank {r['rank']} held at end {r['end']} B, peak {r['peak']} B (depth {r['depth']})" for r in rows
            )
        )
        results += [
            (f"pipeline_held_end_bytes_M{M}", max(r["end"] for r in rows), "B"),
            (f"pipeline_held_peak_bytes_M{M}", max(r["peak"] for r in rows), "B"),
        ]

    if not args.skip_48b:
        cmd = [
            sys.executable,
            "-m",
            "attnres_train.cli.plan",
            "--model",
            "kimi_linear_48b",
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
            "--world-size",
            "1024",
            "--microbatches",
            "8",
            "--simulate-rank",
            "768",
        ]
        out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1800, cwd=ROOT)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        text = out.stdout[out.stdout.index("simulated rank") :]
        print(text)
        for key in ("parameters", "gradients", "optimizer"):
            got, plan, ratio = re.search(rf"^{key}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", text, re.M).groups()
            results += [(f"sim48b_{key}_GiB", float(got), "GiB"), (f"sim48b_{key}_over_plan", float(ratio), "x")]
        largest = re.search(r"materialised: ([\d.]+) GiB", text).group(1)
        results.append(("sim48b_largest_tensor", float(largest), "GiB"))
        results.append(("sim48b_seconds", float(re.search(r"CPU\), (\d+) s", text).group(1)), "s"))

    for name, value, unit in results:
        print(f"RESULT {name} {value:.4g} {unit}")


if __name__ == "__main__":
    main()
