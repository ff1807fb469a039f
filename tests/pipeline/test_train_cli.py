"""`python -m attnres_train parallel.pp=2` under torchrun: the pipelined trainer follows the single-process loss
trajectory, its checkpoints resume exactly under pp, and resume under another layout (no pipeline, dp=2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnres_train.cli.train import run
from tests import subproc
from tests.train.conftest import PY, REPO, read_metrics, tiny_overrides


def _torchrun(nproc: int, args: list) -> None:
    run_dir = Path(next(a for a in args if a.startswith("run_dir=")).split("=", 1)[1])
    proc = subproc.run(
        [
            PY,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "attnres_train",
            *args,
        ],
        run_dir.parent / "logs",
        f"torchrun-{run_dir.name}",
        cwd=REPO,
    )
    subproc.check(proc)


def _losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.slow
def test_pipeline_training_matches_single_process_and_resumes(corpus, tmp_path):
    steps = 6
    single, pp, pp_resumed, dp_resumed = (tmp_path / n for n in ("single", "pp", "pp_resumed", "dp_resumed"))
    run(tiny_overrides(corpus, single, steps=steps))
    pp_kw = {"parallel.pp": 2, "parallel.vpp": 2, "checkpoint.interval": 3}
    _torchrun(2, tiny_overrides(corpus, pp, steps=steps, **pp_kw))
    ref, got = _losses(single), _losses(pp)
    assert sorted(got) == list(range(1, steps + 1))
    for s in ref:
        assert _close(got[s], ref[s], 1e-4), (s, got, ref)
    assert got[steps] < got[1]
    ckpt = pp / "checkpoints" / "step_00000003"
    assert (ckpt / "COMMITTED").exists()
    # same layout: continues exactly where the uninterrupted pipelined run went
    _torchrun(2, tiny_overrides(corpus, pp_resumed, steps=steps, **pp_kw, **{"checkpoint.resume": str(ckpt)}))
    resumed = _losses(pp_resumed)
    assert sorted(resumed) == [4, 5, 6]
    for s in resumed:
        assert _close(resumed[s], got[s], 1e-6), (s, resumed, got)
    # another layout: 2 data-parallel ranks, no pipeline (model + optimizer state resharded by DCP)
    _torchrun(2, tiny_overrides(corpus, dp_resumed, steps=steps, **{"checkpoint.resume": str(ckpt)}))
    other = _losses(dp_resumed)
    assert sorted(other) == [4, 5, 6]
    for s in other:
        assert _close(other[s], got[s], 1e-4), (s, other, got)
