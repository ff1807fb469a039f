"""The global checker: a lowered schedule executed by the event simulator, verified by small assertions.

Why: a schedule that deadlocks, disagrees on message order or computes before its input arrives must be refused
before any process runs it, with a message naming the rank, the action and why (docs/pipeline.md, "Schedules as
data"). :func:`validate_compute` checks the compute actions statically; :func:`check` replays the lowered lists
with blocking receives over FIFO links (:class:`.simulator.Simulator`) and asserts each event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Set, Tuple

from .actions import Action, Kind, Schedule, ScheduleError
from .simulator import RECVS, Event, Simulator, Stuck, done_keys


def validate_compute(sched: Schedule) -> None:
    """Static checks of the compute actions: ownership, ranges, each pass once, B/I after F, W after I, none
    missing (a forward-only schedule needs no backward)."""
    P, C, M = sched.num_ranks, sched.num_stages, sched.num_microbatches
    if C % P:
        raise ScheduleError(f"{C} stages are not a multiple of {P} ranks")
    seen: Dict[Tuple[int, str, int], int] = {}
    for r, acts in enumerate(sched.ranks):
        done = set()
        for i, a in enumerate(acts):
            if not a.is_compute:
                continue
            if not 0 <= a.stage < C or not 0 <= a.mb < M:
                raise ScheduleError(f"rank {r} action #{i} {a}: stage must be in [0,{C}) and microbatch in [0,{M})")
            if sched.rank_of(a.stage) != r:
                raise ScheduleError(
                    f"rank {r} action #{i} {a}: stage {a.stage} belongs to rank "
                    f"{sched.rank_of(a.stage)} ({sched.placement} placement)"
                )
            key = (a.stage, a.kind.value, a.mb)
            if key in seen:
                raise ScheduleError(
                    f"rank {r} action #{i} {a}: stage {a.stage} runs {a.kind.value} of microbatch {a.mb} twice"
                )
            seen[key] = r
            if a.kind in (Kind.B, Kind.I) and (a.stage, "F", a.mb) not in done:
                raise ScheduleError(
                    f"rank {r} action #{i} {a}: backward of stage {a.stage} microbatch {a.mb} comes before its forward"
                )
            if a.kind == Kind.W and (a.stage, "I", a.mb) not in done:
                raise ScheduleError(f"rank {r} action #{i} {a}: W before its I")
            if a.kind == Kind.I and (a.stage, "B", a.mb) in seen or a.kind == Kind.B and (a.stage, "I", a.mb) in seen:
                raise ScheduleError(f"rank {r} action #{i} {a}: stage {a.stage} microbatch {a.mb} has both B and I")
            done.add(key)
    forward_only = not any(k[1] in ("B", "I") for k in seen)
    for s in range(C):
        for m in range(M):
            if (s, "F", m) not in seen:
                raise ScheduleError(
                    f"stage {s} never runs the forward of microbatch {m} (expected on rank {sched.rank_of(s)})"
                )
            if forward_only:
                continue
            has_b, has_i, has_w = ((s, k, m) in seen for k in ("B", "I", "W"))
            if not (has_b or has_i):
                raise ScheduleError(
                    f"stage {s} never runs the backward of microbatch {m} (expected on rank {sched.rank_of(s)})"
                )
            if has_i != has_w:
                raise ScheduleError(f"stage {s} microbatch {m}: an I pass needs exactly one W pass")


@dataclass
class CheckReport:
    steps: int
    messages: int
    per_link: Dict[Tuple[int, int], int]


def check(sched: Schedule, layout=None) -> CheckReport:
    """Execute a lowered schedule (blocking receives, buffered sends, FIFO links) and verify it globally.

    Also verifies the compute part (:func:`validate_compute`) and, given a :class:`PipelineLayout`, that every
    cached block's gradient deposits are made before the stage that owns the block on that rank runs its
    backward (always true for valid orders; checked anyway).
    """
    if not sched.lowered:
        raise ScheduleError("check() needs a lowered schedule (with SEND/RECV actions); call lower() first")
    validate_compute(sched.compute_only())
    done: List[Set] = [set() for _ in range(sched.num_ranks)]  # compute keys run, per rank
    received: List[Set] = [set() for _ in range(sched.num_ranks)]
    sent: List[Set] = [set() for _ in range(sched.num_ranks)]
    grad_order: Dict[Tuple[int, int], int] = {}  # (stage, mb) -> how many compute actions ran before its B/I
    sim = Simulator(sched, greedy=True, reach=lambda r, i, a: _assert_own_rank(sched, r, i, a))
    steps = computed = 0
    try:
        for ev in sim.events():
            steps += 1
            a = ev.action
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                _assert_send(ev, done[ev.rank], sent[ev.rank])
            elif a.kind in RECVS:
                _assert_in_order(sched, ev)
                received[ev.rank].add((a.stage, a.kind.value, a.mb))
            else:
                _assert_inputs(sched, ev, done[ev.rank], received[ev.rank])
                done[ev.rank].update(done_keys(a))
                if a.kind in (Kind.B, Kind.I):
                    grad_order[(a.stage, a.mb)] = computed
                computed += 1
    except Stuck as stuck:
        raise ScheduleError(
            "deadlock: every unfinished rank waits on a receive that can never be satisfied:\n  "
            + "\n  ".join(
                f"rank {r} blocked at #{i} {a} (waits for rank {sched.rank_of(a.stage + RECVS[a.kind])})"
                for r, i, a in stuck.blocked
            )
        ) from None
    _assert_links_drained(sim)
    if layout is not None:
        _check_deposit_order(sched, layout, grad_order)
    return CheckReport(steps=steps, messages=sum(sim.sent.values()), per_link=dict(sim.sent))


def _assert_own_rank(sched: Schedule, r: int, i: int, a: Action) -> None:
    if sched.rank_of(a.stage) != r:
        raise ScheduleError(f"rank {r} action #{i} {a}: stage {a.stage} belongs to rank {sched.rank_of(a.stage)}")


def _assert_send(ev: Event, done: Set, sent: Set) -> None:
    a, fwd = ev.action, ev.action.kind == Kind.SEND_F
    if (a.stage, "F" if fwd else "G", a.mb) not in done:
        raise ScheduleError(
            f"rank {ev.rank} action #{ev.index} {a}: sends before computing {a.stage}{'F' if fwd else 'B/I'}{a.mb}"
        )
    key = (a.stage, a.kind.value, a.mb)
    if key in sent:
        raise ScheduleError(f"rank {ev.rank} action #{ev.index} {a}: sent twice")
    sent.add(key)


def _assert_in_order(sched: Schedule, ev: Event) -> None:
    if ev.message != ev.action:
        src = sched.rank_of(ev.action.stage + RECVS[ev.action.kind])
        raise ScheduleError(
            f"link {src}->{ev.rank} out of order: rank {ev.rank} action #{ev.index} posts {ev.action} (message "
            f"#{ev.seq} on that link) but rank {src} sent the message for {ev.message} "
            f"first; NCCL matches point-to-point messages by order, so both ends must agree"
        )


def _assert_inputs(sched: Schedule, ev: Event, done: Set, received: Set) -> None:
    """A compute action's input (activation or output gradient) was received, or computed on this rank."""
    r, i, a = ev.rank, ev.index, ev.action
    if a.kind == Kind.F and a.stage > 0:
        if sched.rank_of(a.stage - 1) != r and (a.stage, "RECV_F", a.mb) not in received:
            raise ScheduleError(
                f"rank {r} action #{i} {a}: its input was never received (no {a.stage}RECV_F{a.mb} before it)"
            )
        if sched.rank_of(a.stage - 1) == r and (a.stage - 1, "F", a.mb) not in done:
            raise ScheduleError(f"rank {r} action #{i} {a}: runs before {a.stage - 1}F{a.mb} on the same rank")
    if a.kind in (Kind.B, Kind.I) and a.stage < sched.num_stages - 1:
        if sched.rank_of(a.stage + 1) != r and (a.stage, "RECV_B", a.mb) not in received:
            raise ScheduleError(
                f"rank {r} action #{i} {a}: its output gradient was never received (no {a.stage}RECV_B{a.mb} before it)"
            )
        if sched.rank_of(a.stage + 1) == r and (a.stage + 1, "G", a.mb) not in done:
            raise ScheduleError(
                f"rank {r} action #{i} {a}: runs before the backward of stage {a.stage + 1} on the same rank"
            )


def _assert_links_drained(sim: Simulator) -> None:
    leftovers = {k: list(v) for k, v in sim.links.items() if v}
    if leftovers:
        (src, dst), msgs = next(iter(leftovers.items()))
        raise ScheduleError(f"link {src}->{dst}: {len(msgs)} message(s) never received, first for {msgs[0]}")


def _check_deposit_order(sched: Schedule, layout, grad_order: Dict[Tuple[int, int], int]) -> None:
    if not grad_order:
        return
    for r in range(sched.num_ranks):
        for b in range(layout.num_blocks):
            e = layout.entry(r, b)
            if e is None:
                continue
            for reader in layout.readers(r, b):
                for m in range(sched.num_microbatches):
                    if grad_order[(reader, m)] > grad_order[(e, m)]:
                        raise ScheduleError(
                            f"rank {r}: stage {reader} deposits the gradient of block {b} "
                            f"(microbatch {m}) after its entry stage {e} ran its backward"
                        )
