"""``attnres-plan``: a parallel plan without GPUs: mesh, pipeline layout, per-rank memory and traffic.

    attnres-plan --model kimi_linear_48b --world-size 1024 --pp 4 --tp 2 --sp --ep 16 --dp-replicate 8

Nothing is run and no process group is created: everything printed is a pure function of the config. With
``--pp`` > 1 the schedule is lowered and checked by the same simulator the runtime uses, so a plan that prints is
a plan that runs. Options: ``attnres-plan --help``; the figures and what they assume: docs/launch.md, "Planning a layout". Errors
print one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from ..config.errors import ConfigError, UserInputError
from ..config.model import as_model_config, validate_model_config
from ..config.parallel import ParallelConfig, resolve_parallel_dims
from ..config.paths import MODEL_PRESET_DIR
from ..config.schema import Config
from ..parallel.pipeline.layout import PipelineLayout
from ..parallel.pipeline.schedules import ScheduleError, check, lower, make_schedule, schedule_placement
from ..parallel.pipeline.send_plan import held_bytes_bound
from ..parallel.pipeline.timing import ideal_bubble, timeline
from ..parallel.plan_estimates import TrainShape, estimate_comm, estimate_ranks, summary
from .arg_parser import ErrorLineParser

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def build_parser() -> argparse.ArgumentParser:
    p = ErrorLineParser(
        prog="attnres-plan", description="Print the mesh, pipeline layout, per-rank memory and traffic."
    )
    p.add_argument("--model", default="tiny", help="model preset in configs/model/ or a YAML path (default tiny)")
    p.add_argument("--num-layers", type=int, default=None, help="override model.num_layers")
    p.add_argument("--hidden-size", type=int, default=None, help="override model.hidden_size")
    p.add_argument("--mode", choices=("prenorm", "full", "block"), default=None, help="override residual mode")
    p.add_argument("--block-size", type=int, default=None, help="block mode: decoder layers per block")
    p.add_argument("--num-blocks", type=int, default=None, help="block mode: number of blocks")
    p.add_argument("--pp", type=int, default=1, help="pipeline ranks P (default 1)")
    p.add_argument("--world-size", type=int, default=None, help="ranks in the job (default: product of the degrees)")
    p.add_argument("--dp-replicate", type=int, default=1, help="parallel.dp_replicate (default 1)")
    p.add_argument("--dp-shard", type=int, default=-1, help="parallel.dp_shard (default -1: the rest of the world)")
    p.add_argument("--tp", type=int, default=1, help="parallel.tp (default 1)")
    p.add_argument("--sp", action="store_true", help="parallel.sp: sequence parallelism over tp")
    p.add_argument("--ep", type=int, default=1, help="parallel.ep, folded into the data-parallel ranks (default 1)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw", help="optimizer state (default adamw)")
    p.add_argument("--activation-checkpointing", action="store_true", help="per-layer activation checkpointing")
    p.add_argument("--vpp", type=int, default=1, help="model chunks per rank V (default 1)")
    p.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help="microbatches per step per dp rank M (gradient accumulation; default 2*pp, 1 without pp)",
    )
    p.add_argument(
        "--schedule", default="interleaved_1f1b", help="gpipe | 1f1b | interleaved_1f1b | zb_h1 | zb_v | dualpipev"
    )
    p.add_argument("--group-size", type=int, default=None, help="Megatron microbatch group size G (default pp)")
    p.add_argument("--layers-per-stage", default=None, help="comma-separated decoder layers per stage")
    p.add_argument("--embed-cost", type=float, default=0.0, help="automatic split: embedding cost in layers")
    p.add_argument("--head-cost", type=float, default=0.0, help="automatic split: head+loss cost in layers")
    p.add_argument("--no-cache", action="store_true", help="naive hops (resend every accumulated block)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="B, for byte counts (default 1)")
    p.add_argument("--seq-len", type=int, default=4096, help="T, for byte counts (default 4096)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16", help="message dtype for byte counts")
    p.add_argument("--split-backward", action="store_true", help="I/W split (W at the end, or --w-delay)")
    p.add_argument("--w-delay", type=int, default=None, help="with --split-backward: W this many slots after I")
    p.add_argument("--comms", action="store_true", help="print the lowered action lists (SEND/RECV included)")
    p.add_argument("--csv", action="store_true", help="print the lowered schedule as CSV (torch's layout) only")
    p.add_argument(
        "--simulate-rank",
        type=int,
        default=None,
        metavar="R",
        help="also build rank R of this layout for real in this process (fake process group, CPU): "
        "materialise its shards and optimizer state and print the bytes next to the estimates",
    )
    p.add_argument("--seed", type=int, default=0, help="with --simulate-rank: the initialisation seed")
    return p


def load_model_config(name: str, args):
    path = Path(name)
    if not path.suffix:
        path = MODEL_PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserInputError(f"model config {name!r} not found (looked for {path})")
    cfg = as_model_config(OmegaConf.load(path))
    if args.num_layers is not None:
        cfg.num_layers = args.num_layers
        cfg.mla_layers = [i for i in cfg.mla_layers if i < args.num_layers]
        cfg.moe.first_k_dense = min(cfg.moe.first_k_dense, args.num_layers)
    if args.hidden_size is not None:
        cfg.hidden_size = args.hidden_size
    if args.mode is not None:
        cfg.residual.mode = args.mode
    if args.block_size is not None or args.num_blocks is not None:
        cfg.residual.block_size, cfg.residual.num_blocks = args.block_size, args.num_blocks
    return validate_model_config(cfg)


def render(args) -> str:
    cfg = load_model_config(args.model, args)
    pc = ParallelConfig(
        dp_replicate=args.dp_replicate,
        dp_shard=args.dp_shard,
        tp=args.tp,
        sp=args.sp,
        pp=args.pp,
        vpp=args.vpp,
        ep=args.ep,
    )
    world = args.world_size
    if world is None:
        world = args.pp * args.dp_replicate * args.tp * max(args.dp_shard, 1)
    dims = resolve_parallel_dims(pc, world, model_cfg=cfg, seq_len=args.seq_len)
    M = args.microbatches or (2 * args.pp if args.pp > 1 else 1)
    layout = sched = None
    out = []
    if args.pp > 1:
        text, layout, sched = render_pipeline(args, cfg, M)
        if args.csv:
            return text
        out += [text, ""]
    out.append(render_estimates(cfg, dims, args, M, layout, sched))
    if args.simulate_rank is not None:
        out += ["", render_simulated_rank(args, cfg, pc, dims, M, layout, sched)]
    return "\n".join(out)


def render_simulated_rank(args, cfg, pc, dims, M, layout, sched) -> str:
    """``--simulate-rank R``: the rank's real construction (``train.simulate``) next to its estimate."""
    from ..train.simulate import render_simulation, simulate_rank  # builds the rank's modules: only this flag

    if not 0 <= args.simulate_rank < dims.world_size:
        raise UserInputError(f"--simulate-rank {args.simulate_rank} is not a rank of a {dims.world_size}-rank world")
    root = Config(model=cfg, parallel=pc, seed=args.seed)
    root.data.seq_len = args.seq_len
    root.optim.name = args.optimizer
    root.trainer.activation_checkpointing = args.activation_checkpointing
    root.trainer.micro_batch_size = args.micro_batch_size
    root.trainer.global_batch_size = args.micro_batch_size * M * dims.dp
    root.pipeline.schedule = args.schedule
    if args.layers_per_stage:
        root.pipeline.layers_per_stage = [int(x) for x in args.layers_per_stage.split(",")]
    root.pipeline.block_cache = not args.no_cache
    sim = simulate_rank(root, args.simulate_rank, dims.world_size)
    shape = _train_shape(args, M)
    est = estimate_ranks(cfg, dims, shape, layout, sched)[sim.pp_rank]
    out = render_simulation(sim, est.memory)
    if dims.pp > 1:  # no peer sends anything through a fake group: the runtime's bound, not a measurement
        seq = args.seq_len // args.tp if args.sp else args.seq_len
        u = args.micro_batch_size * seq * cfg.hidden_size * DTYPE_BYTES[args.dtype]
        bound = held_bytes_bound(lower(sched), layout, sim.pp_rank, u)
        out += (
            f"\npipeline buffers held by the runtime (its bound for this schedule; not simulated): "
            f"{bound / 2**30:.3f} GiB; plan's pp_send {est.memory.get('pipeline_sends', 0.0) / 2**30:.3f} GiB"
        )
    return out


