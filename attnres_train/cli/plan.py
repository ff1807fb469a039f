"""``attnres-plan``: print a pipeline plan (layout, per-hop payloads, schedule actions, bubble) for a config.

    attnres-plan --pp 4 --vpp 2 [--model demo|PATH.yaml] [--num-layers 16] [--mode block --block-size 2]
                 [--microbatches 8] [--schedule interleaved_1f1b] [--layers-per-stage 2,2,...] [--no-cache]
                 [--micro-batch-size 1 --seq-len 4096 --dtype bfloat16] [--comms] [--csv] [--split-backward]

Nothing is run and no process group is created: everything printed is a pure function of the config
(``attnres_train.parallel.pipeline.layout`` / ``schedules``). The schedule is lowered and checked by the same
global simulator the runtime uses, so a plan that prints is a plan that runs. Errors print one
``error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..config.errors import ConfigError, UserInputError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnres-plan", description="Print the pipeline layout, per-hop payloads and schedule.")
    p.add_argument("--model", default="tiny", help="model preset in configs/model/ or a YAML path (default tiny)")
    p.add_argument("--num-layers", type=int, default=None, help="override model.num_layers")
    p.add_argument("--hidden-size", type=int, default=None, help="override model.hidden_size")
    p.add_argument("--mode", choices=("prenorm", "full", "block"), default=None, help="override residual mode")
    p.add_argument("--block-size", type=int, default=None, help="block mode: decoder layers per block")
    p.add_argument("--num-blocks", type=int, default=None, help="block mode: number of blocks")
    p.add_argument("--pp", type=int, required=True, help="pipeline ranks P")
    p.add_argument("--vpp", type=int, default=1, help="model chunks per rank V (default 1)")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches per step M (default 2*pp)")
    p.add_argument("--schedule", default="interleaved_1f1b", help="gpipe | 1f1b | interleaved_1f1b")
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
    return p


def load_model_config(name: str, args):
    from omegaconf import OmegaConf

    from ..config.model import as_model_config, validate_model_config

    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.yaml"
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
    from ..parallel.pipeline.layout import PipelineLayout
    from ..parallel.pipeline.schedules import check, ideal_bubble, lower, make_schedule, timeline

    cfg = load_model_config(args.model, args)
    split = None
    if args.layers_per_stage:
        try:
            split = [int(x) for x in args.layers_per_stage.split(",")]
        except ValueError:
            raise ConfigError("pipeline.layers_per_stage", f"not a comma-separated list of integers: "
                              f"{args.layers_per_stage!r}") from None
    layout = PipelineLayout.from_model_config(cfg, args.pp, args.vpp, layers_per_stage=split,
                                              block_cache=not args.no_cache, embed_cost=args.embed_cost,
                                              head_cost=args.head_cost)
    M = args.microbatches or 2 * args.pp
    sched = make_schedule(args.schedule, args.pp, args.vpp, M, args.group_size, args.split_backward, args.w_delay)
    lowered = lower(sched)
    report = check(lowered, layout)
    if args.csv:
        return lowered.to_csv().rstrip("\n")
    u = args.micro_batch_size * args.seq_len * cfg.hidden_size
    nbytes = DTYPE_BYTES[args.dtype]
    other = layout.with_cache(not layout.block_cache)
    naive, cached = (other, layout) if layout.block_cache else (layout, other)
    out = [f"model {cfg.name}: {cfg.num_layers} decoder layers, d={cfg.hidden_size}, residual={cfg.residual.mode}"
           f" ({layout.num_blocks} block tensors incl. the embedding)", layout.describe(), "",
           f"per-hop payload (tensors of [B={args.micro_batch_size}, T={args.seq_len}, d={cfg.hidden_size}] "
           f"{args.dtype} = {u * nbytes / 2**20:.1f} MiB each), forward; backward sends the same shapes back:"]
    for s in range(layout.num_stages - 1):
        local = " (same rank, no message)" if layout.rank_of(s) == layout.rank_of(s + 1) else ""
        out.append(f"  hop {s:>3}->{s + 1:<3} rank {layout.rank_of(s)}->{layout.rank_of(s + 1)}: "
                   f"{layout.payload_len(s):>3} tensors (naive {naive.payload_len(s):>3})  "
                   f"shape {list(layout.payload_shape(s, args.micro_batch_size, args.seq_len))}{local}")
    tn, tc = naive.tensors_per_microbatch(), cached.tensors_per_microbatch()
    out.append(f"tensors per microbatch per direction: cached {tc}, naive {tn} (x{tn / max(tc, 1):.2f}); "
               f"largest hop: cached {max(cached.hop_tensors(), default=0)}, naive {max(naive.hop_tensors(), default=0)}")
    out.append(f"bytes per step (M={M}, fwd+bwd, all links): cached "
               f"{cached.bytes_per_step(M, args.micro_batch_size, args.seq_len, nbytes) / 2**30:.3f} GiB, naive "
               f"{naive.bytes_per_step(M, args.micro_batch_size, args.seq_len, nbytes) / 2**30:.3f} GiB"
               f"  [using: {'cache' if layout.block_cache else 'naive'}]")
    tl = timeline(sched)
    out += ["", lowered.format() if args.comms else sched.format(compute_only=True),
            f"checked: {report.messages} messages, per link {dict(sorted(report.per_link.items()))}",
            f"simulated bubble (F=1, B=2, no comm cost): {tl.bubble_fraction:.4f}; "
            f"(P-1)/(V*M+P-1) = {ideal_bubble(args.pp, args.vpp, M):.4f}"]
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    from ..parallel.pipeline.schedules import ScheduleError

    args = build_parser().parse_args(argv)
    try:
        print(render(args))
    except (ConfigError, UserInputError, ScheduleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
