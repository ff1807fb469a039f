"""Interrupted runs resume exactly: kill -9 at random points and inside every phase of a checkpoint save (sync
and async), SIGTERM (preemption), and a corrupted newest checkpoint (clear error, the previous one resumes).

All runs are single-process subprocesses with the same environment as an uninterrupted reference run, so a
resumed run must reproduce the reference losses and gradient norms bit for bit.

``python -m tests.train.test_kill_resume --worker <overrides>`` runs the command line, sleeping
``ATTNRES_TEST_STEP_SLEEP`` seconds after each step (so a signal sent "mid-run" lands mid-run on fast machines
too) and, with ``ATTNRES_TEST_KILL`` set to a save phase, SIGKILLing itself during its first checkpoint save:

* ``after_dcp``: every DCP / RNG file is written, nothing committed (no meta.json, still ``.tmp-*``);
* ``before_marker``: renamed to ``step_XXXXXXXX`` with meta.json, but no ``COMMITTED`` marker;
* ``during_prune``: committed, then killed half way through deleting the previous checkpoint;
* ``async_write``: inside the background DCP write of an async save, while the main thread trains on.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from attnres_train.checkpoint import CheckpointManager, verify_checkpoint
from tests import subproc

from .conftest import PY, REPO, read_metrics, tiny_overrides

STEPS = 12


def _suicide():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def _install_kill(phase: str) -> None:
    import attnres_train.checkpoint.manager as mgr

    if phase == "after_dcp":
        mgr.build_manifest = lambda directory: _suicide()
    elif phase == "before_marker":
        real = mgr._write_durable

        def write(path, text):
            if Path(path).name == mgr.MARKER:
                _suicide()
            real(path, text)

        mgr._write_durable = write
    elif phase == "during_prune":
        real_remove = mgr.CheckpointManager._remove

        def remove(self, path):
            if not mgr.is_complete(path):  # the cleanup of an earlier crash's leftovers: not this phase
                return real_remove(self, path)
            (path / mgr.MARKER).unlink(missing_ok=True)
            victim = next((p for p in sorted(path.rglob("*.distcp"))), None)
            if victim is not None:
                victim.unlink()
            _suicide()

        mgr.CheckpointManager._remove = remove
    elif phase == "async_write":
        from torch.distributed.checkpoint import filesystem

        real_write = filesystem._FileSystemWriter._write_data

        def write_data(self, planner, file_queue):
            out = real_write(self, planner, file_queue)
            _suicide()
            return out

        filesystem._FileSystemWriter._write_data = write_data
    else:
        raise ValueError(phase)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(corpus, run_dir, **extra) -> list:
    return tiny_overrides(corpus, run_dir, steps=STEPS, **{"checkpoint.keep_last": 1, **extra})


def _launch(args, kill=None, step_sleep=0.0):
    env = _env()
    if kill or step_sleep:
        env.update(ATTNRES_TEST_KILL=kill or "", ATTNRES_TEST_STEP_SLEEP=str(step_sleep))
        cmd = [PY, "-m", "tests.train.test_kill_resume", "--worker", *args]
    else:
        cmd = [PY, "-m", "attnres_train", *args]
    run_dir = Path(next(a for a in args if a.startswith("run_dir=")).split("=", 1)[1])
    return subproc.popen(cmd, run_dir.parent / "logs", run_dir.name, env=env, cwd=REPO)


def _install_step_sleep(seconds: float) -> None:
    from attnres_train.train.train_module import TrainModule

    real = TrainModule.train_batch

    def train_batch(self, batch, step):
        out = real(self, batch, step)
        time.sleep(seconds)
        return out

    TrainModule.train_batch = train_batch


def _records(run_dir: Path, kind: str = "train") -> list:
    try:
        return read_metrics(run_dir, kind)
    except (OSError, ValueError):  # not there yet, or a line half written
        return []


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run: {step: (loss, grad_norm)}."""
    root = tmp_path_factory.mktemp("kill")
    run_dir = root / "reference"
    proc = _launch(_args(corpus, run_dir, **{"checkpoint.interval": 0}))
    out, err = subproc.communicate(proc, timeout=600)
    assert proc.returncode == 0, subproc.failure(proc)
    ref = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)}
    assert sorted(ref) == list(range(1, STEPS + 1))
    return root, ref


def _check_against_reference(run_dir: Path, ref: dict) -> None:
    """Every train record ever logged (killed launches and resumed ones) equals the reference, bit for bit."""
    for r in read_metrics(run_dir):
        assert (r["loss"], r["grad_norm"]) == ref[r["step"]], (r["step"], r["loss"], ref[r["step"]])