def render_pipeline(args, cfg, M):
    split = None
    if args.layers_per_stage:
        try:
            split = [int(x) for x in args.layers_per_stage.split(",")]
        except ValueError:
            raise ConfigError(
                "pipeline.layers_per_stage", f"not a comma-separated list of integers: {args.layers_per_stage!r}"
            ) from None
    layout = PipelineLayout.from_model_config(
        cfg,
        args.pp,
        args.vpp,
        layers_per_stage=split,
        block_cache=not args.no_cache,
        embed_cost=args.embed_cost,
        head_cost=args.head_cost,
        placement=schedule_placement(args.schedule),
    )
    sched = make_schedule(args.schedule, args.pp, args.vpp, M, args.group_size, args.split_backward, args.w_delay)
    lowered = lower(sched)
    report = check(lowered, layout)
    if args.csv:
        return lowered.to_csv().rstrip("\n"), layout, sched
    seq = args.seq_len // args.tp if args.sp else args.seq_len
    u = args.micro_batch_size * seq * cfg.hidden_size
    nbytes = DTYPE_BYTES[args.dtype]
    other = layout.with_cache(not layout.block_cache)
    naive, cached = (other, layout) if layout.block_cache else (layout, other)
    out = [
        f"model {cfg.name}: {cfg.num_layers} decoder layers, d={cfg.hidden_size}, residual={cfg.residual.mode}"
        f" ({layout.num_blocks} block tensors incl. the embedding)",
        layout.describe(),
        "",
        f"per-hop payload (tensors of [B={args.micro_batch_size}, T={seq}, d={cfg.hidden_size}] "
        f"{args.dtype} = {u * nbytes / 2**20:.1f} MiB each), forward; backward sends the same shapes back:",
    ]
    for s in range(layout.num_stages - 1):
        local = " (same rank, no message)" if layout.rank_of(s) == layout.rank_of(s + 1) else ""
        out.append(
            f"  hop {s:>3}->{s + 1:<3} rank {layout.rank_of(s)}->{layout.rank_of(s + 1)}: "
            f"{layout.payload_len(s):>3} tensors (naive {naive.payload_len(s):>3})  "
            f"shape {list(layout.payload_shape(s, args.micro_batch_size, seq))}{local}"
        )
    tn, tc = naive.tensors_per_microbatch(), cached.tensors_per_microbatch()
    out.append(
        f"tensors per microbatch per direction: cached {tc}, naive {tn} (x{tn / max(tc, 1):.2f}); "
        f"largest hop: cached {max(cached.hop_tensors(), default=0)}, naive {max(naive.hop_tensors(), default=0)}"
    )
    out.append(
        f"bytes per step (M={M}, fwd+bwd, all links): cached "
        f"{cached.bytes_per_step(M, args.micro_batch_size, seq, nbytes) / 2**30:.3f} GiB, naive "
        f"{naive.bytes_per_step(M, args.micro_batch_size, seq, nbytes) / 2**30:.3f} GiB"
        f"  [using: {'cache' if layout.block_cache else 'naive'}]"
    )
    tl = timeline(sched)
    out += [
        "",
        lowered.format() if args.comms else sched.format(compute_only=True),
        f"checked: {report.messages} messages, per link {dict(sorted(report.per_link.items()))}",
        f"simulated bubble (F=1, B=2, no comm cost): {tl.bubble_fraction:.4f}; "
        f"(P-1)/(V*M+P-1) = {ideal_bubble(args.pp, args.vpp, M):.4f}",
    ]
    return "\n".join(out), layout, sched


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _ranges(layers) -> str:
    """``[0,1,2,7,8]`` -> ``0-2,7-8`` (the decoder layers a pipeline rank holds)."""
    parts, start = [], None
    for j, i in enumerate(layers):
        if start is None:
            start = i
        if j + 1 == len(layers) or layers[j + 1] != i + 1:
            parts.append(f"{start}-{i}" if i != start else str(i))
            start = None
    return ",".join(parts) or "-"


