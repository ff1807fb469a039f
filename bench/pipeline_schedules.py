"""Pipeline schedules side by side: simulated bubble, bytes per step, peak held activations and pending W work,
and (``--measure``) the idle fraction measured with synthetic, calibrated busy-wait stage costs.

Why: issue 13 asks whether the zero-bubble schedules keep what the simulator promises while the block cache keeps
the hop volume minimal on their placement. Costs, units and what ``--measure`` does: docs/pipeline.md, "Bench
(``bench/pipeline_schedules.py``)".

Usage: python bench/pipeline_schedules.py [--P 4] [--M 8] [--layers 16] [--block-size 2] [--hidden 4096]
       [--seq 4096] [--measure --unit-ms 20]
Ends with one ``RESULT`` line per schedule.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from attnres_train.config.model import ModelConfig
from attnres_train.parallel.pipeline.layout import PipelineLayout
from attnres_train.parallel.pipeline.schedules import Kind, lower, make_schedule, schedule_placement
from attnres_train.parallel.pipeline.timing import timeline

SCHEDULES = [("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("zb_v", 2), ("dualpipev", 2)]


def _peaks(sched, V: int):
    """(peak held forward activations, peak pending W work) over ranks, in full-stage units."""
    held_pk = w_pk = 0.0
    for acts in sched.ranks:
        held = pend = 0
        for a in acts:
            held += (a.kind == Kind.F) - (a.kind in (Kind.B, Kind.W))
            pend += (a.kind == Kind.I) - (a.kind == Kind.W)
            held_pk, w_pk = max(held_pk, held / V), max(w_pk, pend / V)
    return held_pk, w_pk


def _measure_body(sched, unit_s: float, V: int):
    import torch
    import torch.distributed as dist

    r = dist.get_rank()
    cost = {Kind.F: 1.0, Kind.I: 1.0, Kind.W: 1.0, Kind.B: 2.0}
    buf = torch.zeros(16)
    pending = []
    dist.barrier()
    t0 = time.perf_counter()
    busy = 0.0
    for a in sched.ranks[r]:
        if a.kind in cost:
            dt = cost[a.kind] / V * unit_s
            end = time.perf_counter() + dt
            while time.perf_counter() < end:
                pass
            busy += dt
        elif a.kind in (Kind.SEND_F, Kind.SEND_B):
            peer = sched.rank_of(a.stage + 1 if a.kind == Kind.SEND_F else a.stage - 1)
            if peer != r:
                pending.append(dist.isend(buf.clone(), peer, tag=_tag(a)))
        else:
            peer = sched.rank_of(a.stage - 1 if a.kind == Kind.RECV_F else a.stage + 1)
            if peer != r:
                dist.recv(torch.empty(16), peer, tag=_tag(a))
    for p in pending:
        p.wait()
    wall = time.perf_counter() - t0
    return 1.0 - busy / wall


def _tag(a) -> int:
    """Unique per (hop, microbatch, direction): SEND_F s / RECV_F s+1 and SEND_B s+1 / RECV_B s share hop s."""
    fwd = a.kind in (Kind.SEND_F, Kind.RECV_F)
    hop = a.stage if a.kind in (Kind.SEND_F, Kind.RECV_B) else a.stage - 1
    return (hop * 100000 + a.mb) * 2 + (0 if fwd else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--bytes-per-elem", type=int, default=2)
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--unit-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    P, M = args.P, args.M
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden)
    cfg.residual.mode, cfg.residual.block_size, cfg.residual.num_blocks = "block", args.block_size, None
    print(
        f"P={P} M={M} layers={args.layers} block_size={args.block_size} d={args.hidden} T={args.seq} "
        f"bytes/elem={args.bytes_per_elem}; costs per full stage F=I=W=1 (B=2), a chunk 1/V of that"
    )
    for name, V in SCHEDULES:
        sched = make_schedule(name, P, V, M)
        lay = PipelineLayout.from_model_config(cfg, P, V, placement=schedule_placement(name))
        split = any(a.kind == Kind.W for acts in sched.ranks for a in acts)
        tl = (
            timeline(sched, t_f=1 / V, t_b=2 / V, t_i=1 / V, t_w=1 / V)
            if split
            else timeline(sched, t_f=1 / V, t_b=2 / V)
        )
        cached = lay.bytes_per_step(M, 1, args.seq, args.bytes_per_elem)
        naive = lay.with_cache(False).bytes_per_step(M, 1, args.seq, args.bytes_per_elem)
        held, wpend = _peaks(sched, V)
        measured = ""
        if args.measure:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.distributed import run_distributed  # the repo's spawn helper (gloo)

            lowered = lower(sched)
            vals = []
            for _ in range(args.repeats):
                per_rank = run_distributed(_measure_body, P, lowered, args.unit_ms / 1000, V, timeout=600)
                vals.append(sum(per_rank) / P)
            vals.sort()
            measured = f" measured_idle={vals[len(vals) // 2]:.4f}"
        print(
            f"RESULT schedule={name} V={V} placement={lay.placement} sim_bubble={tl.bubble_fraction:.4f} "
            f"makespan={tl.makespan:.3f} bytes_per_step={cached} naive_bytes={naive} "
            f"peak_held_stage_acts={held:.2f} peak_pending_W={wpend:.2f}{measured}"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
