"""Pipeline parallelism with our own schedules: interleaved 1F1B with cross-stage AttnRes block caching.

* :mod:`.layout`    — layer→stage map and the per-hop block sets / message shapes (static, no negotiation).
* :mod:`.schedules` — the schedule API: action lists as data (:mod:`.actions`), generators (:mod:`.generators`,
  :mod:`.zero_bubble`), one event simulator (:mod:`.simulator`) behind lowering, the checker and :mod:`.timing`.
* :mod:`.cache`     — the per-rank block cache keyed by (microbatch, block) and the gradient deposits.
* :mod:`.stage`     — :class:`PipelineStageModule`, a stage's chunk of the full model (shared parameters).
* :mod:`.runtime`   — :class:`PipelineRuntime` / :func:`pipeline_step` executing a schedule over c10d P2P.

See docs/pipeline.md.
"""

from .cache import BlockCache
from .layout import PipelineLayout, balanced_split
from .runtime import CommStats, PipelineError, PipelineRuntime, StepResult, pipeline_step
from .schedules import Action, Kind, Schedule, ScheduleError, check, lower, make_schedule
from .stage import PipelineStageModule, build_stages, materialize_stages
from .timing import timeline

__all__ = [
    "Action",
    "BlockCache",
    "CommStats",
    "Kind",
    "PipelineError",
    "PipelineLayout",
    "PipelineRuntime",
    "PipelineStageModule",
    "Schedule",
    "ScheduleError",
    "StepResult",
    "balanced_split",
    "build_stages",
    "check",
    "lower",
    "make_schedule",
    "materialize_stages",
    "pipeline_step",
    "timeline",
]
