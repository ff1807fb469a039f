"""Timing replay of a schedule: when each compute action runs given per-action costs, and the bubble.

Why a module of its own: ``schedules.py`` holds the action IR, the generators, lowering and the checker; this is
the simulator the benches, ``attnres-plan`` and the schedule tests time schedules with (F, B, I, W costs, scaled
per stage, optional per-hop latency). It reuses the checker's dependency rule (``schedules._deps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .schedules import Action, Kind, Schedule, ScheduleError, _deps, _validate_compute


@dataclass
class Timeline:
    makespan: float
    busy: List[float]
    start: Dict[Action, float]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of ``P × makespan`` (1 − Σ busy / (P · makespan))."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def timeline(sched: Schedule, t_f: float = 1.0, t_b: float = 2.0, t_i: Optional[float] = None,
             t_w: Optional[float] = None, latency: float = 0.0,
             stage_cost: Optional[Sequence[float]] = None) -> Timeline:
    """Replay the compute order with costs (F, B, I, W; scaled per stage by ``stage_cost``): each action starts
    when its rank is free and its inputs have arrived (``latency`` per cross-rank hop)."""
    s = sched.compute_only()
    _validate_compute(s)
    t_i = t_b / 2 if t_i is None else t_i
    t_w = t_b - t_i if t_w is None else t_w
    cost = {Kind.F: t_f, Kind.B: t_b, Kind.I: t_i, Kind.W: t_w}
    P, C = s.num_ranks, s.num_stages
    finish: Dict[Tuple[int, str, int], float] = {}
    start: Dict[Action, float] = {}
    free = [0.0] * P
    busy = [0.0] * P
    ptr = [0] * P
    total = sum(len(a) for a in s.ranks)
    n = 0
    while n < total:
        progressed = False
        for r in range(P):
            while ptr[r] < len(s.ranks[r]):
                a = s.ranks[r][ptr[r]]
                ready = free[r]
                ok = True
                for d in _deps(a, C):
                    key = (d.stage, "G", d.mb) if d.kind == Kind.B else (d.stage, d.kind.value, d.mb)
                    if key not in finish:
                        ok = False
                        break
                    hop = latency if s.rank_of(d.stage) != r else 0.0
                    ready = max(ready, finish[key] + hop)
                if not ok:
                    break
                c = cost[a.kind] * (stage_cost[a.stage] if stage_cost is not None else 1.0)
                start[a] = ready
                free[r] = ready + c
                busy[r] += c
                finish[(a.stage, a.kind.value, a.mb)] = free[r]
                if a.kind in (Kind.B, Kind.I):
                    finish[(a.stage, "G", a.mb)] = free[r]
                ptr[r] += 1
                n += 1
                progressed = True
        if not progressed:
            raise ScheduleError(f"schedule {s.name} deadlocks in the timing replay")
    return Timeline(makespan=max(free), busy=busy, start=start)


def ideal_bubble(P: int, V: int, M: int) -> float:
    """Megatron's interleaved bubble fraction ``(P−1)/(V·M+P−1)`` (equal F/B cost per chunk)."""
    return (P - 1) / (V * M + P - 1)


__all__ = ["Timeline", "timeline", "ideal_bubble"]
