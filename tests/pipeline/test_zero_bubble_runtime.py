"""ZB-H1 and ZB-V run by the pipeline runtime equal the single-process model in fp64 (loss, aux loss, every
gradient, MoE loads, per-hop message sizes == the layout's), on 1, 2 and 4 gloo ranks, Block and Full AttnRes;
and a run that loses the cached blocks' gradient deposits on the V placement FAILS (negative control).
The checks are ``tests/pipeline/test_runtime.py``'s (reference = the plain model, own loop over microbatches).
"""

from __future__ import annotations

import pytest

from attnres_train.parallel.pipeline import PipelineRuntime, build_stages
from attnres_train.parallel.pipeline.records import PipelineError
from tests.distributed import run_distributed

from .common import Case, make_model, rank_body, run_case
from .test_runtime import _check_case, _same_grads


@pytest.mark.parametrize(
    "case",
    [
        Case("p1-zbv-block", 1, 2, 3, L=4, block_size=3, schedule="zb_v"),
        Case("p1-zbv-full", 1, 2, 2, L=2, mode="full", schedule="zb_v"),
        Case("p1-zbh1-block", 1, 1, 2, L=3, block_size=2, schedule="zb_h1"),
    ],
    ids=lambda c: c.name,
)
def test_single_process_zero_bubble_matches_model(case):
    _check_case(case, [[run_case(case, 0)]], 0)


def test_schedule_and_layout_placement_must_agree():
    case = Case("mismatch", 1, 2, 2, L=4, block_size=2, schedule="zb_v")
    loop_layout = Case("loop", 1, 2, 2, L=4, block_size=2).layout()
    stages = build_stages(make_model(case.cfg()), loop_layout, 0)
    with pytest.raises(PipelineError, match="places stages by 'v'"):
        PipelineRuntime(stages, loop_layout, "zb_v").schedule_for(2)


P2 = [
    Case("p2-zbh1-block", 2, 1, 4, L=5, block_size=2, schedule="zb_h1"),
    Case("p2-zbv-straddle", 2, 2, 4, L=8, block_size=3, schedule="zb_v", steps=2, eval_too=True),
    Case("p2-zbv-straddle-naive", 2, 2, 4, L=8, block_size=3, schedule="zb_v", cache=False),
    Case("p2-zbv-full", 2, 2, 3, L=4, mode="full", schedule="zb_v"),
    Case("p2-zbv-tied", 2, 2, 2, L=4, block_size=1, tie=True, schedule="zb_v"),
    Case("p2-zbv-drop-deposits", 2, 2, 4, L=8, block_size=3, schedule="zb_v", drop_deposits=True),
]
P4 = [
    Case("p4-zbh1-block-m8", 4, 1, 8, L=8, block_size=3, schedule="zb_h1"),
    Case("p4-zbv-block-m8", 4, 2, 8, L=8, block_size=3, schedule="zb_v"),
    Case("p4-zbv-aligned", 4, 2, 4, L=8, block_size=1, schedule="zb_v"),
    Case("p4-zbv-full", 4, 2, 5, L=8, mode="full", schedule="zb_v"),
    Case("p4-zbv-uneven", 4, 2, 4, L=10, block_size=3, layers=[1, 2, 1, 1, 1, 2, 1, 1], schedule="zb_v"),
]


def _run(cases, P):
    results = run_distributed(rank_body, P, cases, timeout=420.0)
    for i, c in enumerate(cases):
        if c.drop_deposits:  # negative control: the V placement's cached blocks lose their gradients
            with pytest.raises(AssertionError, match="relative error"):
                _check_case(c, results, i)
        else:
            _check_case(c, results, i)
    return results


@pytest.mark.slow
def test_zero_bubble_p2_matches_single_process():
    results = _run(P2, 2)
    names = [c.name for c in P2]
    _same_grads(results, names.index("p2-zbv-straddle"), names.index("p2-zbv-straddle-naive"))


@pytest.mark.slow
def test_zero_bubble_p4_matches_single_process():
    _run(P4, 4)
