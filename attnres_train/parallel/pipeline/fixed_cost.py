"""Fixed-cost pipeline runtime: the real schedule, block-cache layout and P2P of :class:`PipelineRuntime`, with
each stage's compute replaced by a fixed wall-clock wait taken from the simulator's cost table.

Why: the idle time a schedule leaves per rank can then be measured on a shared, noisy CPU and compared with
:func:`.timing.timeline` for the same costs. A busy-wait needs one free core per rank (P ranks on 2 loaded
cores measured the neighbours); a timed sleep needs none, so only OS wake-up jitter and the per-hop latency
remain. Definitions, the 10% criterion and the figures: docs/pipeline.md, "Measured idle fraction".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from ...config.model import ModelConfig
from ...model import build_model
from .actions import Action, Kind, Schedule
from .generators import make_schedule, schedule_placement
from .layout import PipelineLayout
from .records import PipelineError
from .runtime import PipelineRuntime
from .simulator import dep_key, deps, done_keys
from .stage import build_stages
from .timing import Timeline, timeline

Trace = List[Tuple[str, float, float, bool]]  # (action, start, end, started by a blocked receive); CLOCK_MONOTONIC


def clock() -> float:
    """Seconds on the system-wide monotonic clock: start/end times of different ranks on one host compare."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def wait_until(deadline: float) -> None:
    """Sleep (holding no core) until ``clock() >= deadline``."""
    while True:
        left = deadline - clock()
        if left <= 0:
            return
        time.sleep(left)


@dataclass(frozen=True)
class FixedCosts:
    """Seconds per action for a full stage (``unit_s`` × units; a chunk of ``V`` costs 1/V of it), the one
    table both the fixed-cost runtime and :meth:`simulate` read. ``b`` is the unsplit backward, ``i``/``w``
    its input and weight halves (zero-bubble schedules); ``latency`` (seconds per cross-rank hop) is given to
    the simulator only (the runtime's hops take what the transport takes)."""

    unit_s: float
    f: float = 1.0
    b: float = 2.0
    i: float = 1.0
    w: float = 1.0
    latency: float = 0.0

    def __post_init__(self):
        if not self.unit_s > 0:
            raise PipelineError(f"FixedCosts.unit_s must be > 0 seconds, got {self.unit_s!r}")
        if min(self.f, self.b, self.i, self.w, self.latency) < 0:
            raise PipelineError(f"FixedCosts: costs must be >= 0, got {self}")

    def seconds(self, kind: Kind, V: int) -> float:
        units = {Kind.F: self.f, Kind.B: self.b, Kind.I: self.i, Kind.W: self.w}[kind]
        return units * self.unit_s / V

    def simulate(self, sched: Schedule) -> Timeline:
        """The simulator's timeline of ``sched`` with these costs (seconds)."""
        V = sched.virtual_stages
        return timeline(
            sched,
            t_f=self.seconds(Kind.F, V),
            t_b=self.seconds(Kind.B, V),
            t_i=self.seconds(Kind.I, V),
            t_w=self.seconds(Kind.W, V),
            latency=self.latency,
        )


class FixedCostRuntime(PipelineRuntime):
    """A :class:`PipelineRuntime` whose F/B/I/W actions take a fixed time from ``costs`` instead of running
    the stage.

    Everything else is the runtime's: the lowered, checked schedule, the SEND/RECV actions, tags, the send cap
    and send plan, the local mailbox for same-rank hops (the V placement's turn). A compute action occupies
    ``[start, start + cost]`` (a sleep to that deadline), then hands its output message (zeros of the layout's
    payload shape) to the transport as the real action would. ``start`` is this rank's previous deadline, or
    later if the rank had to wait: a receive that blocked (longer than ``wait_s``) starts the action when it
    returned; a SEND/RECV action that blocked moves the rank's free time to its end. The rank's own non-blocking
    bookkeeping between two actions thus overlaps the fixed cost, as host work overlaps device compute; every
    wait for a peer shows. :meth:`timed_step` returns this rank's compute actions as (action, start, end).
    """

    def __init__(
        self, stages, layout: PipelineLayout, schedule, group=None, *, costs: FixedCosts, wait_s=5e-4, **kwargs
    ):
        super().__init__(stages, layout, schedule, group, **kwargs)
        self.costs = costs
        self.wait_s = wait_s
        self._trace: Trace = []
        self._free = 0.0  # when this rank may start its next compute action (its previous deadline, or a wait's end)
        self.lag_s = 0.0  # the most the rank reached an action after that action's deadline (host behind)

    def timed_step(self, microbatches) -> Trace:
        """One step (gradients none, loss 0); this rank's compute actions as (action, start, end, waited)."""
        self._trace, self.lag_s = [], 0.0
        self._free = clock()
        self.step(microbatches, reduce=False)
        return self._trace

    def _run(self, a) -> None:
        if a.kind not in (Kind.SEND_F, Kind.SEND_B):
            return super()._run(a)  # compute (below), or posting a receive (never waits for a peer)
        t0 = clock()
        super()._run(a)  # posting a send may wait for an older one to complete (the send cap)
        t1 = clock()
        if t1 - t0 > self.wait_s:
            self._free = max(self._free, t1)

    def _compute(self, s: int, m: int, kind: Kind, recv: str = "", emit: str = "") -> None:
        start, waited = self._free, False
        if recv:
            t0 = clock()
            self._tx.receive(recv, s, m)  # the real wait for the producer's message
            t1 = clock()
            if t1 - t0 > self.wait_s and t1 > start:
                start, waited = t1, True
        end = start + self.costs.seconds(kind, self.layout.virtual_stages)
        self.lag_s = max(self.lag_s, clock() - end)
        wait_until(end)
        if emit:
            hop = s if emit == "F" else s - 1  # F goes over hop s (s -> s+1), B over hop s-1 (s -> s-1)
            shape = self.layout.payload_shape(hop, self._B, self._T)
            self._tx.emit(emit, s, m, torch.zeros(shape, dtype=self.comm_dtype, device=self.device))
        self._free = end
        self._trace.append((f"{s}{kind.value}{m}", start, end, waited))

    def _forward(self, s: int, m: int) -> None:
        last = s == self.C - 1
        self._compute(s, m, Kind.F, recv="F" if s > 0 else "", emit="" if last else "F")

    def _backward(self, s: int, m: int, split: bool) -> None:
        last = s == self.C - 1
        kind = Kind.I if split else Kind.B
        self._compute(s, m, kind, recv="" if last else "B", emit="B" if s > 0 else "")

    def _weight(self, s: int, m: int) -> None:
        self._compute(s, m, Kind.W)


