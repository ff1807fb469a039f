"""Lowering: a compute-only schedule plus the sends and receives its cross-rank hops need.

Why: NCCL matches point-to-point messages by order, so both ends of every link must post them in the same order.
Like torch's ``_add_send_recv``, the event simulator runs the compute order one action per rank per sweep; each
SEND goes right after its compute action and the matching RECV into the receiver's list at the simulated moment
of the send (docs/pipeline.md, "Schedules as data").
"""

from __future__ import annotations

from typing import List

from .actions import Action, Schedule, ScheduleError
from .checker import validate_compute
from .simulator import Simulator, Stuck


def lower(sched: Schedule) -> Schedule:
    """Insert SEND/RECV actions by a global simulation (consistent per-link order); raises on deadlock."""
    if sched.lowered:
        return sched
    validate_compute(sched)
    out: List[List[Action]] = [[] for _ in range(sched.num_ranks)]
    sim = Simulator(sched, greedy=False)
    try:
        for ev in sim.events():
            out[ev.rank].append(ev.action)
    except Stuck as stuck:
        waits = [
            f"rank {r} at #{i} {a} waits for "
            + ", ".join(
                f"{d.stage}{'B/I' if d.kind.value == 'B' else d.kind.value}{d.mb} (rank {sched.rank_of(d.stage)})"
                for d in sim.missing(a)
            )
            for r, i, a in stuck.blocked
        ]
        raise ScheduleError(
            f"schedule {sched.name} deadlocks (no rank can run its next action):\n  " + "\n  ".join(waits)
        ) from None
    return Schedule(
        sched.name,
        sched.num_ranks,
        sched.num_stages,
        sched.num_microbatches,
        out,
        True,
        dict(sched.meta),
        sched.placement,
    )
