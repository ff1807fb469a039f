"""DualPipeV (DeepSeek-V3, arXiv 2412.19437; the "cut-in-half" DualPipe) as data, in the V placement.

Why a module of its own: like the zero-bubble orders it exists only with the V placement and a backward that is
partly split into ``I`` and ``W``; lowering, checking, timing and the runtime are reused unchanged. The order is
``torch.distributed.pipelining.ScheduleDualPipeV``'s (itself DeepSeek's ``dualpipev.py``), with each overlapped
forward+backward pair run one after the other (forward first): our ranks run one action at a time, so the
overlap of one microbatch's forward with another's backward (DualPipe's point) is not modelled (docs/pipeline.md,
"Schedules (data)").
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Tuple

from .actions import Action, Kind, Schedule, ScheduleError, check_counts


def dualpipev(P: int, M: int) -> Schedule:
    """DualPipeV on ``P`` ranks (rank r: stages r and 2P−1−r), ``M >= 2P`` microbatches."""
    check_counts(P, 2, M)
    if M < 2 * P:
        raise ScheduleError(f"dualpipev needs at least 2P = {2 * P} microbatches (one per stage), got M={M}")
    return Schedule("dualpipev", P, 2 * P, M, [_rank_order(P, M, r) for r in range(P)], placement="v")


def _rank_order(P: int, M: int, r: int) -> List[Action]:
    C = 2 * P
    s0, s1 = r, C - 1 - r
    acts: List[Action] = []
    nxt: Dict[Tuple[int, str], int] = {}  # (stage, "F" | "G") -> next microbatch (B and I share "G")
    pending: Deque[Tuple[int, int]] = deque()  # (stage, mb) whose I ran and whose W has not

    def add(stage: int, kind: Kind) -> None:
        key = (stage, "F" if kind == Kind.F else "G")
        m = nxt.get(key, 0)
        nxt[key] = m + 1
        acts.append(Action(stage, kind, m))
        if kind == Kind.I:
            pending.append((stage, m))

    def weight() -> None:  # the oldest pending W, if any
        if pending:
            stage, m = pending.popleft()
            acts.append(Action(stage, Kind.W, m))

    for _ in range(2 * (P - r - 1)):  # 1: chunk-0 forwards
        add(s0, Kind.F)
    for _ in range(r + 1):  # 2: F0 F1
        add(s0, Kind.F)
        add(s1, Kind.F)
    for _ in range(P - r - 1):  # 3: I1 W1 F1 (zero bubble)
        add(s1, Kind.I)
        weight()
        add(s1, Kind.F)
    for _ in range(M - C + r + 1):  # 4, the main step: (F0, B1) then (F1, B0)
        add(s0, Kind.F)
        add(s1, Kind.B)
        add(s1, Kind.F)
        add(s0, Kind.B)
    for _ in range(P - r - 1):  # 5: B1, then (F1, B0)
        add(s1, Kind.B)
        add(s1, Kind.F)
        add(s0, Kind.B)
    split = False  # 6: B1 B0, the second half split into I (W later)
    for i in range(r + 1):
        if i == (r + 1) // 2 and r % 2 == 1:
            split = True
        add(s1, Kind.I if split else Kind.B)
        if i == (r + 1) // 2 and r % 2 == 0:
            split = True
        add(s0, Kind.I if split else Kind.B)
    for _ in range(P - r - 1):  # 7: W, I0
        weight()
        add(s0, Kind.I if split else Kind.B)
    for _ in range(r + 1):  # 8: the remaining W
        weight()
    if pending or any(nxt.get((s, k), 0) != M for s in (s0, s1) for k in ("F", "G")):
        raise ScheduleError(f"dualpipev generator lost actions on rank {r} (P={P}, M={M})")
    return acts
