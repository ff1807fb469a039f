"""The schedule API in one import: representation, generators, lowering, checking (docs/pipeline.md).

Why a module of its own: callers outside the schedule code (the runtime, ``attnres-plan``, benches, tests) need
one stable place to import from, while the parts live apart: :mod:`.actions` (the IR), :mod:`.generators` (and
:mod:`.zero_bubble`), :mod:`.simulator` (the one event walk), :mod:`.lowering`, :mod:`.checker` and
:mod:`.timing` (which is imported from its own module).
"""

from .actions import COMM, COMPUTE, Action, B, F, Kind, Schedule, ScheduleError, iter_actions
from .checker import CheckReport, check, validate_compute
from .generators import (
    GENERATORS,
    SCHEDULE_CHUNKS,
    SCHEDULE_PLACEMENT,
    SCHEDULES,
    forward_only,
    gpipe,
    interleaved_1f1b,
    interleaved_rule,
    make_schedule,
    megatron_table,
    one_f_one_b,
    schedule_placement,
    split_backward,
)
from .lowering import lower

__all__ = [
    "COMM",
    "COMPUTE",
    "GENERATORS",
    "SCHEDULES",
    "SCHEDULE_CHUNKS",
    "SCHEDULE_PLACEMENT",
    "Action",
    "B",
    "CheckReport",
    "F",
    "Kind",
    "Schedule",
    "ScheduleError",
    "check",
    "forward_only",
    "gpipe",
    "interleaved_1f1b",
    "interleaved_rule",
    "iter_actions",
    "lower",
    "make_schedule",
    "megatron_table",
    "one_f_one_b",
    "schedule_placement",
    "split_backward",
    "validate_compute",
]
