"""The multi-process harness itself: results by rank, exception propagation, skips, timeouts."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _all_reduce(scale):
    t = torch.full((2,), float(dist.get_rank()))
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t * scale}


def _fail_on_rank1():
    if dist.get_rank() == 1:
        raise ValueError("boom on one rank")
    dist.barrier()  # rank 0 would hang here: the harness must terminate it
    return "unreachable"


def _skip():
    pytest.skip("skipped inside a rank")


def _sleep():
    time.sleep(30)


def test_results_by_rank():
    res = run_distributed(_all_reduce, 3, 10.0, timeout=30)
    assert [r["rank"] for r in res] == [0, 1, 2]
    assert all(r["world"] == 3 for r in res)
    assert res[2]["sum"].tolist() == [30.0, 30.0]


def test_exception_propagates_with_remote_traceback():
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="boom on one rank") as info:
        run_distributed(_fail_on_rank1, 2, timeout=30)
    assert "raised on rank 1" in "".join(getattr(info.value, "__notes__", []))
    assert time.monotonic() - t0 < 25  # did not wait for the hanging barrier to time out


def test_skip_inside_rank_skips_test():
    with pytest.raises(pytest.skip.Exception):
        run_distributed(_skip, 2, timeout=30)


def test_timeout_kills_ranks():
    with pytest.raises(TimeoutError, match="did not finish"):
        run_distributed(_sleep, 2, timeout=1)
