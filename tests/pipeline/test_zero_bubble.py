"""Zero-bubble schedules (ZB-H1, ZB-V) as data, the V placement, and the block cache on it.

Independent references: the simulated figures are checked against closed forms written here (1F1B's
(P−1)(F+B), ZB-H1's (P−1)(F+I−W), the ZB-V lower bound "the last rank idles until its first input arrives");
the orders against ``torch.distributed.pipelining``'s own generators; the hop volumes against a brute-force
"what has this rank already seen" walk that rebuilds the block membership of every sublayer from the model
config (own placement function, own block arithmetic), never from the layout's tables.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from attnres_train.config.errors import ConfigError
from attnres_train.config.pipeline import PipelineConfig, validate_pipeline_config
from attnres_train.parallel.pipeline import PipelineLayout
from attnres_train.parallel.pipeline.schedules import (
    Kind,
    ScheduleError,
    check,
    lower,
    make_schedule,
    one_f_one_b,
)
from attnres_train.parallel.pipeline.timing import timeline
from attnres_train.parallel.pipeline.zero_bubble import zb_h1, zb_v
from tests.model.helpers import tiny_cfg


# ------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9])
def test_zero_bubble_orders_lower_and_check(P, M):
    for sched in (zb_h1(P, M), zb_v(P, M)):
        check(lower(sched))
        for acts in sched.ranks:
            assert all(a.kind in (Kind.F, Kind.I, Kind.W) for a in acts), sched.name
    layout = PipelineLayout.from_model_config(tiny_cfg("block", block_size=1, num_layers=4 * P), P, 2, placement="v")
    check(lower(zb_v(P, M)), layout)  # also the gradient-deposit order of the V placement's cache


def _held_peak(acts) -> int:
    """Forwards run minus W passes run: activations a rank holds (own count, not the library's)."""
    held = peak = 0
    for a in acts:
        held += {Kind.F: 1, Kind.W: -1}.get(a.kind, 0)
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (4, 16), (3, 7)])
def test_zero_bubble_memory_equals_1f1b_peak(P, M):
    # 1F1B holds at most P microbatches on rank 0; ZB-H1 the same count; ZB-V 2P chunks of half the layers
    assert max(_held_peak(a) for a in zb_h1(P, M).ranks) <= P
    assert max(_held_peak(a) for a in zb_v(P, M).ranks) <= 2 * P


def test_simulated_bubbles_p4_m8():
    P, M = 4, 8
    base = timeline(one_f_one_b(P, M), t_f=1, t_b=2)  # 1F1B: B = I + W = 2
    h1 = timeline(zb_h1(P, M), t_f=1, t_i=1, t_w=1)
    v = timeline(zb_v(P, M), t_f=1, t_i=1, t_w=1)
    work = 3 * M  # F + I + W per microbatch per rank (ZB-V: 2 chunks of half cost -> 6M units of half size)
    # 1F1B: makespan M(F+B) + (P-1)(F+B) = 33, bubble 9/33 = 0.2727
    assert base.makespan == pytest.approx(work + (P - 1) * 3)
    assert base.bubble_fraction == pytest.approx(3 / 11)
    # ZB-H1: bubble (P-1)(F+I-W) = 3 per rank -> makespan 27, fraction 1/9 = 0.1111; idle 1/3 of 1F1B's
    assert h1.makespan == pytest.approx(work + (P - 1) * 1)
    assert h1.bubble_fraction == pytest.approx(1 / 9)
    idle = lambda tl: tl.makespan - max(tl.busy)  # noqa: E731 - idle time per rank (all ranks equally busy)
    assert idle(h1) / idle(base) == pytest.approx(1 / 3)
    assert idle(h1) / idle(base) <= 0.4
    assert h1.bubble_fraction / base.bubble_fraction == pytest.approx(11 / 27)  # 0.407 as fractions
    # ZB-V (chunk costs 1 = half a 1F1B stage): the last rank cannot start before P-1 chunk forwards, so
    # makespan >= 6M + (P-1) = 51 for ANY schedule; ZB-V reaches it: fraction 3/51 = 1/17 = 0.0588.
    assert v.makespan == pytest.approx(2 * work + (P - 1))
    assert v.bubble_fraction == pytest.approx(1 / 17)
    # in 1F1B's time units (a chunk costs 1/2): idle 1.5 vs 9 = 1/6 of 1F1B's, the lower bound (see docs)
    assert (idle(v) / 2) / idle(base) == pytest.approx(1 / 6)


