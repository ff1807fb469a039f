"""The one event simulator (lowering, checking and timing walk schedules with it) and the schedule-name registry.

Independent references: the dependency rule is written out here (own loops over the per-rank lists), and the
registry is compared with the config's choice list, never with itself.
"""

from __future__ import annotations

import pytest

from attnres_train.config.pipeline import PIPELINE_SCHEDULES, PipelineConfig, validate_pipeline_config
from attnres_train.parallel.pipeline.schedules import GENERATORS, SCHEDULES, Kind, check, lower, make_schedule
from attnres_train.parallel.pipeline.simulator import Simulator


def _needs(stage: int, kind: str, mb: int, num_stages: int):
    """What a compute pass waits for, as sets of alternatives: F needs the previous stage's F; B/I need their
    own F and the next stage's B or I; W needs its own I."""
    if kind == "F":
        return [{(stage - 1, "F", mb)}] if stage > 0 else []
    if kind in ("B", "I"):
        own = [{(stage, "F", mb)}]
        return own + ([{(stage + 1, "B", mb), (stage + 1, "I", mb)}] if stage < num_stages - 1 else [])
    return [{(stage, "I", mb)}]


@pytest.mark.parametrize(
    "name,P,V,M,split",
    [
        ("interleaved_1f1b", 2, 2, 4, False),
        ("interleaved_1f1b", 4, 2, 8, True),
        ("gpipe", 3, 2, 2, False),
        ("zb_v", 3, 2, 5, False),
        ("zb_h1", 4, 1, 6, False),
    ],
)
@pytest.mark.parametrize("greedy", [False, True])
def test_compute_events_follow_dependencies_and_rank_order(name, P, V, M, split, greedy):
    sched = make_schedule(name, P, V, M, split_iw=split, w_delay=1 if split else None)
    ran, per_rank, messages = set(), [[] for _ in range(P)], []
    for ev in Simulator(sched, greedy=greedy).events():
        a = ev.action
        if a.kind in (Kind.SEND_F, Kind.SEND_B, Kind.RECV_F, Kind.RECV_B):
            messages.append((ev.rank, str(a)))
            continue
        for alternatives in _needs(a.stage, a.kind.value, a.mb, sched.num_stages):
            assert alternatives & ran, f"{a} ran before any of {alternatives}"
        ran.add((a.stage, a.kind.value, a.mb))
        per_rank[ev.rank].append(a)
    assert per_rank == sched.ranks  # every action once, each rank in its own order
    # a cross-rank hop implies one send on the producer and one receive on the consumer, right after it
    hops = sum(
        1
        for acts in sched.ranks
        for a in acts
        if (
            a.kind == Kind.F and a.stage < sched.num_stages - 1 and sched.rank_of(a.stage + 1) != sched.rank_of(a.stage)
        )
        or (a.kind in (Kind.B, Kind.I) and a.stage > 0 and sched.rank_of(a.stage - 1) != sched.rank_of(a.stage))
    )
    assert len(messages) == 2 * hops


def test_lowered_receives_get_the_message_at_the_head_of_their_link():
    lowered = lower(make_schedule("interleaved_1f1b", 2, 2, 4))
    seen = 0
    for ev in Simulator(lowered, greedy=True).events():
        if ev.action.kind in (Kind.RECV_F, Kind.RECV_B):
            assert ev.message == ev.action
            seen += 1
    assert seen == sum(1 for acts in lowered.ranks for a in acts if a.kind in (Kind.RECV_F, Kind.RECV_B)) > 0


def test_generator_registry_is_the_config_choice_list():
    assert tuple(GENERATORS) == PIPELINE_SCHEDULES and SCHEDULES == PIPELINE_SCHEDULES
    for name in PIPELINE_SCHEDULES:  # every name the config accepts has a generator that runs
        vpp = {"1f1b": 1, "zb_h1": 1}.get(name, 2)
        validate_pipeline_config(PipelineConfig(schedule=name), pp=2, vpp=vpp, num_layers=8, microbatches=4)
        check(lower(make_schedule(name, 2, vpp, 4)))
