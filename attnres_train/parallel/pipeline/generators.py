"""Schedule generators (compute-only action lists) and their registry, the one map from a schedule name to code.

Why a module of its own: a new schedule is one generator plus one ``GENERATORS`` entry (and its name in
``config.pipeline.PIPELINE_SCHEDULES``, which the registry must cover exactly); lowering, checking and timing
need nothing new. The orders (GPipe, 1F1B, Megatron's interleaved 1F1B and its microbatch rule, the I/W split)
are described in docs/pipeline.md, "Schedules as data"; the zero-bubble orders live in :mod:`.zero_bubble`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from ...config.pipeline import PIPELINE_SCHEDULES, SCHEDULE_CHUNKS, ZERO_BUBBLE, interleaved_rule_broken
from .actions import Action, B, F, Kind, Schedule, ScheduleError, check_counts
from .dualpipe import dualpipev
from .layout import placement_rank
from .zero_bubble import zb_h1, zb_v


def gpipe(P: int, V: int, M: int) -> Schedule:
    """All forwards (chunk 0 for every microbatch, then chunk 1, ...), then all backwards (last chunk first)."""
    check_counts(P, V, M)
    ranks = []
    for r in range(P):
        fw = [F(v * P + r, m) for v in range(V) for m in range(M)]
        bw = [B(v * P + r, m) for v in reversed(range(V)) for m in range(M)]
        ranks.append(fw + bw)
    return Schedule("gpipe", P, P * V, M, ranks)


def forward_only(P: int, V: int, M: int, placement: str = "loop") -> Schedule:
    """Evaluation: the forward half of :func:`gpipe` (no backward, nothing saved), for either placement."""
    check_counts(P, V, M)
    ranks = [
        [F(s, m) for s in range(P * V) if placement_rank(s, P, placement) == r for m in range(M)] for r in range(P)
    ]
    return Schedule("forward_only", P, P * V, M, ranks, placement=placement)


def one_f_one_b(P: int, M: int) -> Schedule:
    """PipeDream-flush 1F1B (one chunk per rank): ``min(P-r-1, M)`` warmup forwards, 1F1B pairs, cooldown."""
    check_counts(P, 1, M)
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
    broken = interleaved_rule_broken(P, M, G)
    if broken == "range":
        raise ScheduleError(
            f"interleaved 1F1B needs P <= G <= M (pipeline size P={P}, microbatch group G={G}, "
            f"microbatches M={M}); use M >= P microbatches, a multiple of P"
        )
    if broken == "remainder":
        raise ScheduleError(
            f"interleaved 1F1B needs M mod G == 0 or >= P (Megatron's rule): M={M}, G={G}, P={P}; "
            f"with the default G=P use a multiple of P microbatches"
        )
    return G


def interleaved_1f1b(P: int, V: int, M: int, group_size: Optional[int] = None) -> Schedule:
    """Megatron's interleaved 1F1B (see the module docstring); V = 1 falls back to :func:`one_f_one_b`."""
    if V == 1:
        return one_f_one_b(P, M)
    check_counts(P, V, M)
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
        acts += bw[total - warm :]
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
    return Schedule(
        schedule.name + "+iw",
        schedule.num_ranks,
        schedule.num_stages,
        schedule.num_microbatches,
        ranks,
        meta={**schedule.meta, "w_delay": w_delay},
        placement=schedule.placement,
    )


def _gpipe(P: int, V: int, M: int, group_size: Optional[int]) -> Schedule:
    return gpipe(P, V, M)


def _one_f_one_b(P: int, V: int, M: int, group_size: Optional[int]) -> Schedule:
    if V != 1:
        raise ScheduleError(
            f"1f1b runs one chunk per rank (virtual_stages=1), got V={V}; use interleaved_1f1b for V > 1"
        )
    return one_f_one_b(P, M)


def _zero_bubble(gen: Callable[[int, int], Schedule]) -> Callable[..., Schedule]:
    return lambda P, V, M, group_size: gen(P, M)


# name -> (P, V, M, group_size) -> compute-only Schedule; exactly the names of config.pipeline.PIPELINE_SCHEDULES
GENERATORS: Dict[str, Callable[[int, int, int, Optional[int]], Schedule]] = {
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zb_h1": _zero_bubble(zb_h1),
    "zb_v": _zero_bubble(zb_v),
    "dualpipev": _zero_bubble(dualpipev),
}
if tuple(GENERATORS) != PIPELINE_SCHEDULES:
    raise AssertionError(
        f"schedule generators {tuple(GENERATORS)} != config.pipeline.PIPELINE_SCHEDULES "
        f"{PIPELINE_SCHEDULES}: register a generator for every configurable schedule"
    )
SCHEDULES = PIPELINE_SCHEDULES
SCHEDULE_PLACEMENT = {"zb_v": "v", "dualpipev": "v"}  # everything else: loop


def schedule_placement(name) -> str:
    """The stage placement a schedule needs (the layout must be built with it)."""
    return SCHEDULE_PLACEMENT.get(name, "loop") if isinstance(name, str) else getattr(name, "placement", "loop")


def make_schedule(
    name: str,
    P: int,
    V: int,
    M: int,
    group_size: Optional[int] = None,
    split_iw: bool = False,
    w_delay: Optional[int] = None,
) -> Schedule:
    """Compute-only schedule by name (``gpipe``, ``1f1b`` (V = 1), ``interleaved_1f1b``, ``zb_h1`` (V = 1),
    ``zb_v`` and ``dualpipev`` (V = 2, V placement)); the zero-bubble ones are split into I/W already
    (``split_iw`` is refused)."""
    if name in ZERO_BUBBLE and V != SCHEDULE_CHUNKS[name]:
        raise ScheduleError(f"{name} runs {SCHEDULE_CHUNKS[name]} chunk(s) per rank (virtual_stages), got V={V}")
    if name in ZERO_BUBBLE and split_iw:
        raise ScheduleError(f"{name} already splits every backward into I and W; split_backward has no effect")
    if name not in GENERATORS:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {'|'.join(SCHEDULES)}")
    sched = GENERATORS[name](P, V, M, group_size)
    return split_backward(sched, w_delay) if split_iw else sched
