"""Schedules as data: generators vs torch's ScheduleInterleaved1F1B, the lowering, the global checker (which
must reject broken schedules with a clear message), the microbatch rule, CSV round trips and the bubble."""

from __future__ import annotations

import pytest

from attnres_train.parallel.pipeline.layout import PipelineLayout
from attnres_train.parallel.pipeline.schedules import (
    Action,
    Kind,
    Schedule,
    ScheduleError,
    check,
    gpipe,
    interleaved_1f1b,
    lower,
    make_schedule,
    one_f_one_b,
    split_backward,
)
from attnres_train.parallel.pipeline.timing import ideal_bubble, timeline
from tests.model.helpers import tiny_cfg


def torch_interleaved_order(P: int, V: int, M: int):
    """Compute order of torch.distributed.pipelining.ScheduleInterleaved1F1B (no stages needed: the
    per-rank planner only reads the sizes)."""
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B

    out = []
    for r in range(P):
        sched = ScheduleInterleaved1F1B.__new__(ScheduleInterleaved1F1B)
        sched.n_local_stages, sched.pp_group_size, sched._n_microbatches, sched.rank = V, P, M, r
        sched.number_of_rounds = max(1, M // P)
        sched.microbatches_per_round = M // sched.number_of_rounds
        out.append([str(a) for a in sched._calculate_single_rank_operations(r) if a is not None])
    return out


@pytest.mark.parametrize(
    "P,V,M", [(2, 2, 2), (2, 2, 4), (4, 2, 4), (4, 2, 8), (4, 3, 8), (2, 3, 6), (3, 2, 6), (4, 4, 12)]
)
def test_interleaved_matches_torch_compute_order(P, V, M):
    ours = [[str(a) for a in acts] for acts in interleaved_1f1b(P, V, M).ranks]
    assert ours == torch_interleaved_order(P, V, M)


def test_design_note_dump():
    # pipeline_cache.md §3.2: torch's P=2, V=2, M=4 rank-0 order
    want = "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3".split()
    assert [str(a) for a in interleaved_1f1b(2, 2, 4).ranks[0]] == want


@pytest.mark.parametrize(
    "name,P,V,M",
    [
        ("gpipe", 2, 1, 3),
        ("gpipe", 3, 2, 2),
        ("1f1b", 4, 1, 6),
        ("1f1b", 3, 1, 2),
        ("interleaved_1f1b", 4, 2, 8),
        ("interleaved_1f1b", 2, 3, 4),
        ("interleaved_1f1b", 4, 1, 3),
    ],
)
@pytest.mark.parametrize("split", [False, True])
def test_every_generator_lowers_and_checks(name, P, V, M, split):
    sched = make_schedule(name, P, V, M, split_iw=split, w_delay=1 if split else None)
    lowered = lower(sched)
    rep = check(lowered, PipelineLayout.from_model_config(tiny_cfg("block", None, 1, num_layers=P * V), P, V))
    assert rep.messages == 2 * M * (P * V - 1) if P > 1 else rep.messages == 0
    for src in range(P):  # every link carries the same messages in the same order on both ends
        for dst in range(P):
            sends = [
                (a.stage + (1 if a.kind == Kind.SEND_F else -1), a.kind.value[-1], a.mb)
                for a in lowered.ranks[src]
                if a.kind in (Kind.SEND_F, Kind.SEND_B)
                and lowered.rank_of(a.stage + (1 if a.kind == Kind.SEND_F else -1)) == dst
            ]
            recvs = [
                (a.stage, a.kind.value[-1], a.mb)
                for a in lowered.ranks[dst]
                if a.kind in (Kind.RECV_F, Kind.RECV_B)
                and lowered.rank_of(a.stage + (-1 if a.kind == Kind.RECV_F else 1)) == src
            ]
            assert sends == recvs, (src, dst)
    sent = sorted((a.stage, a.kind.value, a.mb) for acts in lowered.ranks for a in acts if a.kind == Kind.SEND_F)
    recv = sorted((a.stage - 1, "SEND_F", a.mb) for acts in lowered.ranks for a in acts if a.kind == Kind.RECV_F)
    assert sent == recv


@pytest.mark.parametrize("P,V,M", [(2, 2, 4), (4, 2, 8), (4, 4, 8), (8, 2, 16), (4, 3, 12)])
def test_simulated_bubble_equals_megatron_formula(P, V, M):
    assert timeline(interleaved_1f1b(P, V, M)).bubble_fraction == pytest.approx(ideal_bubble(P, V, M), abs=1e-12)
    assert timeline(one_f_one_b(P, M)).bubble_fraction == pytest.approx(ideal_bubble(P, 1, M), abs=1e-12)


def test_microbatch_rule():
    with pytest.raises(ScheduleError, match="multiple of P"):
        interleaved_1f1b(4, 2, 6)
    with pytest.raises(ScheduleError, match="P <= G <= M"):
        interleaved_1f1b(4, 2, 2)
    interleaved_1f1b(2, 2, 5, group_size=3)  # Megatron's own example: M mod G = 2 >= P is allowed
    check(lower(interleaved_1f1b(2, 2, 5, group_size=3)))
    with pytest.raises(ScheduleError, match="1f1b runs one chunk"):
        make_schedule("1f1b", 2, 2, 4)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        make_schedule("zbv", 2, 2, 4)


def test_csv_round_trip():
    lowered = lower(interleaved_1f1b(2, 2, 4))
    back = Schedule.from_csv(lowered.to_csv(), num_stages=4, num_microbatches=4)
    assert back.lowered and back.ranks == lowered.ranks
    check(back)
    assert Action.parse("12SEND_B3") == Action(12, Kind.SEND_B, 3) and str(Action(3, Kind.W, 1)) == "3W1"


def test_split_backward_puts_w_after_i():
    s = split_backward(interleaved_1f1b(2, 2, 4), w_delay=2)
    for acts in s.ranks:
        seen = set()
        for a in acts:
            if a.kind == Kind.W:
                assert (a.stage, a.mb) in seen
            if a.kind == Kind.I:
                seen.add((a.stage, a.mb))
    check(lower(s))


# ------------------------------------------------------------------------------------ broken schedules
def _sched(rows, P, V, M, lowered=False):
    return Schedule("broken", P, P * V, M, [[Action.parse(x) for x in row.split()] for row in rows], lowered)


def test_checker_rejects_a_deadlock():
    # rank 0 waits for stage 1's backward of mb 0 before sending mb 1; rank 1 wants mb 1 forward first
    s = _sched(["0F0 0B0 0F1 0B1", "1F0 1F1 1B0 1B1"], 2, 1, 2)
    with pytest.raises(
        ScheduleError,
        match=r"deadlocks[\s\S]*rank 0 at #1 0B0 waits for 1B/I0[\s\S]*rank 1 at #1 1F1 "
        r"waits for 0F1",
    ):
        lower(s)


def test_checker_rejects_backward_before_forward_and_missing_work():
    with pytest.raises(ScheduleError, match="backward of stage 0 microbatch 0 comes before its forward"):
        lower(_sched(["0B0 0F0", "1F0 1B0"], 2, 1, 1))
    with pytest.raises(ScheduleError, match="stage 1 never runs the backward of microbatch 0"):
        lower(_sched(["0F0 0B0", "1F0"], 2, 1, 1))
    with pytest.raises(ScheduleError, match="stage 1 belongs to rank 1"):
        lower(_sched(["0F0 1F0 1B0 0B0", ""], 2, 1, 1))
    with pytest.raises(ScheduleError, match="twice"):
        lower(_sched(["0F0 0F0 0B0", "1F0 1B0"], 2, 1, 1))


def test_checker_rejects_out_of_order_messages():
    lowered = lower(interleaved_1f1b(2, 2, 4))
    rows = [list(acts) for acts in lowered.ranks]
    i, j = [k for k, a in enumerate(rows[1]) if a.kind == Kind.RECV_F][:2]
    rows[1][i], rows[1][j] = rows[1][j], rows[1][i]
    bad = Schedule("swapped", 2, 4, 4, rows, True)
    with pytest.raises(
        ScheduleError,
        match=r"link 0->1 out of order: rank 1 .* posts 1RECV_F1 .* sent the message "
        r"for 1RECV_F0 first",
    ):
        check(bad)


def test_checker_rejects_a_missing_receive_and_an_unreceived_message():
    lowered = lower(one_f_one_b(2, 2))
    rows = [list(acts) for acts in lowered.ranks]
    k = next(k for k, a in enumerate(rows[1]) if a.kind == Kind.RECV_F and a.mb == 1)
    del rows[1][k]
    with pytest.raises(ScheduleError, match="its input was never received"):
        check(Schedule("norecv", 2, 2, 2, rows, True))
    rows = [list(acts) for acts in lowered.ranks]
    rows[0].append(Action(0, Kind.SEND_F, 1))
    with pytest.raises(ScheduleError, match="sent twice"):
        check(Schedule("dup", 2, 2, 2, rows, True))


def test_gpipe_and_1f1b_bubbles():
    assert timeline(gpipe(4, 1, 8)).bubble_fraction == pytest.approx(3 / 11)
    assert timeline(one_f_one_b(4, 8)).bubble_fraction == pytest.approx(3 / 11)
