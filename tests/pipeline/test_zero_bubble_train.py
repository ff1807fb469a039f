"""ZB-H1 / ZB-V through the real training path (``parallel.pp``, ``pipeline.schedule=zb_*``): fp64 equivalence
with the plain model (the harness of ``test_train_layouts.py``: loss, aux, grad norm, every gradient, expert loads,
parameters and router biases after 2 optimizer steps), and checkpoints that resume across schedules under
torchrun: 1F1B -> ZB-V -> 1F1B matches the uninterrupted 1F1B run (DCP checkpoints are layout-independent)."""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed
from tests.train.conftest import tiny_overrides

from .test_train_cli import _close, _losses, _torchrun
from .test_train_layouts import STEPS, TOL, _body

LAYOUTS = {
    "pp2_vpp2_zbv_block": (2, dict(pp=2, vpp=2, dp_shard=1), dict(schedule="zb_v"), "block", 3),
    "pp2_zbh1_full": (2, dict(pp=2, dp_shard=1), dict(schedule="zb_h1"), "full", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_bubble_training_path_matches_single_process(layout):
    world, pkw, pipe_kw, mode, nb = LAYOUTS[layout]
    results = run_distributed(_body, world, pkw, pipe_kw, mode, nb, timeout=420)
    for rank, r in enumerate(results):
        for step in range(STEPS):
            for key in ("loss", "aux", "norm"):
                assert r[key][step] <= TOL, f"{layout} rank {rank} step {step}: {key} rel err {r[key][step]:.2e}"
            err, name = r["grads"][step]
            assert err <= TOL, f"{layout} rank {rank} step {step}: grad {name} rel err {err:.2e}"
            assert r["counts"][step] == 0 and r["bias"][step] == 0
        assert r["params"][0] <= TOL, (layout, r["params"])
    owned = sorted(n for r in results for n in r["owned"][-1])
    assert owned == results[0]["all_names"]


@pytest.mark.slow
def test_checkpoint_resumes_across_schedules(corpus, tmp_path):
    steps = 6
    base, zbv, back = (tmp_path / n for n in ("1f1b", "zbv", "back"))
    one = {"parallel.pp": 2, "parallel.vpp": 1, "pipeline.schedule": "1f1b", "checkpoint.interval": 2}
    vee = {"parallel.pp": 2, "parallel.vpp": 2, "pipeline.schedule": "zb_v", "checkpoint.interval": 2}
    _torchrun(2, tiny_overrides(corpus, base, steps=steps, **one))
    ref = _losses(base)
    # 1F1B checkpoint (step 2) -> ZB-V (another placement and chunking of the same layers)
    _torchrun(
        2,
        tiny_overrides(
            corpus, zbv, steps=steps, **vee, **{"checkpoint.resume": str(base / "checkpoints" / "step_00000002")}
        ),
    )
    got = _losses(zbv)
    assert sorted(got) == [3, 4, 5, 6]
    for s in got:
        assert _close(got[s], ref[s], 1e-4), (s, got, ref)
    # and back: the ZB-V run's step-4 checkpoint -> 1F1B
    _torchrun(
        2,
        tiny_overrides(
            corpus, back, steps=steps, **one, **{"checkpoint.resume": str(zbv / "checkpoints" / "step_00000004")}
        ),
    )
    again = _losses(back)
    assert sorted(again) == [5, 6]
    for s in again:
        assert _close(again[s], ref[s], 1e-4), (s, again, ref)
