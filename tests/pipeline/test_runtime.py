"""Pipeline runtime on 2 and 4 gloo ranks equals the single-process model (loss, aux loss, every gradient).

Each test spawns its ranks once and runs a batch of configurations (``tests/pipeline/common.py``), then
compares every configuration with the single-process reference built from the same seed: fp64 to 1e-12 relative
(max-abs error over the reference's max magnitude), one fp32 configuration to 1e-5. Also checked per case: the
measured elements per hop and direction equal the layout's analytic message sizes, cached and naive modes agree,
MoE load counters live on the owning stage and equal the reference, two consecutive steps give identical
results (no state leaks), the forward-only path gives the same loss, and a run that drops the cached blocks'
gradient deposits FAILS the equivalence check (negative control).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

from .common import BATCH, HIDDEN, SEQ, Case, rank_body, reference

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

_REFS: dict = {}


def _ref(case: Case) -> dict:
    key = case.ref_key()
    if key not in _REFS:
        _REFS[key] = reference(case.cfg(), case.dtype, case.M)
    return _REFS[key]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _gather(results, i: int) -> dict:
    grads = {}
    for per_rank in results:
        for name, g in per_rank[i]["grads"].items():
            if name in grads:  # tied embedding: both ends hold the summed gradient
                assert torch.equal(grads[name], g), f"{name}: tied copies differ after the sum"
            grads[name] = g
    return grads


def _check_case(case: Case, results, i: int) -> float:
    """All equivalence and structural checks of one case; returns the worst relative gradient error."""
    ref = _ref(case)
    tol = TOL[case.dtype]
    P = case.P
    for r in range(P):
        got = results[r][i]
        assert got["state_left"] is False, f"{case.name}: rank {r} kept per-step state"
        assert abs(got["loss"] - ref["loss"]) <= tol * abs(ref["loss"]), (case.name, got["loss"], ref["loss"])
        assert abs(got["aux"] - ref["aux"]) <= tol * abs(ref["aux"]) + 1e-15, (case.name, got["aux"], ref["aux"])
        if case.steps > 1:  # identical results on consecutive steps: nothing leaked from step 1 into step 2
            first, last = got["steps"][0], got["steps"][-1]
            assert first["loss"] == last["loss"]
            for name in first["grads"]:
                assert torch.equal(first["grads"][name], last["grads"][name]), f"{case.name}: {name} step 2 differs"
        if case.eval_too:
            assert abs(got["eval_loss"] - ref["loss"]) <= tol * abs(ref["loss"]), (case.name, "eval")
    grads = _gather(results, i)
    assert set(grads) == set(ref["grads"]), f"{case.name}: parameters not covered {set(ref['grads']) ^ set(grads)}"
    worst = 0.0
    for name, g in ref["grads"].items():
        err = _rel(grads[name], g)
        worst = max(worst, err)
        assert err <= tol, f"{case.name}: grad {name} relative error {err:.3e} > {tol:.0e}"
    # MoE load statistics: one owner stage per MoE layer, counts as in the single-process run (x steps)
    loads = {}
    for r in range(P):
        for name, c in results[r][i]["loads"].items():
            assert name not in loads, f"{case.name}: MoE layer {name} on two ranks"
            loads[name] = c
    assert set(loads) == set(ref["loads"])
    for name, c in loads.items():
        assert torch.equal(c, ref["loads"][name] * case.steps), f"{case.name}: expert load of {name}"
    # measured message sizes == the layout's analytic payloads, per hop and direction
    layout = case.layout()
    u = BATCH * SEQ * HIDDEN
    for direction in ("fwd_elems", "bwd_elems"):
        measured = {}
        for r in range(P):
            for hop, n in results[r][i]["stats"][direction].items():
                measured[hop] = measured.get(hop, 0) + n
        expected = {
            s: layout.payload_len(s) * u * case.M
            for s in range(layout.num_stages - 1)
            if layout.rank_of(s) != layout.rank_of(s + 1)
        }
        assert measured == expected, f"{case.name} {direction}: measured {measured} != analytic {expected}"
    return worst


def _run_and_check(cases, P, timeout=420.0):
    results = run_distributed(rank_body, P, cases, timeout=timeout)
    worst = {c.name: _check_case(c, results, i) for i, c in enumerate(cases)}
    return results, worst


def _same_grads(results, i, j, tol=1e-12):
    a, b = _gather(results, i), _gather(results, j)
    for name in a:
        assert _rel(a[name], b[name]) <= tol, f"cached vs naive differ on {name}"


# --------------------------------------------------------------------------------------------- P = 2
P2_CASES = [
    # aligned blocks (2 layers per stage, blocks of 2), M = P, two consecutive steps + forward-only eval
    Case("p2-v2-aligned", 2, 2, 2, L=8, block_size=2, steps=2, eval_too=True),
    Case("p2-v2-aligned-naive", 2, 2, 2, L=8, block_size=2, cache=False),
    # blocks of 3 layers straddle the 2-layer stages, M = 2P
    Case("p2-v2-straddle", 2, 2, 4, L=8, block_size=3),
    Case("p2-v2-straddle-naive", 2, 2, 4, L=8, block_size=3, cache=False),
    # three chunks per rank, one layer per stage, every other hop carries a partial sum
    Case("p2-v3-straddle", 2, 3, 2, L=6, block_size=2),
    # V = 1 (plain 1F1B), num_blocks (last block takes the remainder)
    Case("p2-v1-1f1b", 2, 1, 4, L=5, num_blocks=2),
    # uneven explicit split with an incomplete last block
    Case("p2-v2-uneven", 2, 2, 2, L=7, block_size=3, layers=[1, 3, 2, 1]),
    Case("p2-v2-full", 2, 2, 2, L=4, mode="full"),
    Case("p2-v2-prenorm", 2, 2, 4, L=4, mode="prenorm"),
    Case("p2-v2-fp32", 2, 2, 4, L=8, block_size=2, dtype=torch.float32),
    Case("p2-v2-tied-gpipe", 2, 2, 2, L=4, block_size=1, tie=True, schedule="gpipe"),
    Case("p2-v2-iw-split", 2, 2, 2, L=4, block_size=3, split_iw=True, w_delay=1),
    # the paper's sublayer partition, 6 layers, N=4: blocks of 3 sublayers [0-2] [3-5] [6-8] [9-11], so blocks
    # 2 and 4 open at an FFN (L1, L4). Stages [1,1,2,2]: block 2, opened mid-layer, straddles the hop after
    # layer 1 and blocks 1, 3 straddle the others; stages [3,3] (1F1B): the hop sits on block 3's start.
    Case("p2-v2-sublayer-straddle", 2, 2, 2, L=6, num_blocks=4, partition="sublayer", layers=[1, 1, 2, 2]),
    Case("p2-v1-sublayer-at-boundary", 2, 1, 2, L=6, num_blocks=4, partition="sublayer"),
    # negative control (checked separately): forget the deposits of cached blocks
    Case("p2-v2-drop-deposits", 2, 2, 2, L=8, block_size=2, drop_deposits=True),
]


@pytest.mark.slow
def test_pipeline_p2_matches_single_process():
    cases = P2_CASES
    results = run_distributed(rank_body, 2, cases, timeout=420.0)
    names = [c.name for c in cases]
    for i, c in enumerate(cases):
        if c.drop_deposits:
            with pytest.raises(AssertionError, match="relative error"):
                _check_case(c, results, i)
            continue
        _check_case(c, results, i)
    _same_grads(results, names.index("p2-v2-aligned"), names.index("p2-v2-aligned-naive"))
    _same_grads(results, names.index("p2-v2-straddle"), names.index("p2-v2-straddle-naive"))


# --------------------------------------------------------------------------------------------- P = 4
P4_CASES = [
    Case("p4-v2-aligned-m4", 4, 2, 4, L=8, block_size=1),
    Case("p4-v2-straddle-m8", 4, 2, 8, L=8, block_size=3),
    Case("p4-v3-straddle", 4, 3, 4, L=12, block_size=2),
    Case("p4-v3-straddle-naive", 4, 3, 4, L=12, block_size=2, cache=False),
    Case("p4-v1-full-m8", 4, 1, 8, L=4, mode="full"),
    Case("p4-v2-uneven", 4, 2, 4, L=10, block_size=3, layers=[1, 2, 1, 1, 1, 2, 1, 1]),
    Case("p4-v2-prenorm", 4, 2, 4, L=8, mode="prenorm"),
]


@pytest.mark.slow
def test_pipeline_p4_matches_single_process():
    results, _ = _run_and_check(P4_CASES, 4)
    names = [c.name for c in P4_CASES]
    _same_grads(results, names.index("p4-v3-straddle"), names.index("p4-v3-straddle-naive"))


# The combined pp x fsdp x tp x ep layout through the training path: tests/pipeline/test_train_layouts.py.
