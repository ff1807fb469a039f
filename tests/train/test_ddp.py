"""DDP on 2 gloo processes follows the single-process loss trajectory for the same global batch."""

import pytest

from attnres_train.cli.train import run
from tests import subproc

from .conftest import PY, REPO, read_metrics, tiny_overrides


@pytest.mark.slow
def test_ddp_two_ranks_matches_single_process(corpus, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run(tiny_overrides(corpus, single, steps=6))
    args = tiny_overrides(corpus, ddp, steps=6)
    subproc.check(
        subproc.run(
            [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "attnres_train", *args],
            tmp_path,
            "torchrun-ddp",
            cwd=REPO,
        )
    )
    a = [r["loss"] for r in read_metrics(single)]
    b = [r["loss"] for r in read_metrics(ddp)]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    assert a[-1] < a[0]
