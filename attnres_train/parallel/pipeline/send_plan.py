"""When a pipeline rank may drop a send buffer: pure functions of the lowered schedule (no process group).

Why: gloo reports a send complete only from ``wait()``, and waiting at the wrong moment can deadlock. From the
lowered action lists of all ranks we know when the peer has provably posted the matching receive, and so when
``wait()`` returns at once; and the schedule's in-flight depth bounds how many sends a rank keeps (docs/pipeline.md,
"Memory").
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

from .actions import Action, Kind, Schedule
from .layout import PipelineLayout


def inflight_depth(sched: Schedule, rank: int) -> int:
    """The most (stage, microbatch) forwards ``rank`` holds at once: forwards run minus last backward passes
    (B, or W when the backward is split; DualPipeV has both)."""
    depth = peak = 0
    for a in sched.ranks[rank]:
        depth += (a.kind == Kind.F) - (a.kind in (Kind.B, Kind.W))
        peak = max(peak, depth)
    return peak


def safe_send_waits(sched: Schedule, layout: PipelineLayout, me: int) -> Dict[tuple, List[tuple]]:
    """``recv key -> sends of rank me that are safe to wait once that message has arrived``.

    A send to rank q is *safe* (its ``wait`` returns without q's further progress) once q has posted the
    matching receive. q posted it before every action after it in q's list, so once ``me`` has received a
    message that q sent later than that receive, the send is safe. Keys are ``(kind, stage, mb)``.
    """
    L = layout
    pos = [{(a.stage, a.kind, a.mb): i for i, a in enumerate(acts)} for acts in sched.ranks]

    def to_me(a: Action) -> Optional[tuple]:  # the receive key on this rank of q's send ``a``, if it is to us
        if a.kind == Kind.SEND_F and L.rank_of(a.stage + 1) == me:
            return ("F", a.stage + 1, a.mb)
        if a.kind == Kind.SEND_B and L.rank_of(a.stage - 1) == me:
            return ("B", a.stage - 1, a.mb)
        return None

    nxt: Dict[int, List[Optional[tuple]]] = {}  # q -> [first message q sends to us at or after index i]
    for q, acts in enumerate(sched.ranks):
        if q == me:
            continue
        col: List[Optional[tuple]] = [None] * (len(acts) + 1)
        for i in range(len(acts) - 1, -1, -1):
            col[i] = to_me(acts[i]) or col[i + 1]
        nxt[q] = col
    safe: Dict[tuple, List[tuple]] = defaultdict(list)
    for a in sched.ranks[me]:
        if a.kind == Kind.SEND_F:
            kind, peer_stage, peer_kind = "F", a.stage + 1, Kind.RECV_F
        elif a.kind == Kind.SEND_B:
            kind, peer_stage, peer_kind = "B", a.stage - 1, Kind.RECV_B
        else:
            continue
        q = L.rank_of(peer_stage)
        j = pos[q].get((peer_stage, peer_kind, a.mb))
        later = nxt[q][j + 1] if j is not None else None
        if later is not None:
            safe[later].append((kind, a.stage, a.mb))
    return dict(safe)


def held_bytes_bound(lowered: Schedule, layout: PipelineLayout, rank: int, unit_bytes: int) -> int:
    """Upper bound on the bytes the runtime holds on ``rank`` at any time in a step (docs/pipeline.md "Memory";
    checked against the measured ``held_peak`` in tests/pipeline/test_runtime_memory.py): with ``u`` the bytes of
    one block tensor, ``Pmax`` the largest hop payload (tensors), ``Nb`` the model's block tensors, ``D`` the
    in-flight depth, ``K = max(2, D)`` the send cap and ``Q`` the most receives posted but not yet consumed::

        u * ((K + 1) * Pmax + Q * Pmax + D * (Pmax + 2 * Nb)) + 64 * D

    Every term is a schedule depth times a payload: nothing grows with the number of microbatches."""
    D = inflight_depth(lowered, rank)
    unconsumed, Q = set(), 0
    for a in lowered.ranks[rank]:
        if a.kind in (Kind.RECV_F, Kind.RECV_B):
            unconsumed.add(("F" if a.kind == Kind.RECV_F else "B", a.stage, a.mb))
        elif a.kind == Kind.F:
            unconsumed.discard(("F", a.stage, a.mb))
        elif a.kind in (Kind.B, Kind.I):
            unconsumed.discard(("B", a.stage, a.mb))
        Q = max(Q, len(unconsumed))
    p_max = max((layout.payload_len(s) for s in range(layout.num_stages - 1)), default=0)
    K = max(2, D)
    return unit_bytes * ((K + 1) * p_max + Q * p_max + D * (p_max + 2 * layout.num_blocks)) + 64 * D
