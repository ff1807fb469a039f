"""Pipeline schedules as data: per-rank action lists, their lowering to sends/receives, and a global checker.

A schedule is a :class:`Schedule`: for every pipeline rank, an ordered list of :class:`Action` s. The action
strings follow ``torch.distributed.pipelining``'s IR (``"<stage><kind><microbatch>"`` with the *global* stage
index): ``2F0`` (stage 2 forward of microbatch 0), ``3B1`` (full backward), ``3I1``/``3W1`` (the zero-bubble
split into input- and weight-gradient passes), ``2SEND_F0`` (stage 2 sends its output of microbatch 0 to
stage 3), ``3RECV_F0`` (stage 3 receives its input), ``3SEND_B0`` (stage 3 sends the input gradient to stage
2), ``2RECV_B0`` (stage 2 receives its output gradient). Which rank runs stage ``s`` is the schedule's
``placement`` (:func:`.layout.placement_rank`): ``"loop"`` (rank ``s mod P``, Megatron and torch) for every
schedule except ZB-V, whose ``"v"`` placement puts stages r and 2P-1-r on rank r.

Generators (compute-only lists; :func:`lower` adds the communication):

* :func:`gpipe`: all forwards (chunk by chunk), then all backwards.
* :func:`one_f_one_b`: PipeDream-flush 1F1B (V = 1); warmup ``min(P-r-1, M)`` forwards on rank r.
* :func:`interleaved_1f1b`: Megatron's interleaved order (``get_schedule_table``): microbatches in groups of G
  (default G = P); within a group chunk 0 for every microbatch of the group, then chunk 1, ...; backward walks
  the same table with the chunk reversed; warmup ``min(2(P−r−1) + (V−1)·G, M·V)`` forwards on rank r, then
  1F1B pairs, then the remaining backwards. **Microbatch rule**: ``P ≤ G ≤ M`` and ``M mod G`` is 0 or ≥ P;
  with the default G = P that means *M must be a multiple of P*. For M a multiple of P the compute order is
  exactly that of ``torch.distributed.pipelining.ScheduleInterleaved1F1B`` (tests cross-check it).
* ``zb_h1`` / ``zb_v``: the zero-bubble schedules of arXiv 2401.10241, already split into I/W
  (:mod:`.zero_bubble`; ZB-V uses the V placement).
* :func:`split_backward`: turns every ``B`` into ``I`` (input gradients, on the critical path) plus a ``W``
  (weight gradients) ``w_delay`` compute slots later (or at the end) — the hook for zero-bubble variants.

:func:`lower` runs a global simulation (like torch's ``_add_send_recv``) that puts each SEND right after its
compute action and the matching RECV into the receiver's list at the simulated moment of the send, so every
link carries its messages in the same order on both ends (what NCCL needs; gloo matches on tags anyway).
:func:`check` executes a lowered schedule as a network of blocking receives over FIFO links and raises
:class:`ScheduleError` with a precise message for: a stage on the wrong rank, a missing/duplicate forward or
backward, backward before forward, a send before its compute, a receive that does not match the next message on
its link (order), a deadlock (every unfinished rank waits on a receive), or a message nobody receives.
:func:`.timing.timeline` replays the compute order with per-action costs to measure the bubble.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, Iterable, List, Optional, Tuple

from .layout import placement_rank


class ScheduleError(ValueError):
    """A schedule is malformed or cannot run (the message says which rank, action and why)."""


class Kind(str, Enum):
    F = "F"
    B = "B"
    I = "I"  # noqa: E741 - the zero-bubble name
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


COMPUTE = (Kind.F, Kind.B, Kind.I, Kind.W)
COMM = (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B)
_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


@dataclass(frozen=True)
class Action:
    stage: int
    kind: Kind
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.mb}"

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> "Action":
        m = _ACTION_RE.match(text.strip())
        if not m:
            raise ScheduleError(f"cannot parse action {text!r} (expected e.g. 2F0, 3B1, 2SEND_F0)")
        return cls(int(m.group(1)), Kind(m.group(2)), int(m.group(3)))

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE


def F(stage: int, mb: int) -> Action:
    return Action(stage, Kind.F, mb)


def B(stage: int, mb: int) -> Action:
    return Action(stage, Kind.B, mb)


@dataclass
class Schedule:
    """Per-rank action lists for ``num_ranks`` ranks, ``num_stages`` stages and ``num_microbatches``."""

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    ranks: List[List[Action]]
    lowered: bool = False
    meta: Dict = field(default_factory=dict)
    placement: str = "loop"  # which rank runs a stage (layout.placement_rank); must equal the layout's

    @property
    def virtual_stages(self) -> int:
        return self.num_stages // self.num_ranks

    def rank_of(self, stage: int) -> int:
        return placement_rank(stage, self.num_ranks, self.placement)

    def compute_only(self) -> "Schedule":
        return Schedule(self.name, self.num_ranks, self.num_stages, self.num_microbatches,
                        [[a for a in acts if a.is_compute] for acts in self.ranks], False, dict(self.meta),
                        self.placement)

    def format(self, compute_only: bool = False) -> str:
        head = (f"schedule {self.name}: P={self.num_ranks} V={self.virtual_stages} M={self.num_microbatches}"
                f"{' (lowered)' if self.lowered else ''}")
        lines = [head]
        for r, acts in enumerate(self.ranks):
            shown = [a for a in acts if a.is_compute] if compute_only else acts
            lines.append(f"rank {r}: " + " ".join(map(str, shown)))
        return "\n".join(lines)

    def to_csv(self) -> str:
        """One row per rank, one action per cell (torch's ``_dump_csv`` layout)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        for acts in self.ranks:
            w.writerow([str(a) for a in acts])
        return buf.getvalue()

    @classmethod
    def from_csv(cls, text: str, num_stages: int, num_microbatches: int, name: str = "csv",
                 placement: str = "loop") -> "Schedule":
        rows = [[Action.parse(c) for c in row if c.strip()] for row in csv.reader(io.StringIO(text)) if row]
        lowered = any(not a.is_compute for row in rows for a in row)
        return cls(name, len(rows), num_stages, num_microbatches, rows, lowered, placement=placement)


# ---------------------------------------------------------------------------- generators
def gpipe(P: int, V: int, M: int) -> Schedule:
    """All forwards (chunk 0 for every microbatch, then chunk 1, ...), then all backwards (last chunk first)."""
    _check_counts(P, V, M)
    ranks = []
    for r in range(P):
        fw = [F(v * P + r, m) for v in range(V) for m in range(M)]
        bw = [B(v * P + r, m) for v in reversed(range(V)) for m in range(M)]
        ranks.append(fw + bw)
    return Schedule("gpipe", P, P * V, M, ranks)


def forward_only(P: int, V: int, M: int, placement: str = "loop") -> Schedule:
    """Evaluation: the forward half of :func:`gpipe` (no backward, nothing saved), for either placement."""
    _check_counts(P, V, M)
    ranks = [[F(s, m) for s in range(P * V) if placement_rank(s, P, placement) == r for m in range(M)]
             for r in range(P)]
    return Schedule("forward_only", P, P * V, M, ranks, placement=placement)


def one_f_one_b(P: int, M: int) -> Schedule:
    """PipeDream-flush 1F1B (one chunk per rank): ``min(P-r-1, M)`` warmup forwards, 1F1B pairs, cooldown."""
    _check_counts(P, 1, M)
    ranks = []
    for r in range(P):
        warm = min(P - r - 1, M)
        acts = [F(r, m) for m in range(warm)]
        for k in range(M - warm):
            acts += [F(r, warm + k), B(r, k)]
        acts += [B(r, m) for m in range(M - warm, M)]
        ranks.append(acts)
    return Schedule("1f1b", P, P, M, ranks)


def megatron_table(M: int, V: int, G: int) -> List[Tuple[int, int]]:
    """Megatron's ``get_schedule_table``: the (microbatch, chunk) order of a rank's forwards."""
    table: List[Tuple[int, int]] = []
    for lo in range(0, M, G):
        hi = M if lo + G >= M else lo + G
        table += [(m, v) for v in range(V) for m in range(lo, hi)]
    return table


def interleaved_rule(P: int, M: int, G: Optional[int] = None) -> int:
    """Validate the microbatch count for interleaving and return the group size G (default P)."""
    G = P if G is None else G
    if not P <= G <= M:
        raise ScheduleError(f"interleaved 1F1B needs P <= G <= M (pipeline size P={P}, microbatch group G={G}, "
                            f"microbatches M={M}); use M >= P microbatches, a multiple of P")
    if M % G not in (0,) and M % G < P:
        raise ScheduleError(f"interleaved 1F1B needs M mod G == 0 or >= P (Megatron's rule): M={M}, G={G}, P={P}; "
                            f"with the default G=P use a multiple of P microbatches")
    return G


def interleaved_1f1b(P: int, V: int, M: int, group_size: Optional[int] = None) -> Schedule:
    """Megatron's interleaved 1F1B (see the module docstring); V = 1 falls back to :func:`one_f_one_b`."""
    if V == 1:
        return one_f_one_b(P, M)
    _check_counts(P, V, M)
    G = interleaved_rule(P, M, group_size)
    table = megatron_table(M, V, G)
    total = M * V
    ranks = []
    for r in range(P):
        fw = [F(v * P + r, m) for m, v in table]
        bw = [B((V - 1 - v) * P + r, m) for m, v in table]
        warm = min(2 * (P - r - 1) + (V - 1) * G, total)
        acts = fw[:warm]
        for k in range(total - warm):
            acts += [fw[warm + k], bw[k]]
        acts += bw[total - warm:]
        ranks.append(acts)
    return Schedule("interleaved_1f1b", P, P * V, M, ranks, meta={"group_size": G})


def split_backward(schedule: Schedule, w_delay: Optional[int] = None) -> Schedule:
    """Zero-bubble hook: each ``B`` becomes ``I`` (input grads) and a ``W`` (weight grads) placed ``w_delay``
    compute actions later on the same rank (``None``: all W at the end, in I order)."""
    if schedule.lowered:
        raise ScheduleError("split_backward works on compute-only schedules; split before lowering")
    ranks = []
    for acts in schedule.ranks:
        out: List[Action] = []
        pending: List[Tuple[int, Action]] = []  # (compute actions still to pass, W action)
        for a in acts:
            if a.kind == Kind.B:
                out.append(Action(a.stage, Kind.I, a.mb))
                if w_delay is not None:
                    pending.append((w_delay, Action(a.stage, Kind.W, a.mb)))
                else:
                    pending.append((-1, Action(a.stage, Kind.W, a.mb)))
                continue
            out.append(a)
            if w_delay is not None:
                keep = []
                for left, w in pending:
                    if left <= 0:
                        out.append(w)
                    else:
                        keep.append((left - 1, w))
                pending = keep
        out += [w for _, w in pending]
        ranks.append(out)
    return Schedule(schedule.name + "+iw", schedule.num_ranks, schedule.num_stages, schedule.num_microbatches, ranks,
                    meta={**schedule.meta, "w_delay": w_delay}, placement=schedule.placement)


SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v")
SCHEDULE_PLACEMENT = {"zb_v": "v"}  # everything else: loop
SCHEDULE_CHUNKS = {"1f1b": 1, "zb_h1": 1, "zb_v": 2}  # schedules that fix V (parallel.vpp)


def schedule_placement(name) -> str:
    """The stage placement a schedule needs (the layout must be built with it)."""
    return SCHEDULE_PLACEMENT.get(name, "loop") if isinstance(name, str) else getattr(name, "placement", "loop")


def make_schedule(name: str, P: int, V: int, M: int, group_size: Optional[int] = None,
                  split_iw: bool = False, w_delay: Optional[int] = None) -> Schedule:
    """Compute-only schedule by name (``gpipe``, ``1f1b`` (V = 1), ``interleaved_1f1b``, ``zb_h1`` (V = 1),
    ``zb_v`` (V = 2, V placement)); the zero-bubble ones are split into I/W already (``split_iw`` is refused)."""
    if name in ("zb_h1", "zb_v") and V != SCHEDULE_CHUNKS[name]:
        raise ScheduleError(f"{name} runs {SCHEDULE_CHUNKS[name]} chunk(s) per rank (virtual_stages), got V={V}")
    if name in ("zb_h1", "zb_v"):
        if split_iw:
            raise ScheduleError(f"{name} already splits every backward into I and W; split_backward has no effect")
        from .zero_bubble import zb_h1, zb_v  # zero_bubble builds on this module

        return zb_h1(P, M) if name == "zb_h1" else zb_v(P, M)
    if name == "gpipe":
        sched = gpipe(P, V, M)
    elif name == "1f1b":
        if V != 1:
            raise ScheduleError(f"1f1b runs one chunk per rank (virtual_stages=1), got V={V}; "
                                f"use interleaved_1f1b for V > 1")
        sched = one_f_one_b(P, M)
    elif name == "interleaved_1f1b":
        sched = interleaved_1f1b(P, V, M, group_size)
    else:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {'|'.join(SCHEDULES)}")
    return split_backward(sched, w_delay) if split_iw else sched


def _check_counts(P: int, V: int, M: int) -> None:
    for name, v in (("P", P), ("V", V), ("M", M)):
        if not isinstance(v, int) or v < 1:
            raise ScheduleError(f"{name} must be a positive integer, got {v!r}")


# ---------------------------------------------------------------------------- dependencies
def _deps(a: Action, C: int) -> List[Action]:
    """Cross-stage and same-stage compute actions ``a`` needs to have finished."""
    if a.kind == Kind.F:
        return [F(a.stage - 1, a.mb)] if a.stage > 0 else []
    if a.kind in (Kind.B, Kind.I):
        d = [F(a.stage, a.mb)]
        if a.stage < C - 1:
            d.append(Action(a.stage + 1, Kind.B, a.mb))  # B or I of the next stage (normalised below)
        return d
    if a.kind == Kind.W:
        return [Action(a.stage, Kind.I, a.mb)]
    raise AssertionError(a)


def _grad_done_key(a: Action) -> Tuple[int, str, int]:
    """B and I both produce the input gradient: index them together."""
    kind = "G" if a.kind in (Kind.B, Kind.I) else a.kind.value
    return (a.stage, kind, a.mb)


def _validate_compute(sched: Schedule) -> None:
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
                raise ScheduleError(f"rank {r} action #{i} {a}: stage {a.stage} belongs to rank "
                                    f"{sched.rank_of(a.stage)} ({sched.placement} placement)")
            key = (a.stage, a.kind.value, a.mb)
            if key in seen:
                raise ScheduleError(f"rank {r} action #{i} {a}: stage {a.stage} runs {a.kind.value} of microbatch "
                                    f"{a.mb} twice")
            seen[key] = r
            if a.kind in (Kind.B, Kind.I) and (a.stage, "F", a.mb) not in done:
                raise ScheduleError(f"rank {r} action #{i} {a}: backward of stage {a.stage} microbatch {a.mb} "
                                    f"comes before its forward")
            if a.kind == Kind.W and (a.stage, "I", a.mb) not in done:
                raise ScheduleError(f"rank {r} action #{i} {a}: W before its I")
            if a.kind == Kind.I and (a.stage, "B", a.mb) in seen or a.kind == Kind.B and (a.stage, "I", a.mb) in seen:
                raise ScheduleError(f"rank {r} action #{i} {a}: stage {a.stage} microbatch {a.mb} has both B and I")
            done.add(key)
    forward_only = not any(k[1] in ("B", "I") for k in seen)
    for s in range(C):
        for m in range(M):
            if (s, "F", m) not in seen:
                raise ScheduleError(f"stage {s} never runs the forward of microbatch {m} (expected on rank "
                                    f"{sched.rank_of(s)})")
            if forward_only:
                continue
            has_b, has_i, has_w = ((s, k, m) in seen for k in ("B", "I", "W"))
            if not (has_b or has_i):
                raise ScheduleError(f"stage {s} never runs the backward of microbatch {m} (expected on rank "
                                    f"{sched.rank_of(s)})")
            if has_i != has_w:
                raise ScheduleError(f"stage {s} microbatch {m}: an I pass needs exactly one W pass")


# ---------------------------------------------------------------------------- lowering
def lower(sched: Schedule) -> Schedule:
    """Insert SEND/RECV actions by a global simulation (consistent per-link order); raises on deadlock."""
    if sched.lowered:
        return sched
    _validate_compute(sched)
    P, C = sched.num_ranks, sched.num_stages
    ptr = [0] * P
    done = set()
    out: List[List[Action]] = [[] for _ in range(P)]
    total = sum(len(a) for a in sched.ranks)
    finished = 0
    while finished < total:
        progressed = False
        for r in range(P):
            if ptr[r] >= len(sched.ranks[r]):
                continue
            a = sched.ranks[r][ptr[r]]
            if not all(_grad_done_key(d) in done if d.kind == Kind.B else (d.stage, d.kind.value, d.mb) in done
                       for d in _deps(a, C)):
                continue
            out[r].append(a)
            done.add(_grad_done_key(a) if a.kind in (Kind.B, Kind.I) else (a.stage, a.kind.value, a.mb))
            if a.kind in (Kind.B, Kind.I):
                done.add((a.stage, a.kind.value, a.mb))
            ptr[r] += 1
            finished += 1
            progressed = True
            if a.kind == Kind.F and a.stage < C - 1 and sched.rank_of(a.stage + 1) != r:
                out[r].append(Action(a.stage, Kind.SEND_F, a.mb))
                out[sched.rank_of(a.stage + 1)].append(Action(a.stage + 1, Kind.RECV_F, a.mb))
            if a.kind in (Kind.B, Kind.I) and a.stage > 0 and sched.rank_of(a.stage - 1) != r:
                out[r].append(Action(a.stage, Kind.SEND_B, a.mb))
                out[sched.rank_of(a.stage - 1)].append(Action(a.stage - 1, Kind.RECV_B, a.mb))
        if not progressed:
            waits = []
            for r in range(P):
                if ptr[r] < len(sched.ranks[r]):
                    a = sched.ranks[r][ptr[r]]
                    missing = [d for d in _deps(a, C) if (_grad_done_key(d) if d.kind == Kind.B else
                                                         (d.stage, d.kind.value, d.mb)) not in done]
                    waits.append(f"rank {r} at #{ptr[r]} {a} waits for "
                                 + ", ".join(f"{d.stage}{'B/I' if d.kind == Kind.B else d.kind.value}{d.mb}"
                                             f" (rank {sched.rank_of(d.stage)})" for d in missing))
            raise ScheduleError(f"schedule {sched.name} deadlocks (no rank can run its next action):\n  "
                                + "\n  ".join(waits))
    return Schedule(sched.name, P, C, sched.num_microbatches, out, True, dict(sched.meta), sched.placement)


# ---------------------------------------------------------------------------- global checker
@dataclass
class CheckReport:
    steps: int
    messages: int
    per_link: Dict[Tuple[int, int], int]


def check(sched: Schedule, layout=None) -> CheckReport:
    """Execute a lowered schedule (blocking receives, buffered sends, FIFO links) and verify it globally.

    Also verifies the compute part (:func:`_validate_compute`) and, given a :class:`PipelineLayout`, that every
    cached block's gradient deposits are made before the stage that owns the block on that rank runs its
    backward (always true for valid orders; checked anyway).
    """
    if not sched.lowered:
        raise ScheduleError("check() needs a lowered schedule (with SEND/RECV actions); call lower() first")
    _validate_compute(sched.compute_only())
    P, C = sched.num_ranks, sched.num_stages
    links: Dict[Tuple[int, int], deque] = defaultdict(deque)
    sent_count: Dict[Tuple[int, int], int] = defaultdict(int)
    recv_count: Dict[Tuple[int, int], int] = defaultdict(int)
    ptr = [0] * P
    done: List[set] = [set() for _ in range(P)]
    received: List[set] = [set() for _ in range(P)]
    sent: List[set] = [set() for _ in range(P)]
    grad_time: Dict[Tuple[int, int], int] = {}
    clock = 0
    steps = 0
    while any(ptr[r] < len(sched.ranks[r]) for r in range(P)):
        progressed = False
        for r in range(P):
            while ptr[r] < len(sched.ranks[r]):
                i, a = ptr[r], sched.ranks[r][ptr[r]]
                if sched.rank_of(a.stage) != r:
                    raise ScheduleError(f"rank {r} action #{i} {a}: stage {a.stage} belongs to rank "
                                        f"{sched.rank_of(a.stage)}")
                if a.kind in (Kind.SEND_F, Kind.SEND_B):
                    fwd = a.kind == Kind.SEND_F
                    peer_stage = a.stage + 1 if fwd else a.stage - 1
                    need = "F" if fwd else "G"
                    if not 0 <= peer_stage < C:
                        raise ScheduleError(f"rank {r} action #{i} {a}: stage {a.stage} has no "
                                            f"{'next' if fwd else 'previous'} stage to send to")
                    if (a.stage, need, a.mb) not in done[r]:
                        raise ScheduleError(f"rank {r} action #{i} {a}: sends before computing "
                                            f"{a.stage}{'F' if fwd else 'B/I'}{a.mb}")
                    key = (a.stage, a.kind.value, a.mb)
                    if key in sent[r]:
                        raise ScheduleError(f"rank {r} action #{i} {a}: sent twice")
                    sent[r].add(key)
                    dst = sched.rank_of(peer_stage)
                    links[(r, dst)].append(Action(peer_stage, Kind.RECV_F if fwd else Kind.RECV_B, a.mb))
                    sent_count[(r, dst)] += 1
                elif a.kind in (Kind.RECV_F, Kind.RECV_B):
                    fwd = a.kind == Kind.RECV_F
                    src_stage = a.stage - 1 if fwd else a.stage + 1
                    if not 0 <= src_stage < C:
                        raise ScheduleError(f"rank {r} action #{i} {a}: stage {a.stage} has no "
                                            f"{'previous' if fwd else 'next'} stage to receive from")
                    src = sched.rank_of(src_stage)
                    q = links[(src, r)]
                    if not q:
                        break  # blocked
                    head = q[0]
                    if head != a:
                        raise ScheduleError(
                            f"link {src}->{r} out of order: rank {r} action #{i} posts {a} (message "
                            f"#{recv_count[(src, r)]} on that link) but rank {src} sent the message for {head} "
                            f"first; NCCL matches point-to-point messages by order, so both ends must agree")
                    q.popleft()
                    recv_count[(src, r)] += 1
                    received[r].add((a.stage, a.kind.value, a.mb))
                else:
                    if a.kind == Kind.F and a.stage > 0 and sched.rank_of(a.stage - 1) != r \
                            and (a.stage, "RECV_F", a.mb) not in received[r]:
                        raise ScheduleError(f"rank {r} action #{i} {a}: its input was never received "
                                            f"(no {a.stage}RECV_F{a.mb} before it)")
                    if a.kind == Kind.F and a.stage > 0 and sched.rank_of(a.stage - 1) == r \
                            and (a.stage - 1, "F", a.mb) not in done[r]:
                        raise ScheduleError(f"rank {r} action #{i} {a}: runs before {a.stage - 1}F{a.mb} on "
                                            f"the same rank")
                    if a.kind in (Kind.B, Kind.I) and a.stage < C - 1:
                        if sched.rank_of(a.stage + 1) != r and (a.stage, "RECV_B", a.mb) not in received[r]:
                            raise ScheduleError(f"rank {r} action #{i} {a}: its output gradient was never "
                                                f"received (no {a.stage}RECV_B{a.mb} before it)")
                        if sched.rank_of(a.stage + 1) == r and (a.stage + 1, "G", a.mb) not in done[r]:
                            raise ScheduleError(f"rank {r} action #{i} {a}: runs before the backward of stage "
                                                f"{a.stage + 1} on the same rank")
                    done[r].add((a.stage, a.kind.value, a.mb))
                    if a.kind in (Kind.B, Kind.I):
                        done[r].add((a.stage, "G", a.mb))
                        grad_time[(a.stage, a.mb)] = clock
                    clock += 1
                ptr[r] += 1
                progressed = True
                steps += 1
        if not progressed:
            waits = []
            for r in range(P):
                if ptr[r] < len(sched.ranks[r]):
                    a = sched.ranks[r][ptr[r]]
                    src_stage = a.stage - 1 if a.kind == Kind.RECV_F else a.stage + 1
                    waits.append(f"rank {r} blocked at #{ptr[r]} {a} (waits for rank {sched.rank_of(src_stage)})")
            raise ScheduleError("deadlock: every unfinished rank waits on a receive that can never be satisfied:\n  "
                                + "\n  ".join(waits))
    leftovers = {k: list(v) for k, v in links.items() if v}
    if leftovers:
        (src, dst), msgs = next(iter(leftovers.items()))
        raise ScheduleError(f"link {src}->{dst}: {len(msgs)} message(s) never received, first for {msgs[0]}")
    if layout is not None:
        _check_deposit_order(sched, layout, grad_time)
    return CheckReport(steps=steps, messages=sum(sent_count.values()), per_link=dict(sent_count))


def _check_deposit_order(sched: Schedule, layout, grad_time: Dict[Tuple[int, int], int]) -> None:
    if not grad_time:
        return
    for r in range(sched.num_ranks):
        for b in range(layout.num_blocks):
            e = layout.entry(r, b)
            if e is None:
                continue
            for reader in layout.readers(r, b):
                for m in range(sched.num_microbatches):
                    if grad_time[(reader, m)] > grad_time[(e, m)]:
                        raise ScheduleError(f"rank {r}: stage {reader} deposits the gradient of block {b} "
                                            f"(microbatch {m}) after its entry stage {e} ran its backward")


def iter_actions(sched: Schedule, rank: int, kinds: Iterable[Kind] = COMPUTE) -> List[Action]:
    kinds = set(kinds)
    return [a for a in sched.ranks[rank] if a.kind in kinds]