def _train_shape(args, M: int) -> TrainShape:
    """The batch geometry and precision the estimates assume, from the command line."""
    return TrainShape(
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        microbatches=M,
        activation_checkpointing=args.activation_checkpointing,
        optimizer=args.optimizer,
        comm_bytes=DTYPE_BYTES[args.dtype],
    )


def render_estimates(cfg, dims, args, M, layout, sched) -> str:
    """Mesh, parameters, per-rank memory and per-group traffic (``parallel.plan_estimates``)."""
    shape = _train_shape(args, M)
    d = dims
    tot = summary(cfg)
    out = [
        f"model {cfg.name}: {_count(tot['total'])} parameters ({tot['total']:,}), {_count(tot['active'])} active "
        f"per token, routed experts {_count(tot['experts'])}; residual={cfg.residual.mode}",
        f"world {d.world_size} = pp {d.pp} x dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard} x tp {d.tp}"
        f"{' (+sp)' if d.sp else ''}; ep {d.ep} folded into the dp ranks",
        "mesh (outermost first, tp innermost = adjacent ranks):",
        f"  dense  (pp={d.pp}, dp_replicate={d.dp_replicate}, dp_shard={d.dp_shard}, tp={d.tp})",
        f"  sparse (pp={d.pp}, edp_replicate={d.edp_replicate}, edp_shard={d.edp_shard}, ep={d.ep}, tp={d.tp})"
        + ("" if d.ep > 1 else "  [ep=1: experts follow the dense layout]"),
        f"batch: {args.micro_batch_size} x {args.seq_len} tokens per microbatch, {M} microbatches per step per dp "
        f"rank -> global batch {args.micro_batch_size * M * d.dp} sequences "
        f"({args.micro_batch_size * M * d.dp * args.seq_len:,} tokens) per step",
        "",
        f"memory per rank, GiB (fp32 weights + grads, {args.optimizer} state, bf16 activations"
        f"{', activation checkpointing' if args.activation_checkpointing else ''}):",
        f"{'pp':>3} {'layers':>13} {'params/rank':>12} {'weights':>8} {'grads':>7} {'optim':>7} {'fsdp_buf':>8} "
        f"{'activ.':>7} {'inflight':>8} {'blk_cache':>9} {'blk/mb':>6} {'pp_send':>7} {'total':>7}",
    ]
    ranks = estimate_ranks(cfg, dims, shape, layout, sched)
    for r in ranks:
        m = r.memory
        lay = _ranges(r.layers)
        head_rank = layout.rank_of(layout.num_stages - 1) if layout else len(ranks) - 1  # V placement: rank 0
        lay += ("E" if r.pp_rank == 0 else "") + ("H" if r.pp_rank == head_rank else "")
        out.append(
            f"{r.pp_rank:>3} {lay:>13} {_count(r.local_params):>12} {_gib(m['weights']):>8} {_gib(m['grads']):>7} "
            f"{_gib(m['optimizer']):>7} {_gib(m['fsdp_buffers']):>8} {_gib(m['activations']):>7} "
            f"{r.inflight:>8} {_gib(m['block_cache']):>9} {r.blocks_cached:>6} "
            f"{_gib(m.get('pipeline_sends', 0.0)):>7} {_gib(r.total_memory):>7}"
        )
    if d.pp > 1:
        out.append(
            "  (layers E/H: holds the embedding / the head; inflight: peak (chunk, microbatch) activations the "
            "schedule keeps; blk/mb: AttnRes blocks cached per microbatch)"
        )
    worst = max(ranks, key=lambda r: r.total_memory)
    out += ["", f"communication per optimizer step, GiB sent per rank (pp rank {worst.pp_rank}, the largest memory):"]
    rows = estimate_comm(cfg, dims, shape, worst, layout)
    for row in rows:
        out.append(f"  {row.group:<14} {row.collective:<44} {_gib(row.bytes):>9}  {row.note}")
    if not rows:
        out.append("  (none: a single rank)")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(render(args))
    except (ConfigError, UserInputError, ScheduleError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