def _torch_order(cls_name: str, P: int, M: int, local: int):
    sch = pytest.importorskip("torch.distributed.pipelining.schedules")
    cls = getattr(sch, cls_name, None)
    if cls is None:
        pytest.skip(f"torch has no {cls_name}")
    ns = SimpleNamespace(
        pp_group_size=P,
        num_stages=local * P,
        _n_microbatches=M,
        n_local_stages=local,
        number_of_rounds=max(1, M // P),
        microbatches_per_round=M // max(1, M // P),
    )
    out = []
    for r in range(P):
        acts = cls._calculate_single_rank_operations(ns, r)
        out.append([f"{a.stage_index}{a.computation_type.value}{a.microbatch_index}" for a in acts if a is not None])
    return out


@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (4, 5), (3, 6)])
def test_orders_match_torch(P, M):
    try:
        want_v = _torch_order("ScheduleZBVZeroBubble", P, M, 2)
        want_h1 = _torch_order("ScheduleInterleavedZeroBubble", P, M, 1) if M % max(1, M // P) == 0 else None
    except (AttributeError, TypeError, KeyError) as e:  # private API moved: nothing to compare with
        pytest.skip(f"torch's generators are not callable this way: {e}")
    assert [[str(a) for a in acts] for acts in zb_v(P, M).ranks] == want_v
    if want_h1 is not None:
        assert [[str(a) for a in acts] for acts in zb_h1(P, M).ranks] == want_h1


def test_schedule_names_and_config():
    assert make_schedule("zb_v", 2, 2, 4).placement == "v"
    assert make_schedule("zb_h1", 2, 1, 4).placement == "loop"
    with pytest.raises(ScheduleError, match="2 chunk"):
        make_schedule("zb_v", 2, 1, 4)
    with pytest.raises(ScheduleError, match="split_backward has no effect"):
        make_schedule("zb_h1", 2, 1, 4, split_iw=True)
    validate_pipeline_config(PipelineConfig(schedule="zb_v"), pp=2, vpp=2, num_layers=8)
    with pytest.raises(ConfigError, match="parallel.vpp"):
        validate_pipeline_config(PipelineConfig(schedule="zb_v"), pp=2, vpp=1, num_layers=8)
    with pytest.raises(ConfigError, match="pipeline.split_backward"):
        validate_pipeline_config(PipelineConfig(schedule="zb_h1", split_backward=True), pp=2, vpp=1)
    with pytest.raises(ConfigError, match="pipeline.schedule"):
        PipelineLayout.from_model_config(tiny_cfg("block", block_size=1, num_layers=4), 2, 2, placement="w")


# ------------------------------------------------------------------------------------ V placement and the cache
def _rank(stage: int, P: int, placement: str) -> int:
    chunk, pos = stage // P, stage % P
    return P - 1 - pos if placement == "v" and chunk % 2 else pos


def _block_of_sublayer(mode: str, block_size: int, L: int):
    """Block id (1-based; 0 = embedding) of each of the 2L sublayers. ``mode="sublayer"``: the paper's rule with
    ``block_size`` read as N blocks (2L // N sublayers each, the last taking the remainder; may open at an FFN)."""
    if mode == "full":
        return [1 + j for j in range(2 * L)]
    if mode == "sublayer":
        size = (2 * L) // block_size
        return [1 + min(j // size, block_size - 1) for j in range(2 * L)]
    return [1 + (j // 2) // block_size for j in range(2 * L)]


def _brute_force(L, P, V, mode, block_size, split, placement):
    """Per hop s -> s+1: (blocks the receiving rank has not seen yet, partial sent?), and the naive count."""
    owner = _block_of_sublayer(mode, block_size, L)
    bounds = [sum(split[:s]) for s in range(P * V + 1)]
    last_sub = {}
    for j, b in enumerate(owner):
        last_sub[b] = j

    def complete_before(sub):  # blocks that exist (complete) once ``sub`` sublayers ran
        return {0} | {b for b, j in last_sub.items() if j < sub}

    seen = {r: set() for r in range(P)}
    hops = []
    for s in range(P * V):
        r = _rank(s, P, placement)
        start, end = 2 * bounds[s], 2 * bounds[s + 1]
        reads = complete_before(start) if s > 0 else set()
        if s > 0:
            new = reads - seen[r]
            partial = 0 < start < 2 * L and owner[start - 1] == owner[start]
            hops.append((new, partial, len(reads) + partial))
        seen[r] |= reads | complete_before(end)
    return hops


CASES = [
    (8, "block", 1, None),
    (8, "block", 2, None),
    (12, "block", 3, None),
    (8, "full", 1, None),
    (8, "block", 2, [1, 3, 2, 2]),
    (16, "block", 3, [3, 1, 2, 2, 1, 3, 2, 2]),
    (8, "full", 1, [3, 1, 1, 3]),
    (8, "sublayer", 3, None),  # blocks of 5, 5, 6 sublayers: two open at an FFN
    (12, "sublayer", 8, None),  # the example: S = 3
    (10, "sublayer", 4, [3, 1, 2, 1, 1, 1, 0, 1]),  # blocks of 5: every other one opens at an FFN
]


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("L,mode,bs,split", CASES)
@pytest.mark.parametrize("placement", ["v", "loop"])
def test_hop_volumes_are_the_brute_force_minimum(P, L, mode, bs, split, placement):
    V = 2
    if split is not None and len(split) != P * V:
        split = [L // (P * V)] * (P * V) if L % (P * V) == 0 else None
        if split is None:
            pytest.skip("partition not for this P")
    if mode == "sublayer":
        cfg = tiny_cfg("block", bs, None, num_layers=L)
        cfg.residual.partition = "sublayer"
    else:
        cfg = tiny_cfg(mode, None, bs if mode == "block" else None, num_layers=L)
    lay = PipelineLayout.from_model_config(cfg, P, V, layers_per_stage=split, placement=placement)
    naive = lay.with_cache(False)
    split = list(lay.layers_per_stage)
    assert [lay.rank_of(s) for s in range(P * V)] == [_rank(s, P, placement) for s in range(P * V)]
    got_total = naive_total = 0
    received = {r: [] for r in range(P)}
    for s, (new, partial, n_naive) in enumerate(_brute_force(L, P, V, mode, bs, split, placement)):
        assert set(lay.delta(s)) == new, (s, lay.delta(s), new)
        assert lay.payload_len(s) == len(new) + partial
        assert naive.payload_len(s) == n_naive
        received[_rank(s + 1, P, placement)] += list(new)
        if _rank(s, P, placement) != _rank(s + 1, P, placement):
            got_total += lay.payload_len(s)
            naive_total += n_naive
    for r, blocks in received.items():
        assert len(blocks) == len(set(blocks)), f"rank {r} receives a block twice: {blocks}"
    assert got_total == lay.tensors_per_microbatch() and naive_total == naive.tensors_per_microbatch()
    assert got_total < naive_total


def test_v_placement_tables():
    lay = PipelineLayout.from_model_config(tiny_cfg("block", block_size=1, num_layers=8), 4, 2, placement="v")
    assert [lay.stages_of(r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert lay.prev_on_rank(7) == 0 and lay.prev_on_rank(4) == 3 and lay.prev_on_rank(2) is None
    # the turn 3 -> 4 stays on rank 3: everything is cached, nothing but the partial would travel
    assert lay.delta(3) == () and lay.payload_len(3) == lay.partial(3) == 0
    assert lay.fingerprint() != lay.__class__(**{**lay.__dict__, "placement": "loop"}).fingerprint()


def test_plan_cli_uses_the_v_placement(capsys):
    from attnres_train.cli.plan import main

    assert (
        main(
            [
                "--pp",
                "2",
                "--vpp",
                "2",
                "--num-layers",
                "8",
                "--mode",
                "block",
                "--block-size",
                "1",
                "--microbatches",
                "4",
                "--schedule",
                "zb_v",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "placement=v" in out
    assert "rank 0: 0F0 0F1 0F2 3F0 3I0 3W0" in out  # rank 0 runs stages 0 and 3 (= 2P-1-0)
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line[:4] in ("  0 ", "  1 ")}
    assert rows["0"] == "0-1,6-7EH" and rows["1"] == "2-5", rows  # both ends of the model on rank 0
