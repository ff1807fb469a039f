"""Pipeline schedules side by side: simulated bubble, bytes per step, peak held activations and pending W work.
The measured idle fraction is bench/pipeline_measured_idle.py (the real runtime with fixed sleeping costs; the
busy-wait replay that was here measured the neighbours on a shared box and is gone).

Why: issue 13 asks whether the zero-bubble schedules keep what the simulator promises while the block cache keeps
the hop volume minimal on their placement. Costs and units: docs/pipeline.md, "Bench
(``bench/pipeline_schedules.py``)".

Usage: python bench/pipeline_schedules.py [--P 4] [--M 8] [--layers 16] [--block-size 2] [--hidden 4096]
       [--seq 4096]
Ends with one ``RESULT`` line per schedule.
"""

from __future__ import annotations

import argparse
import os

from attnres_train.config.model import ModelConfig
from attnres_train.parallel.pipeline.layout import PipelineLayout
from attnres_train.parallel.pipeline.schedules import Kind, make_schedule, schedule_placement
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--bytes-per-elem", type=int, default=2)
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
        print(
            f"RESULT schedule={name} V={V} placement={lay.placement} sim_bubble={tl.bubble_fraction:.4f} "
            f"makespan={tl.makespan:.3f} bytes_per_step={cached} naive_bytes={naive} "
            f"peak_held_stage_acts={held:.2f} peak_pending_W={wpend:.2f}"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
