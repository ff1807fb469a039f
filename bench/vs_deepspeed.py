"""Our FSDP2 (dp=2, gloo) against DeepSpeed ZeRO-2 and ZeRO-3 (dp=2, CPU): same model, data and optimizer.

Why: users name DeepSpeed as a dependency; this shows, on one box, step time, per-rank peak memory and loss
agreement of our torch-native engine against it for one model. The launcher writes the initial weights and
the token batches once; every engine run is two fresh rank processes (this script with ``--worker``) that
load them. Engines alternate within each round (the order rotates per round). docs/performance.md,
"DeepSpeed side by side", has the method, numbers and decision.

Usage: python bench/vs_deepspeed.py [--preset tiny] [--steps 10] [--rounds 3] [--engines ours,zero2,zero3]
Needs ``deepspeed`` (the ``bench-deepspeed`` extra) for zero2/zero3; without it: one SKIP line, exit 0.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from attnres_train.config.model import as_model_config
from attnres_train.config.train import OptimConfig
from attnres_train.model import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
ENGINES = ("ours", "zero2", "zero3")
DTYPES = {"float32": torch.float32, "float64": torch.float64}  # float64: exact checks of the setup (tests)
WORLD = 2


# ------------------------------------------------------------------------------------ the shared setup
def model_config(args):
    cfg = as_model_config(OmegaConf.load(CONFIGS / f"{args.preset}.yaml"))
    if args.vocab:
        cfg.vocab_size = args.vocab
    return cfg


def optim_config(args) -> OptimConfig:
    """The one optimizer setting every engine gets: AdamW, constant lr, no warmup, global-norm clipping."""
    return OptimConfig(
        name="adamw",
        lr=args.lr,
        betas=[0.9, 0.95],
        eps=1e-8,
        weight_decay=args.weight_decay,
        grad_clip=1.0,
        schedule="constant",
        warmup_steps=0,
    )


def make_batches(vocab: int, steps: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """``[steps, batch, seq+1]`` token ids drawn from a Zipf-like unigram law (seeded): the loss falls within a
    few steps, so the loss curves compare more than the initial value."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = probs[torch.randperm(vocab, generator=g)]
    flat = torch.multinomial(probs, steps * batch * (seq + 1), replacement=True, generator=g)
    return flat.view(steps, batch, seq + 1)


# ------------------------------------------------------------------------------------------- memory
def _status_kb(field: str):
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak_rss():
    """Freed heap back to the OS, the high-water mark reset to the current RSS; returns that RSS (KiB) or None."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


# ------------------------------------------------------------------------------------------- engines
def setup_ours(model, cfg, optim_cfg, local_batch: int):
    """Our training path: ParallelContext dp_shard=2 -> TrainModule (FSDP2 via parallelize_model, our AdamW
    groups, clipping, router-bias update): what ``attnres-train parallel.dp_shard=2`` builds."""
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.schema import Config
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.train.train_module import build_train_module

    root = Config()
    root.model, root.optim = cfg, optim_cfg
    root.parallel = ParallelConfig(dp_shard=WORLD)
    root.trainer = TrainerConfig(
        micro_batch_size=local_batch, global_batch_size=local_batch * WORLD, precision="fp32", device="cpu"
    )
    pctx = build_parallel_context(root.parallel, cfg, seq_len=None, world_size=WORLD)
    module = build_train_module(model, root, pctx, max_steps=10**6)

    def step(batch_bt1, i):
        out = module.train_batch(batch_bt1, i)
        return out["loss"], out["grad_norm"]

    return step


class _LossModule(torch.nn.Module):
    """What DeepSpeed wraps: forward = our model's training loss (+ MoE aux loss, as our step engine adds)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_bt, y_bt):
        loss, aux = self.model.loss(x_bt, y_bt)
        return (loss if aux is None else loss + aux), loss.detach()


