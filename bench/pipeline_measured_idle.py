"""Measured idle fraction of the pipeline schedules against the simulator, with fixed per-action costs.

Why: issue 13 asks that the idle time the runtime really leaves per rank follow the simulator within 10% for
1F1B, interleaved 1F1B, ZB-H1 and ZB-V. Each of P gloo processes runs the real runtime (lowered schedule, P2P)
with every F/B/I/W replaced by a sleep of a fixed cost (``parallel/pipeline/fixed_cost.py``), so the measurement
holds on a loaded CPU. Definitions and the criterion: docs/pipeline.md, "Measured idle fraction".

Usage: python bench/pipeline_measured_idle.py [--P 4] [--M 8] [--unit-ms 250] [--repeats 3]
Ends with one ``RESULT`` line per schedule.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnres_train.parallel.pipeline.fixed_cost import FixedCosts, measure_rank  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402  (the repo's gloo spawn helper)

SCHEDULES = [("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("zb_v", 2), ("dualpipev", 2)]
TOLERANCE = 0.10  # relative: |measured - simulated| <= 0.10 * simulated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--unit-ms", type=float, default=250.0, help="a full stage's F (= I = W; B = 2 units)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schedules", default=",".join(n for n, _ in SCHEDULES))
    args = ap.parse_args()
    costs = FixedCosts(args.unit_ms / 1000)
    wanted = args.schedules.split(",")
    print(
        f"P={args.P} M={args.M} unit={args.unit_ms:g} ms: a full stage F=I=W=1 unit, B=2, a chunk 1/V; "
        f"{args.repeats} measured steps each; load average {os.getloadavg()[0]:.1f}"
    )
    for name, V in SCHEDULES:
        if name not in wanted:
            continue
        t0 = time.time()
        res = run_distributed(measure_rank, args.P, name, V, args.M, costs, args.repeats, timeout=1800)[0]
        runs = res["measured"]
        fr = sorted(r.idle_fraction for r in runs)
        med = fr[len(fr) // 2]
        s0, sl = res["sim"].bubble_fraction, res["sim_latency"].bubble_fraction
        worst = max(abs(f - sl) / sl for f in fr)
        worst0 = max(abs(f - s0) / s0 for f in fr)
        mk = sorted(r.makespan for r in runs)[len(runs) // 2]
        print(
            f"RESULT schedule={name} P={args.P} V={V} M={args.M} unit_ms={args.unit_ms:g} "
            f"sim_idle={s0:.4f} hop_latency_ms={res['latency'] * 1e3:.2f} sim_idle_lat={sl:.4f} "
            f"measured_idle={med:.4f} spread={fr[0]:.4f}..{fr[-1]:.4f} "
            f"rel_err={(med - s0) / s0:+.3f} worst_rel_err={worst0:.3f} rel_err_lat={(med - sl) / sl:+.3f} "
            f"worst_rel_err_lat={worst:.3f} every_repeat_within_10pct_lat={'yes' if worst <= TOLERANCE else 'NO'} "
            f"median_within_10pct={'yes' if abs(med - s0) <= TOLERANCE * s0 else 'NO'} "
            f"makespan_s={mk:.3f} sim_makespan_s={res['sim'].makespan:.3f} "
            f"max_lag_ms={max(max(r.lag) for r in runs) * 1e3:.1f} wall_s={time.time() - t0:.0f} "
            f"load={os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
