"""Zero-bubble pipeline schedules (arXiv 2401.10241) as data: ZB-H1 and ZB-V in the same action IR.

Why a module of its own: these orders exist only with the backward split into ``I`` (critical path) and ``W``
(free to move), and ZB-V needs the V placement; lowering, checking and timing are reused unchanged. Both are
hand-written orders equal to ``torch.distributed.pipelining``'s ``ScheduleInterleavedZeroBubble`` (one chunk:
ZB-H1) and ``ScheduleZBVZeroBubble`` (tests cross-check them). The orders, their memory and the simulated
bubble figures: docs/pipeline.md, "Schedules (data)".
"""

from __future__ import annotations

from typing import List

from .actions import Action, Kind, Schedule, ScheduleError, check_counts


def _a(stage: int, kind: Kind, mb: int) -> Action:
    return Action(stage, kind, mb)


def zb_h1(P: int, M: int) -> Schedule:
    """ZB-H1 (torch's ZB1P with one local stage): see the module docstring."""
    check_counts(P, 1, M)
    ranks: List[List[Action]] = []
    for r in range(P):
        warm = min(P - 1 - r, M)
        acts = [_a(r, Kind.F, m) for m in range(warm)]
        f, i, w = warm, 0, 0
        for k in range(M):  # steady (k < M - warm: F then I) and cool-down (I only), W after r postponed
            if k < M - warm:
                acts.append(_a(r, Kind.F, f))
                f += 1
            acts.append(_a(r, Kind.I, i))
            i += 1
            if k >= r:
                acts.append(_a(r, Kind.W, w))
                w += 1
        acts += [_a(r, Kind.W, m) for m in range(w, M)]
        ranks.append(acts)
    return Schedule("zb_h1", P, P, M, ranks)


def zb_v(P: int, M: int) -> Schedule:
    """ZB-V (torch's ``ScheduleZBVZeroBubble`` order) in the V placement: see the module docstring."""
    check_counts(P, 2, M)
    C = 2 * P
    n = max(2 * P - 1, M)  # as torch: generate for enough microbatches to fill the V, then drop the extra ones
    ranks: List[List[Action]] = []
    for r in range(P):
        c0, c1 = r, C - 1 - r
        acts: List[Action] = []
        f0 = f1 = b0 = b1 = 0
        for _ in range(2 * (P - r) - 1):
            acts.append(_a(c0, Kind.F, f0))
            f0 += 1
        for _ in range(r):
            acts += [_a(c1, Kind.F, f1), _a(c0, Kind.F, f0)]
            f1 += 1
            f0 += 1
        for _ in range(P - r):
            acts += [_a(c1, Kind.F, f1), _a(c1, Kind.I, b1), _a(c1, Kind.W, b1)]
            f1 += 1
            b1 += 1
        while f1 < f0 or f0 < n:
            if f0 < n:
                acts.append(_a(c0, Kind.F, f0))
                f0 += 1
            acts += [_a(c0, Kind.I, b0), _a(c0, Kind.W, b0), _a(c1, Kind.F, f1), _a(c1, Kind.I, b1), _a(c1, Kind.W, b1)]
            b0 += 1
            f1 += 1
            b1 += 1
        w0, w1 = b0, b1
        for _ in range(r):
            acts += [_a(c0, Kind.I, b0), _a(c1, Kind.I, b1)]
            b0 += 1
            b1 += 1
        for _ in range(P - r):
            acts += [_a(c0, Kind.I, b0), _a(c0, Kind.W, w0)]
            b0 += 1
            w0 += 1
        acts += [_a(c1, Kind.W, m) for m in range(w1, b1)]
        acts += [_a(c0, Kind.W, m) for m in range(w0, b0)]
        if not (b0 == f0 == n and b1 == f1 == n):
            raise ScheduleError(f"zb_v generator lost actions on rank {r} (P={P}, M={M})")
        ranks.append([a for a in acts if a.mb < M])
    return Schedule("zb_v", P, C, M, ranks, placement="v")