def setup_deepspeed(model, cfg, optim_cfg, local_batch: int, stage: int):
    """DeepSpeed ZeRO-``stage`` around the same model, with our AdamW (same groups, torch's fused AdamW) as
    the client optimizer; clipping by DeepSpeed's ``gradient_clipping``; router biases updated as ours does."""
    import deepspeed

    from attnres_train.train.optim import build_optimizers

    (opt,) = build_optimizers(model, optim_cfg)
    if stage == 3 and cfg.lm_loss_chunk_tokens:  # the fused head reads lm_head.weight outside lm_head.forward
        deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
    ds_config = {
        "train_batch_size": local_batch * WORLD,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim_cfg.grad_clip,
        "zero_optimization": {"stage": stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=_LossModule(model), optimizer=opt, config=ds_config)

    def step(batch_bt1, i):
        x, y = batch_bt1[:, :-1], batch_bt1[:, 1:]
        total, loss = engine(x, y)
        engine.backward(total)
        engine.step()
        with torch.no_grad():  # global expert loads, then the aux-loss-free bias step (TrainModule does the same)
            moes = model.moe_layers()
            if moes:
                counts = torch.stack([m.tokens_per_expert for m in moes])
                dist.all_reduce(counts)
                for m, c in zip(moes, counts):
                    m.tokens_per_expert.copy_(c)
                model.update_router_biases()
        loss = loss.clone()
        dist.all_reduce(loss)
        norm = engine.get_global_grad_norm()
        return float(loss) / WORLD, float(norm) if norm is not None else float("nan")

    return step


def worker(args) -> None:
    """One rank of one engine run: load the shared weights and batches, train ``--steps`` steps, write JSON."""
    from attnres_train.train.host_memory import keep_freed_host_memory

    rank = int(os.environ["RANK"])
    torch.set_num_threads(args.threads)
    keep_freed_host_memory()  # as the trainer does on CPU; the same for every engine
    if args.worker == "ours":
        dist.init_process_group("gloo")
    else:  # DeepSpeed's import and comm backend (it loads a shm all-reduce op there) come before the baseline
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    base_kb = reset_peak_rss()
    work = Path(args.workdir)
    cfg = model_config(args)
    model = build_model(cfg, seed=1, dtype=DTYPES[args.dtype])  # overwritten below: the same weights everywhere
    model.load_state_dict(torch.load(work / "init.pt", weights_only=True))
    batches = torch.load(work / "batches.pt", weights_only=True)
    b = batches.shape[1] // WORLD
    if args.worker == "ours":
        step = setup_ours(model, cfg, optim_config(args), b)
    else:
        step = setup_deepspeed(model, cfg, optim_config(args), b, stage=int(args.worker[-1]))
    setup_kb = _status_kb("VmHWM")  # construction (a full model on every rank, for both) and wrapping
    reset_peak_rss()  # the steps' peak from here: what is live after setup plus each step's transients
    out = {"wall": [], "cpu": [], "loss": [], "grad_norm": []}
    for i in range(batches.shape[0]):
        mine = batches[i, rank * b : (rank + 1) * b]
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss, norm = step(mine, i)
        out["wall"].append(time.perf_counter() - t0)
        out["cpu"].append(time.process_time() - c0)
        out["loss"].append(loss)
        out["grad_norm"].append(norm)
    steps_kb = _status_kb("VmHWM")
    known = base_kb is not None and steps_kb is not None
    out["peak_steps_mib"] = (steps_kb - base_kb) / 1024 if known else None
    out["peak_setup_mib"] = (setup_kb - base_kb) / 1024 if known else None
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (work / f"{args.worker}-r{args.round}-rank{rank}.json").write_text(json.dumps(out))
    # Every rank past its last collective before any closes its sockets: a gloo peer that is still in one when
    # the other tears down can abort (CI once saw rank 1 end with SIGABRT after rank 0 had exited 0).
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(engine: str, rnd: int, args, passthrough) -> list:
    """Two fresh rank processes for one engine run; returns both ranks' result dicts."""
    env = dict(os.environ, WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu", DS_BUILD_OPS="0")
    cmd = [sys.executable, __file__, *passthrough, "--worker", engine, "--round", str(rnd)]
    procs = []
    for r in range(WORLD):
        log = open(Path(args.workdir) / f"{engine}-r{rnd}-rank{r}.log", "w")
        procs.append(
            (subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=log, stderr=log), log)
        )
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=args.timeout))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            codes.append("timeout")
        log.close()
    if any(c != 0 for c in codes):  # each failed rank's own log (a rank that exited 0 says nothing useful)
        tails = [
            f"rank {r} log tail:\n" + (Path(args.workdir) / f"{engine}-r{rnd}-rank{r}.log").read_text()[-3000:]
            for r, c in enumerate(codes)
            if c != 0
        ]
        raise SystemExit(f"{engine} round {rnd} failed (exit {codes}); " + "\n".join(tails))
    return [json.loads((Path(args.workdir) / f"{engine}-r{rnd}-rank{r}.json").read_text()) for r in range(WORLD)]


def summarize(results: dict, args) -> dict:
    """Per engine: per-round median step time (max over ranks per step, warmup steps dropped), peak memory."""
    s = {}
    for eng, rounds in results.items():
        step_ms, cpu_ms, peak, setup, maxrss = [], [], [], [], []
        for ranks in rounds:
            wall = [max(r["wall"][i] for r in ranks) for i in range(args.warmup, args.steps)]
            cpu = [max(r["cpu"][i] for r in ranks) for i in range(args.warmup, args.steps)]
            step_ms.append(1e3 * statistics.median(wall))
            cpu_ms.append(1e3 * statistics.median(cpu))
            peak.append(max(r["peak_steps_mib"] or 0.0 for r in ranks))
            setup.append(max(r["peak_setup_mib"] or 0.0 for r in ranks))
            maxrss.append(max(r["maxrss_mib"] for r in ranks))
        s[eng] = {
            "step_ms": step_ms,
            "cpu_ms": cpu_ms,
            "peak_steps_mib": peak,
            "peak_setup_mib": setup,
            "maxrss_mib": maxrss,
            "loss": rounds[0][0]["loss"],
            "grad_norm": rounds[0][0]["grad_norm"],
            "loss_spread_over_rounds": max(
                abs(a - b) for ranks in rounds for a, b in zip(ranks[0]["loss"], rounds[0][0]["loss"])
            ),
        }
    return s


