"""The schedule representation: actions, per-rank action lists (:class:`Schedule`) and their text/CSV forms.

Why a module of its own: generators, the event simulator, lowering, checking, timing and the runtime all speak
this IR and nothing else; it depends on nothing but the stage placement. Action strings follow
``torch.distributed.pipelining``'s IR (``2F0``, ``3I1``, ``2SEND_F0`` ...): docs/pipeline.md, "Schedules as data".
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, Iterable, List

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
        return Schedule(
            self.name,
            self.num_ranks,
            self.num_stages,
            self.num_microbatches,
            [[a for a in acts if a.is_compute] for acts in self.ranks],
            False,
            dict(self.meta),
            self.placement,
        )

    def format(self, compute_only: bool = False) -> str:
        head = (
            f"schedule {self.name}: P={self.num_ranks} V={self.virtual_stages} M={self.num_microbatches}"
            f"{' (lowered)' if self.lowered else ''}"
        )
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
    def from_csv(
        cls, text: str, num_stages: int, num_microbatches: int, name: str = "csv", placement: str = "loop"
    ) -> "Schedule":
        rows = [[Action.parse(c) for c in row if c.strip()] for row in csv.reader(io.StringIO(text)) if row]
        lowered = any(not a.is_compute for row in rows for a in row)
        return cls(name, len(rows), num_stages, num_microbatches, rows, lowered, placement=placement)


def check_counts(P: int, V: int, M: int) -> None:
    for name, v in (("P", P), ("V", V), ("M", M)):
        if not isinstance(v, int) or v < 1:
            raise ScheduleError(f"{name} must be a positive integer, got {v!r}")


def iter_actions(sched: Schedule, rank: int, kinds: Iterable[Kind] = COMPUTE) -> List[Action]:
    kinds = set(kinds)
    return [a for a in sched.ranks[rank] if a.kind in kinds]
