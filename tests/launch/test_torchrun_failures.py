"""A worker that fails under launch/torchrun.sh ends in one line and the worker's exit code, not torchrun's report.

* (slow) 2 CPU workers on a data file with a bad line (passes the launcher's pre-flight, found by the workers):
  exit 2, the worker's ``error:`` line and the launcher's ``torchrun: rank k exited with code 2`` line, no
  ``Traceback`` / ``ChildFailedError`` anywhere, exactly one line starting with ``error:``, no run_dir left;
* ``cli/torchrun_main.failure_line`` on torchrun's own ``ProcessFailure`` records: which rank is the cause (a
  worker that exited by itself before one killed by SIGKILL before the peers the agent SIGTERMed), the shell's
  exit code for a signal (128 + N), the per-rank log named when it exists.
"""

from __future__ import annotations

import os
import signal

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from attnres_train.cli.torchrun_main import failure_line, run_dir_from
from tests import subproc

from .test_launch import REPO, TORCHRUN


def _failure(rank: int, code: int, timestamp: int = 100) -> ProcessFailure:
    f = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="<N/A>")
    f.timestamp = timestamp
    return f


@pytest.mark.slow
def test_bad_data_found_by_the_workers_ends_in_one_line_and_exit_2(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\nnot json at all\n' + '{"text": "fine"}\n' * 20)
    run_dir = tmp_path / "run"
    overrides = [
        "model=tiny",
        "trainer.device=cpu",
        f"data.sources=[{{path: '{data}', kind: jsonl}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run_dir={run_dir}",
        "data.seq_len=64",
        "trainer.max_steps=2",
        "optim.warmup_steps=1",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE")}
    env["PYTHON"] = os.environ.get("PYTHON", str(REPO / ".venv" / "bin" / "python"))
    proc = subproc.run(
        ["bash", TORCHRUN, "--nproc", "2", "--", *overrides], tmp_path / "logs", "torchrun", env=env, timeout=300
    )
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2, subproc.failure(proc)
    assert "Traceback" not in both and "ChildFailedError" not in both, subproc.failure(proc)
    # a rank that waited on the failed build reports the bad line too, never the cache it saw removed
    assert "cannot create" not in both and "No such file" not in both, subproc.failure(proc)
    lines = proc.stderr.splitlines()  # tqdm's \r-separated progress ends a line too
    errors = [ln for ln in lines if ln.startswith("error:")]
    worker = [ln for ln in lines if "error:" in ln and f"{data}:2" in ln]
    assert len(errors) == 1 and worker, subproc.failure(proc)
    launcher = [ln for ln in lines if ln.startswith("torchrun: rank")]
    assert len(launcher) == 1 and "exited with code 2 (bad input" in launcher[0], subproc.failure(proc)
    assert not run_dir.exists()


def test_the_cause_is_the_rank_that_failed_by_itself():
    # rank 1 exited 2 (bad input); the agent then SIGTERMed ranks 0 and 2 (recorded with an earlier timestamp)
    failures = {0: _failure(0, -15, 50), 1: _failure(1, 2, 60), 2: _failure(2, -15, 50)}
    line, code = failure_line(failures, None)
    assert code == 2
    assert line == (
        "torchrun: rank 1 exited with code 2 (bad input: see the error line above); "
        "then rank 0 was killed by SIGTERM, rank 2 was killed by SIGTERM"
    )


def test_a_killed_worker_is_the_cause_before_the_peers_the_agent_stopped(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "rank0.log").write_text("rank 0's traceback\n")
    # rank 1 was SIGKILLed (OOM killer); rank 0 then failed its collective and the agent SIGTERMed it
    failures = {0: _failure(0, -signal.SIGTERM), 1: _failure(1, -signal.SIGKILL)}
    line, code = failure_line(failures, str(run_dir))
    assert code == 128 + 9
    assert line.startswith("error: rank 1 was killed by SIGKILL; each failed rank's traceback is in run_dir/logs/")
    assert line.endswith("; then rank 0 was killed by SIGTERM")
    # a crash (exit 1) on two ranks: both named, with the log that exists
    (run_dir / "logs" / "rank1.log").write_text("rank 1's traceback\n")
    line, code = failure_line({0: _failure(0, 1), 1: _failure(1, 1)}, str(run_dir))
    assert code == 1
    assert line == f"error: ranks 0, 1 exited with code 1; log: {run_dir}/logs/rank0.log, {run_dir}/logs/rank1.log"
    # an aborted run (exit 3) printed its own error line: the launcher's line is no second `error:` line
    line, code = failure_line({0: _failure(0, 3)}, None)
    assert code == 3 and line == "torchrun: rank 0 exited with code 3 (run aborted: see the error line above)"


def test_run_dir_is_the_last_override():
    argv = ["--standalone", "--nproc-per-node", "2", "-m", "attnres_train", "run_dir=a", "x.run_dir=b", "+run_dir=c"]
    assert run_dir_from(argv) == "c"
    assert run_dir_from(["-m", "attnres_train", "model=tiny"]) is None