def _spread(v):
    return f"median {statistics.median(v):8.1f}  (min {min(v):.1f}, max {max(v):.1f})"


def report(s: dict, args, cfg, n_params: int) -> None:
    print(
        f"preset={args.preset} d={cfg.hidden_size} layers={cfg.num_layers} experts={cfg.moe.num_experts} "
        f"vocab={cfg.vocab_size} params={n_params / 1e6:.2f}M | global batch {args.batch} x seq {args.seq}, dp={WORLD} "
        f"gloo, {args.threads} thread(s)/rank, {args.dtype}, {args.steps} steps ({args.warmup} warmup), {args.rounds} rounds"
    )
    print(f"torch {torch.__version__}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for eng, v in s.items():
        print(f"  {eng:5s} step ms   {_spread(v['step_ms'])}   cpu ms {statistics.median(v['cpu_ms']):.1f}")
        print(f"  {eng:5s} steps peak MiB {_spread(v['peak_steps_mib'])}   setup peak {max(v['peak_setup_mib']):.1f}")
        print(f"  {eng:5s} process maxrss MiB {_spread(v['maxrss_mib'])}")
        print(f"  {eng:5s} loss max |round k - round 0| {v['loss_spread_over_rounds']:.2e} (same inputs every round)")
    print("  step  " + "  ".join(f"{e:>10s} loss" for e in s) + "  " + "  ".join(f"{e:>6s} norm" for e in s))
    for i in range(args.steps):
        print(
            f"  {i:4d}  "
            + "  ".join(f"{v['loss'][i]:15.6f}" for v in s.values())
            + "  "
            + "  ".join(f"{v['grad_norm'][i]:11.4f}" for v in s.values())
        )
    for eng, v in s.items():
        print(f"RESULT {eng}_step_time {statistics.median(v['step_ms']):.1f} ms")
        print(f"RESULT {eng}_step_cpu_time {statistics.median(v['cpu_ms']):.1f} ms")
        print(f"RESULT {eng}_peak_rss_steps_per_rank {statistics.median(v['peak_steps_mib']):.1f} MiB")
        print(f"RESULT {eng}_peak_rss_setup_per_rank {statistics.median(v['peak_setup_mib']):.1f} MiB")
        print(f"RESULT {eng}_maxrss_per_rank {statistics.median(v['maxrss_mib']):.1f} MiB")
    if "ours" in s:
        for eng in s:
            if eng == "ours":
                continue
            ratios = [o / u for o, u in zip(s[eng]["step_ms"], s["ours"]["step_ms"])]
            diff = max(abs(a - b) for a, b in zip(s[eng]["loss"], s["ours"]["loss"]))
            cpu = [o / u for o, u in zip(s[eng]["cpu_ms"], s["ours"]["cpu_ms"])]
            print(f"RESULT {eng}_over_ours_step_time {statistics.median(ratios):.2f} x")
            print(f"RESULT {eng}_over_ours_step_cpu_time {statistics.median(cpu):.2f} x")
            print(f"RESULT {eng}_vs_ours_loss_max_abs_diff {diff:.2e}")
        print(f"RESULT ours_loss_last_step {s['ours']['loss'][-1]:.6f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=0, help="override the preset's vocab size (0: keep)")
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows); each rank gets batch/2")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed (optimizer state allocation)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="float64: --engines ours only")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine run")
    ap.add_argument("--workdir", default=None, help="keep inputs, logs and per-rank JSON here (default: temp)")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if bad := [e for e in engines if e not in ENGINES]:
        ap.error(f"--engines: unknown {bad}; choose from {', '.join(ENGINES)}")
    if args.dtype != "float32" and engines != ["ours"]:
        ap.error("--dtype float64 is for checking our half's setup exactly: use it with --engines ours")
    if any(e != "ours" for e in engines) and importlib.util.find_spec("deepspeed") is None:
        print("SKIP vs_deepspeed: deepspeed is not installed (pip install '.[bench-deepspeed]', docs/performance.md)")
        return 0
    if args.batch % WORLD or args.steps <= args.warmup:
        ap.error(f"--batch must be a multiple of {WORLD} and --steps > --warmup")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vs_deepspeed-")
        args.workdir = tmp.name
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args)
    model = build_model(cfg, seed=0)
    torch.save(model.state_dict(), work / "init.pt")
    torch.save(make_batches(cfg.vocab_size, args.steps, args.batch, args.seq), work / "batches.pt")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    keep = ("preset", "vocab", "batch", "seq", "lr", "weight_decay", "threads", "dtype", "workdir")
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keep]
    results = {e: [] for e in engines}
    for rnd in range(args.rounds):
        order = engines[rnd % len(engines) :] + engines[: rnd % len(engines)]  # rotate: no engine always first
        for eng in order:
            results[eng].append(run_engine(eng, rnd, args, [*passthrough, f"--steps={args.steps}"]))
    s = summarize(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1))
    report(s, args, cfg, n_params)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