@dataclass
class IdleMeasurement:
    """One step on P ranks: makespan from the first compute start (rank 0's first F, the simulator's t = 0)
    to the last compute end on any rank; busy = Σ of this rank's compute actions; idle = makespan − busy.
    ``hops``: for every message a compute action waited for, its start − the producer's end (seconds): the
    transport's per-hop latency as this step saw it; ``lag``: per rank, :attr:`FixedCostRuntime.lag_s`."""

    makespan: float
    busy: List[float]
    hops: List[float]
    lag: List[float]

    @property
    def idle(self) -> List[float]:
        return [self.makespan - b for b in self.busy]

    @property
    def idle_fraction(self) -> float:
        """``1 − Σ busy / (P · makespan)``, the simulator's ``Timeline.bubble_fraction`` definition."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)

    @classmethod
    def from_traces(cls, traces: Sequence[Trace], num_stages: int, lag: Sequence[float] = ()) -> "IdleMeasurement":
        start = min(t0 for tr in traces for _, t0, _, _ in tr)
        end = max(t1 for tr in traces for _, _, t1, _ in tr)
        done: Dict[tuple, Tuple[int, float]] = {}  # dependency key -> (rank, end)
        for r, tr in enumerate(traces):
            for text, _, t1, _ in tr:
                for key in done_keys(Action.parse(text)):
                    done[key] = (r, t1)
        hops = []
        for r, tr in enumerate(traces):
            for text, t0, _, waited in tr:
                remote = [done[dep_key(d)][1] for d in deps(Action.parse(text), num_stages) if done[dep_key(d)][0] != r]
                if waited and remote:
                    hops.append(t0 - max(remote))
        busy = [sum(t1 - t0 for _, t0, t1, _ in tr) for tr in traces]
        return cls(makespan=end - start, busy=busy, hops=hops, lag=list(lag) or [0.0] * len(traces))


def tiny_stages(P: int, V: int, placement: str, rank: int, hidden: int = 32):
    """A small real model cut into this rank's stages (one layer per stage, blocks of one layer): the
    fixed-cost runtime needs real stage objects and layout, never their compute."""
    C = P * V
    cfg = ModelConfig(num_layers=C, hidden_size=hidden, vocab_size=64, mla_layers=[])
    cfg.kda.num_heads, cfg.kda.head_dim = 2, hidden // 2
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.intermediate_size = 2, 1, hidden
    cfg.moe.dense_intermediate_size = hidden
    cfg.residual.mode, cfg.residual.block_size, cfg.residual.num_blocks = "block", 1, None
    layout = PipelineLayout.from_model_config(cfg, P, V, placement=placement)
    return build_stages(build_model(cfg), layout, rank), layout


def measure_rank(
    schedule: str, V: int, M: int, costs: FixedCosts, repeats: int = 3, warmup: int = 1, seq: int = 4
) -> Dict[str, object]:
    """Run in each of P processes of the default group: ``warmup`` + ``repeats`` fixed-cost steps of
    ``schedule``; returns (on every rank) the measured makespan/busy per repeat and the simulated timeline's."""
    P, rank = dist.get_world_size(), dist.get_rank()
    stages, layout = tiny_stages(P, V, schedule_placement(schedule), rank)
    rt = FixedCostRuntime(stages, layout, schedule, costs=replace(costs, unit_s=1e-3))
    mbs = [(torch.zeros(1, seq, dtype=torch.long), torch.zeros(1, seq, dtype=torch.long)) for _ in range(M)]
    for _ in range(warmup):  # connections, the agreement check and the lowered schedule, at 1 ms per unit
        rt.timed_step(mbs)
    rt.costs = costs
    runs = []
    for _ in range(repeats):
        dist.barrier()
        trace = rt.timed_step(mbs)
        gathered = [None] * P
        dist.all_gather_object(gathered, (trace, rt.lag_s))
        traces, lag = [g[0] for g in gathered], [g[1] for g in gathered]
        runs.append(IdleMeasurement.from_traces(traces, layout.num_stages, lag))
    sched = make_schedule(schedule, P, V, M)
    sim = costs.simulate(sched)
    hops = sorted(h for r in runs for h in r.hops)
    lat = hops[len(hops) // 2] if hops else 0.0  # the median hop: the transport's typical latency
    sim_lat = replace(costs, latency=lat).simulate(sched)
    return {
        "schedule": schedule,
        "P": P,
        "V": V,
        "M": M,
        "measured": runs,
        "sim": sim,
        "sim_latency": sim_lat,
        "latency": lat,
    }


__all__ = ["FixedCostRuntime", "FixedCosts", "IdleMeasurement", "measure_rank", "tiny_stages", "clock"]
