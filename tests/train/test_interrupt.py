"""Ctrl-C (SIGINT) behaves like SIGTERM: the current step finishes, a checkpoint is saved, the process exits 130
(documented in docs/training.md) and a resumed run continues bit for bit; a second Ctrl-C aborts at once.

The subprocess runs use ``tests.train.test_kill_resume``'s worker entry point, which sleeps
``ATTNRES_TEST_STEP_SLEEP`` seconds after each step so a signal sent "mid-run" lands mid-run on any machine.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from attnres_train.checkpoint import CheckpointManager, verify_checkpoint
from attnres_train.train.faults import StopSignals
from tests import subproc

from .conftest import PY, REPO, read_metrics, tiny_overrides

STEPS = 10


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(args, step_sleep: float = 0.0):
    env = _env()
    cmd = [PY, "-m", "attnres_train", *args]
    if step_sleep:
        env["ATTNRES_TEST_STEP_SLEEP"] = str(step_sleep)
        cmd = [PY, "-m", "tests.train.test_kill_resume", "--worker", *args]
    run_dir = Path(next(a for a in args if a.startswith("run_dir=")).split("=", 1)[1])
    return subproc.popen(cmd, run_dir.parent / "logs", run_dir.name, env=env, cwd=REPO)


def _wait_for_steps(run_dir: Path, n: int, proc) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(read_metrics(run_dir)) >= n:
                return
        except (OSError, ValueError):  # not there yet, or a line half written
            pass
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    subproc.communicate(proc, timeout=60)
    raise AssertionError(f"no {n} steps logged; {subproc.failure(proc)}")


def test_first_sigint_sets_the_flag_a_second_one_raises_and_a_forwarded_copy_does_not():
    class One:  # the single-process context: no collective
        is_distributed = False

    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as s:
        # (checked first: without it the SIGINT below would interrupt the whole pytest session)
        assert signal.getsignal(signal.SIGINT) == s._handler
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert s.agreed(One()) == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # within the repeat window: torchrun's forwarded copy, ignored
        time.sleep(0.05)
        s._first_sigint -= 5.0  # as if the first press were 5 s ago
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_sigint_saves_exits_130_and_resumes_bit_exactly(corpus, tmp_path):
    args = lambda run_dir: tiny_overrides(corpus, run_dir, steps=STEPS)  # noqa: E731
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    ref = _launch(args(ref_dir))
    proc = _launch(args(run_dir), step_sleep=0.4)
    _wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = subproc.communicate(proc, timeout=300)
    assert proc.returncode == 130, subproc.failure(proc)
    assert "Traceback" not in err and "received SIGINT" in err, subproc.failure(proc)
    stopped_at = max(r["step"] for r in read_metrics(run_dir))
    assert 3 <= stopped_at < STEPS, stopped_at
    assert f"stopping on SIGINT: checkpoint {run_dir}" in out and "exiting with status 130" in out, out[-2000:]
    complete = CheckpointManager(run_dir / "checkpoints", 0).complete()
    assert [p.name for p in complete] == [f"step_{stopped_at:08d}"]
    meta = verify_checkpoint(complete[0])
    assert meta["step"] == stopped_at and meta["layout"]["tp"] == 1

    resumed = _launch(args(run_dir))
    out, err = subproc.communicate(resumed, timeout=600)
    assert resumed.returncode == 0, subproc.failure(resumed)
    ref_out, ref_err = subproc.communicate(ref, timeout=600)
    assert ref.returncode == 0, subproc.failure(ref)
    want = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(ref_dir)}
    got = [(r["step"], (r["loss"], r["grad_norm"])) for r in read_metrics(run_dir)]
    assert sorted({s for s, _ in got}) == list(range(1, STEPS + 1))
    for step, values in got:  # the interrupted launch's steps and the resumed ones: bit for bit
        assert values == want[step], (step, values, want[step])


@pytest.mark.slow
def test_second_sigint_aborts_at_once_without_saving(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(tiny_overrides(corpus, run_dir, steps=STEPS), step_sleep=4.0)
    _wait_for_steps(run_dir, 1, proc)  # now inside the 4 s pause after step 1
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # past the repeat window, still inside the pause
    proc.send_signal(signal.SIGINT)
    out, err = subproc.communicate(proc, timeout=120)
    assert proc.returncode == 130, subproc.failure(proc)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "without saving" in errors[0] and "Traceback" not in err, subproc.failure(proc)
    assert "received SIGINT again" in err
    # at once: no further step (a single Ctrl-C would have finished step 2 and saved it)
    assert [r["step"] for r in read_metrics(run_dir)] == [1]
    assert CheckpointManager(run_dir / "checkpoints", 0).complete() == []