@pytest.mark.slow
def test_kill_9_at_random_points_and_inside_saves_then_resume_exactly(corpus, reference):
    root, ref = reference
    run_dir = root / "killed"
    rng = random.Random(6)
    trials = [
        ("random", False),
        ("after_dcp", False),
        ("before_marker", False),
        ("during_prune", False),
        ("random", True),
        ("async_write", True),
    ]
    ckpts = CheckpointManager(run_dir / "checkpoints", 0)
    kills = []
    for phase, use_async in trials:
        before = ckpts.latest(report=False)
        had_stale = bool(ckpts.stale())
        n_before, e_before = len(_records(run_dir)), len(_records(run_dir, "event"))
        args = _args(corpus, run_dir, **{"checkpoint.interval": 1, "checkpoint.async_save": str(use_async).lower()})
        proc = _launch(args, kill=None if phase == "random" else phase, step_sleep=0.3 if phase == "random" else 0.0)
        if phase == "random":  # once this launch has committed a checkpoint (its 2nd step is logged after the 1st save)
            deadline = time.monotonic() + 300
            while len(_records(run_dir)) < n_before + 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            proc.send_signal(signal.SIGKILL)
        out, err = subproc.communicate(proc, timeout=600)
        assert proc.returncode == -signal.SIGKILL, (phase, subproc.failure(proc))
        resumed = [r for r in _records(run_dir, "event")[e_before:] if r.get("event") == "resumed"]
        if before is not None:  # the launch continued from the newest complete checkpoint it found
            assert resumed and resumed[0]["path"] == str(before), (phase, resumed, before)
        if had_stale:
            assert "ignoring" in out and "incomplete checkpoint" in out, out[-2000:]
        for p in ckpts.complete():  # whatever is complete is intact
            verify_checkpoint(p)
        stale = [p.name for p in ckpts.stale()]
        if phase in ("after_dcp", "async_write"):
            assert any(".tmp-" in n for n in stale) and ckpts.latest(report=False) == before, (phase, stale)
        elif phase == "before_marker":
            assert any(".tmp" not in n for n in stale) and ckpts.latest(report=False) == before, (phase, stale)
        elif phase == "during_prune":
            assert before.name in stale and ckpts.latest(report=False) != before, (phase, stale)
        last = max((r["step"] for r in _records(run_dir) if r["kind"] == "train"), default=0)
        kills.append((phase, "async" if use_async else "sync", before.name if before else None, last))
        _check_against_reference(run_dir, ref)
        assert last < STEPS, "the run finished before every kill happened; raise STEPS"
    proc = _launch(_args(corpus, run_dir, **{"checkpoint.interval": 1}))
    out, err = subproc.communicate(proc, timeout=600)
    assert proc.returncode == 0, subproc.failure(proc)
    print("kills (phase, save mode, resumed from, last logged step):", kills)
    _check_against_reference(run_dir, ref)
    final = {r["step"]: r for r in read_metrics(run_dir)}
    assert sorted(final) == list(range(1, STEPS + 1))
    assert ckpts.latest(report=False).name == f"step_{STEPS:08d}" and ckpts.stale() == []
    verify_checkpoint(ckpts.latest(report=False))


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_exactly(corpus, reference):
    root, ref = reference
    run_dir = root / "sigterm"
    args = _args(corpus, run_dir, **{"checkpoint.interval": 0})
    proc = _launch(args, step_sleep=0.3)
    deadline = time.monotonic() + 300
    while len(_records(run_dir)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = subproc.communicate(proc, timeout=300)
    assert proc.returncode == 0, subproc.failure(proc)
    stopped_at = max(r["step"] for r in read_metrics(run_dir))
    assert 3 <= stopped_at < STEPS
    assert "received SIGTERM" in err and f"stopping on SIGTERM: checkpoint {run_dir}" in out, (out[-1500:], err[-1500:])
    ckpt = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert verify_checkpoint(ckpt)["step"] == stopped_at
    proc = _launch(args)
    out, err = subproc.communicate(proc, timeout=600)
    assert proc.returncode == 0, subproc.failure(proc)
    _check_against_reference(run_dir, ref)
    assert sorted({r["step"] for r in read_metrics(run_dir)}) == list(range(1, STEPS + 1))


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate"])  # more kinds of damage: tests/checkpoint/test_manager.py
def test_corrupt_newest_checkpoint_is_named_and_the_previous_resumes_exactly(damage, corpus, reference):
    root, ref = reference
    run_dir = root / f"corrupt_{damage}"
    proc = _launch(
        _args(corpus, run_dir, **{"checkpoint.interval": 3, "checkpoint.keep_last": 2, "trainer.stop_at": 6})
    )
    out, err = subproc.communicate(proc, timeout=600)
    assert proc.returncode == 0, subproc.failure(proc)
    prev, newest = (run_dir / "checkpoints" / f"step_{s:08d}" for s in (3, 6))
    if damage == "truncate":
        victim = next(newest.glob("*.distcp"))
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim = newest / ".metadata"
        victim.write_bytes(b"\x80\x04garbage")
    before = _snapshot(run_dir / "checkpoints")
    proc = _launch(_args(corpus, run_dir, **{"checkpoint.interval": 3, "checkpoint.keep_last": 2}))
    out, err = subproc.communicate(proc, timeout=600)
    assert proc.returncode == 2, subproc.failure(proc)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, subproc.failure(proc)
    assert str(victim) in errors[0] and f"{prev} is still usable" in errors[0], errors[0]
    assert _snapshot(run_dir / "checkpoints") == before  # nothing deleted or rewritten
    proc = _launch(
        _args(corpus, run_dir, **{"checkpoint.interval": 3, "checkpoint.keep_last": 0, "checkpoint.resume": str(prev)})
    )
    out, err = subproc.communicate(proc, timeout=600)
    assert proc.returncode == 0, subproc.failure(proc)
    _check_against_reference(run_dir, ref)  # steps 4.. re-run from step 3: the same numbers
    assert verify_checkpoint(newest)["step"] == 6  # the corrupt step 6 was replaced by this run's
    shutil.rmtree(run_dir)


if __name__ == "__main__" and "--worker" in sys.argv:
    if os.environ.get("ATTNRES_TEST_KILL"):
        _install_kill(os.environ["ATTNRES_TEST_KILL"])
    if float(os.environ.get("ATTNRES_TEST_STEP_SLEEP") or 0) > 0:
        _install_step_sleep(float(os.environ["ATTNRES_TEST_STEP_SLEEP"]))
    from attnres_train.cli.train import main

    sys.argv = ["attnres-train", *[a for a in sys.argv[1:] if a != "--worker"]]
    main()
