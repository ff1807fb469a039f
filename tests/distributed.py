"""Multi-process test harness: run one function on N gloo ranks and get every rank's return value back.

One place for all parallel tests (data/tensor/expert/pipeline parallel). Usage::

    import torch.distributed as dist
    from tests.distributed import run_distributed

    def _body(scale):                     # module level: it is pickled by reference into the children
        rank = dist.get_rank()            # the default process group is already initialised (gloo)
        t = torch.full((2,), float(rank))
        dist.all_reduce(t)
        return {"rank": rank, "sum": t * scale}

    def test_all_reduce():
        results = run_distributed(_body, 2, 10.0, timeout=30)   # list indexed by rank
        assert results[1]["sum"].tolist() == [10.0, 10.0]

What it does, and why:

* Start method ``forkserver`` (default; ``start_method=`` or ``ATTNRES_TEST_START_METHOD`` override it):
  plain ``fork`` of a pytest process that already ran torch ops can deadlock in OpenMP / intra-op thread
  pools, and ``spawn`` re-imports torch in every child. The forkserver imports torch (and the
  ``preload`` modules) once and forks cheap, clean children from it. So ``fn`` and its arguments must be
  picklable: define ``fn`` at module level of an importable module (``tests/...`` is a package).
* Each call gets a fresh free TCP port on 127.0.0.1 (bound-then-released, retried if the rendezvous
  fails with "address in use") and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, so code
  that reads torchrun's environment works unchanged.
* Every rank runs with ``torch.set_num_threads(threads)`` (default 1: the CI box has 2 shared cores).
* Results travel back as ``pickle`` bytes (tensors are copied, no shared-memory handles that die with
  the child). An exception in any rank is re-raised in the test process (the original exception type if
  it pickles, with the remote traceback attached as a note), the other ranks are terminated (they would
  otherwise hang in a collective), and ``pytest.skip`` inside a rank skips the test.
* ``timeout`` (seconds, for the whole run) kills every rank and raises ``TimeoutError`` naming the ranks
  that had not finished; the process-group timeout is set to the same value so collectives fail too.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence

import torch.multiprocessing as mp

DEFAULT_START_METHOD = os.environ.get("ATTNRES_TEST_START_METHOD", "forkserver")
# Imported once by the forkserver, so children start in ~0.1 s instead of re-importing torch.
DEFAULT_PRELOAD = ("torch", "torch.distributed", "attnres_train.model")


class DistributedTestError(RuntimeError):
    """A rank failed with an exception that could not be pickled back, or died without reporting."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    threads: int,
    fn: Callable,
    args: tuple,
    kwargs: dict,
    out_q,
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )  # and for anything it launches
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        payload = ("ok", pickle.dumps(fn(*args, **kwargs)))
    except BaseException as exc:  # noqa: B902 - everything, including pytest's Skipped/Failed outcomes
        tb = traceback.format_exc()
        if _is_pytest_outcome(exc):  # Skipped / Failed / XFailed do not pickle
            blob = pickle.dumps(("pytest-outcome", type(exc).__name__, getattr(exc, "msg", str(exc))))
        else:
            try:
                blob = pickle.dumps(exc)
                pickle.loads(blob)
            except Exception:
                blob = None
        payload = ("error", (blob, tb, f"{type(exc).__name__}: {exc}"))
    # Report before tearing the group down: the peers' secondary "connection closed" errors come later.
    out_q.put((rank, payload))
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _is_pytest_outcome(exc: BaseException) -> bool:
    import sys

    outcomes = sys.modules.get("_pytest.outcomes")
    return outcomes is not None and isinstance(exc, outcomes.OutcomeException)


# Errors that are usually a consequence of another rank failing, not the root cause.
_SECONDARY = ("connection closed by peer", "connection reset", "broken pipe", "timed out", "timeout")


def _is_secondary(summary: str) -> bool:
    s = summary.lower()
    return any(k in s for k in _SECONDARY)


