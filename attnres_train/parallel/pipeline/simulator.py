"""The one event simulator that lowering, checking and timing share (docs/pipeline.md, "Schedules as data").

Why one: each of them walks every rank's action list in dependency order; only what they do with a step differs.
:class:`Simulator` owns the walk (sweeps over the ranks, blocking on missing inputs, FIFO links, deadlock
detection) and yields :class:`Event` s (compute, send, receive) that the callers turn into a lowered schedule
(:mod:`.lowering`), assertions (:mod:`.checker`) or start times (:mod:`.timing`).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Iterator, List, Optional, Set, Tuple

from .actions import Action, Kind, Schedule, ScheduleError

Key = Tuple[int, str, int]  # (stage, kind, microbatch); kind "G" = the input gradient (made by B or I)
Link = Tuple[int, int]  # (source rank, destination rank)
SENDS = {Kind.SEND_F: (1, Kind.RECV_F), Kind.SEND_B: (-1, Kind.RECV_B)}  # kind -> (peer stage offset, receive)
RECVS = {Kind.RECV_F: -1, Kind.RECV_B: 1}  # kind -> source stage offset


def deps(a: Action, num_stages: int) -> List[Action]:
    """Cross-stage and same-stage compute actions ``a`` needs to have finished (``B`` of the next stage: B or I)."""
    if a.kind == Kind.F:
        return [Action(a.stage - 1, Kind.F, a.mb)] if a.stage > 0 else []
    if a.kind in (Kind.B, Kind.I):
        d = [Action(a.stage, Kind.F, a.mb)]
        if a.stage < num_stages - 1:
            d.append(Action(a.stage + 1, Kind.B, a.mb))  # B or I of the next stage: see dep_key
        return d
    if a.kind == Kind.W:
        return [Action(a.stage, Kind.I, a.mb)]
    raise AssertionError(a)


def dep_key(d: Action) -> Key:
    """The key a dependency from :func:`deps` is finished under (B and I both produce the input gradient "G")."""
    return (d.stage, "G", d.mb) if d.kind == Kind.B else (d.stage, d.kind.value, d.mb)


def done_keys(a: Action) -> List[Key]:
    """The keys a finished compute action provides (B and I also provide "G")."""
    keys = [(a.stage, a.kind.value, a.mb)]
    if a.kind in (Kind.B, Kind.I):
        keys.append((a.stage, "G", a.mb))
    return keys


@dataclass(frozen=True)
class Event:
    """One step of the walk. ``index`` is the action's position in its rank's list (``None`` for the sends and
    receives a compute-only schedule implies); a receive carries the ``message`` at the head of its link (what
    the sender sent) and ``seq``, how many messages that link delivered before."""

    rank: int
    index: Optional[int]
    action: Action
    message: Optional[Action] = None
    seq: int = 0


class Stuck(Exception):
    """No rank can run its next action; ``blocked`` lists ``(rank, index, action)`` of every unfinished rank."""

    def __init__(self, blocked: List[Tuple[int, int, Action]]):
        super().__init__(blocked)
        self.blocked = blocked


class Simulator:
    """Walks ``sched`` rank by rank in sweeps; each sweep runs one action per rank (``greedy=False``, the
    lowering's order) or as many as it can (``greedy=True``).

    Compute-only schedule: a compute action waits until its :func:`deps` have run (on any rank); a stage output
    bound for another rank yields a send event on the producer and the matching receive event on the consumer
    right after it. Lowered schedule: compute actions and sends never wait (the caller asserts their inputs);
    a receive waits for a message on its FIFO link. ``reach(rank, index, action)`` is called each time an action
    is about to be tried. Raises :class:`Stuck` on a deadlock; afterwards ``sent`` counts the messages per link
    and ``links`` holds those nobody received.
    """

    def __init__(self, sched: Schedule, *, greedy: bool, reach: Optional[Callable[[int, int, Action], None]] = None):
        self.sched = sched
        self.greedy = greedy
        self.reach = reach
        self.finished: Set[Key] = set()
        self.links: Dict[Link, Deque[Action]] = defaultdict(deque)
        self.sent: Dict[Link, int] = defaultdict(int)
        self.received: Dict[Link, int] = defaultdict(int)

    def missing(self, a: Action) -> List[Action]:
        return [d for d in deps(a, self.sched.num_stages) if dep_key(d) not in self.finished]

    def events(self) -> Iterator[Event]:
        s = self.sched
        ptr = [0] * s.num_ranks
        while any(ptr[r] < len(s.ranks[r]) for r in range(s.num_ranks)):
            progressed = False
            for r in range(s.num_ranks):
                while ptr[r] < len(s.ranks[r]):
                    i = ptr[r]
                    a = s.ranks[r][i]
                    if self.reach is not None:
                        self.reach(r, i, a)
                    if not a.is_compute:
                        check_peer(r, i, a, s.num_stages)
                    if a.is_compute:
                        if not s.lowered and self.missing(a):
                            break
                        yield Event(r, i, a)
                        self.finished.update(done_keys(a))
                        if not s.lowered:
                            yield from self._implied_messages(r, a)
                    elif a.kind in SENDS:
                        yield Event(r, i, a)
                        self._post(r, a)
                    else:
                        link = (s.rank_of(a.stage + RECVS[a.kind]), r)
                        if not self.links[link]:
                            break  # blocked until the message arrives
                        yield Event(r, i, a, message=self.links[link][0], seq=self.received[link])
                        self.links[link].popleft()
                        self.received[link] += 1
                    ptr[r] += 1
                    progressed = True
                    if not self.greedy:
                        break
            if not progressed:
                raise Stuck([(r, ptr[r], s.ranks[r][ptr[r]]) for r in range(s.num_ranks) if ptr[r] < len(s.ranks[r])])

    def _post(self, r: int, send: Action) -> None:
        offset, recv_kind = SENDS[send.kind]
        peer = send.stage + offset
        link = (r, self.sched.rank_of(peer))
        self.links[link].append(Action(peer, recv_kind, send.mb))
        self.sent[link] += 1

    def _implied_messages(self, r: int, a: Action) -> Iterator[Event]:
        """A compute-only schedule's send/receive pair for ``a``'s output, if its consumer is on another rank."""
        s = self.sched
        if a.kind == Kind.F and a.stage < s.num_stages - 1 and s.rank_of(a.stage + 1) != r:
            send, recv = Action(a.stage, Kind.SEND_F, a.mb), Action(a.stage + 1, Kind.RECV_F, a.mb)
        elif a.kind in (Kind.B, Kind.I) and a.stage > 0 and s.rank_of(a.stage - 1) != r:
            send, recv = Action(a.stage, Kind.SEND_B, a.mb), Action(a.stage - 1, Kind.RECV_B, a.mb)
        else:
            return
        yield Event(r, None, send)
        yield Event(s.rank_of(recv.stage), None, recv, message=recv)


def check_peer(r: int, i: int, a: Action, num_stages: int) -> None:
    """A send/receive must have a stage on the other end."""
    if a.kind in SENDS:
        if not 0 <= a.stage + SENDS[a.kind][0] < num_stages:
            raise ScheduleError(
                f"rank {r} action #{i} {a}: stage {a.stage} has no "
                f"{'next' if a.kind == Kind.SEND_F else 'previous'} stage to send to"
            )
    elif a.kind in RECVS and not 0 <= a.stage + RECVS[a.kind] < num_stages:
        raise ScheduleError(
            f"rank {r} action #{i} {a}: stage {a.stage} has no "
            f"{'previous' if a.kind == Kind.RECV_F else 'next'} stage to receive from"
        )
