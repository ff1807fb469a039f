"""Timing replay of a schedule: when each compute action runs given per-action costs, and the bubble.

Why a module of its own: the benches, ``attnres-plan`` and the schedule tests time schedules with (F, B, I, W
costs, scaled per stage, optional per-hop latency); the walk is the shared event simulator's
(:class:`.simulator.Simulator`), only the clock is added here (docs/pipeline.md, "Schedules as data").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .actions import Action, Kind, Schedule, ScheduleError
from .checker import validate_compute
from .simulator import Simulator, Stuck, dep_key, deps, done_keys


@dataclass
class Timeline:
    makespan: float
    busy: List[float]
    start: Dict[Action, float]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of ``P × makespan`` (1 − Σ busy / (P · makespan))."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def timeline(
    sched: Schedule,
    t_f: float = 1.0,
    t_b: float = 2.0,
    t_i: Optional[float] = None,
    t_w: Optional[float] = None,
    latency: float = 0.0,
    stage_cost: Optional[Sequence[float]] = None,
) -> Timeline:
    """Replay the compute order with costs (F, B, I, W; scaled per stage by ``stage_cost``): each action starts
    when its rank is free and its inputs have arrived (``latency`` per cross-rank hop)."""
    s = sched.compute_only()
    validate_compute(s)
    t_i = t_b / 2 if t_i is None else t_i
    t_w = t_b - t_i if t_w is None else t_w
    cost = {Kind.F: t_f, Kind.B: t_b, Kind.I: t_i, Kind.W: t_w}
    finish: Dict[Tuple[int, str, int], float] = {}
    start: Dict[Action, float] = {}
    free = [0.0] * s.num_ranks
    busy = [0.0] * s.num_ranks
    try:
        for ev in Simulator(s, greedy=True).events():
            a, r = ev.action, ev.rank
            if not a.is_compute:
                continue  # the hop's cost is the latency charged below
            ready = max(
                [free[r]]
                + [finish[dep_key(d)] + (latency if s.rank_of(d.stage) != r else 0.0) for d in deps(a, s.num_stages)]
            )
            c = cost[a.kind] * (stage_cost[a.stage] if stage_cost is not None else 1.0)
            start[a] = ready
            free[r] = ready + c
            busy[r] += c
            for key in done_keys(a):
                finish[key] = free[r]
    except Stuck:
        raise ScheduleError(f"schedule {s.name} deadlocks in the timing replay") from None
    return Timeline(makespan=max(free), busy=busy, start=start)


def ideal_bubble(P: int, V: int, M: int) -> float:
    """Megatron's interleaved bubble fraction ``(P−1)/(V·M+P−1)`` (equal F/B cost per chunk)."""
    return (P - 1) / (V * M + P - 1)


__all__ = ["Timeline", "timeline", "ideal_bubble"]