def _raise_remote(rank: int, blob: Optional[bytes], tb: str, summary: str) -> None:
    note = f"--- raised on rank {rank}; remote traceback ---\n{tb}"
    if blob is not None:
        exc = pickle.loads(blob)
        if isinstance(exc, tuple) and exc[0] == "pytest-outcome":
            import pytest

            kind, msg = exc[1], exc[2]
            if kind == "Skipped":
                pytest.skip(msg)
            if kind == "XFailed":
                pytest.xfail(msg)
            pytest.fail(f"rank {rank}: {msg}\n{note}")
        if isinstance(exc, BaseException):
            if hasattr(exc, "add_note"):
                exc.add_note(note)
            raise exc
    raise DistributedTestError(f"rank {rank} failed: {summary}\n{note}")


def run_distributed(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: str = "gloo",
    threads: int = 1,
    start_method: Optional[str] = None,
    preload: Sequence[str] = DEFAULT_PRELOAD,
    **kwargs: Any,
) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks of a fresh gloo group; return results by rank.

    ``fn`` runs after ``dist.init_process_group`` (use ``dist.get_rank()``); the group is destroyed after it
    returns. ``timeout`` bounds the whole run (and each collective). Raises the first failing rank's
    exception (lowest rank among those reported first), ``TimeoutError`` or ``DistributedTestError``.
    """
    method = start_method or DEFAULT_START_METHOD
    ctx = mp.get_context(method)
    if method == "forkserver" and preload:
        ctx.set_forkserver_preload(list(preload))
    last_err: Optional[BaseException] = None
    # A port taken between free_port() and the rendezvous, or a gloo connection reset while a loaded machine
    # sets up the process group: infrastructure, not the test's logic; retry on a fresh port.
    transient = ("address already in use", "connection reset by peer", "connection refused")
    for _attempt in range(3):
        try:
            return _run_once(ctx, fn, world_size, args, kwargs, timeout, backend, threads)
        except Exception as exc:  # the rendezvous error arrives as whatever type the rank raised
            if not any(t in str(exc).lower() for t in transient):
                raise
            last_err = exc
    raise last_err  # type: ignore[misc]


def _run_once(ctx, fn, world_size, args, kwargs, timeout, backend, threads) -> List[Any]:
    port = free_port()
    out_q = ctx.Queue()
    procs = []
    for rank in range(world_size):
        p = ctx.Process(
            target=_worker,
            args=(rank, world_size, port, backend, timeout, threads, fn, args, kwargs, out_q),
            daemon=True,
            name=f"dist-rank{rank}",
        )
        p.start()
        procs.append(p)
    results: dict = {}
    deadline = time.monotonic() + timeout + 5.0  # + start-up slack on a loaded machine
    try:
        while len(results) < world_size:
            try:
                rank, (status, data) = out_q.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if dead:
                    # a rank exited (or was killed) without posting; give its message a moment to arrive
                    try:
                        rank, (status, data) = out_q.get(timeout=2.0)
                    except queue_mod.Empty:
                        r = dead[0]
                        raise DistributedTestError(
                            f"rank {r} exited with code {procs[r].exitcode} without reporting a result"
                        ) from None
                elif time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in results]
                    raise TimeoutError(
                        f"distributed test timed out after {timeout:.0f}s; ranks {missing} "
                        f"did not finish (finished: {sorted(results)})"
                    ) from None
                else:
                    continue
            if status == "error":
                errors = [(rank, data)]
                grace = time.monotonic() + 1.0  # collect the other ranks' reports to find the root cause
                while time.monotonic() < grace and len(results) + len(errors) < world_size:
                    try:
                        r2, (s2, d2) = out_q.get(timeout=0.1)
                    except queue_mod.Empty:
                        continue
                    if s2 == "error":
                        errors.append((r2, d2))
                    else:
                        results[r2] = None
                errors.sort(key=lambda e: _is_secondary(e[1][2]))  # stable: first reported wins among equals
                _raise_remote(errors[0][0], *errors[0][1])
            results[rank] = pickle.loads(data)
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=0.5 if len(results) == world_size else 0.0)
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        out_q.close()
