"""The slurm path against a real slurm on localhost: no mocks of sbatch, srun, scancel, scontrol or squeue.

``launch/slurm_local.sh start`` brings up munge + slurmctld + slurmd for this machine (installing the Debian
packages first when they are missing and this is root on Debian/Ubuntu; where that is impossible (exit 3) or the
daemons do not come up on the machine (exit 2), these tests skip with its message and slurmctld's log). Then, as a user would:

* ``sbatch launch/slurm.sbatch`` with 2 processes trains to the end; its losses equal ``launch/torchrun.sh
  --nproc 2`` with the same arguments, bit for bit (same layout, same machine);
* preemption: ``scancel -s USR1`` -> every rank finishes its step, saves and exits 0 and the job ends COMPLETED
  with exit code 0 (torchrun's agent ignores USR1, launch/torchrun.sh); ``scontrol requeue`` -> the job resumes
  from that checkpoint and the losses of the whole run equal the uninterrupted run bit for bit;
* a time limit with ``--signal=USR1@N`` behaves the same (saved, COMPLETED, exit 0 before the limit);
* ``attnres-train -m hydra/launcher=slurm_cpu`` submits one slurm job per sweep point, every run dir complete;
* a sweep job slurm can never start (more CPUs than the partition has: reason PartitionConfig) is reported with
  slurm's reason and cancelled, and the sweep exits with status 2 (one ``error:`` line) instead of waiting forever.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import subproc
from tests.train.conftest import read_metrics

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
SLURM_DIR = os.environ.get("SLURM_LOCAL_DIR", "/tmp/attnres-slurm")
STEPS = 10
pytestmark = pytest.mark.slow


def _run(cmd, env, timeout=600, log_dir=None, name="cmd", **kw):
    """With ``log_dir``: the whole output saved there (tests/subproc.py); threads pinned either way."""
    if log_dir is not None:
        return subproc.run(cmd, log_dir, name, env=env, cwd=REPO, timeout=timeout, **kw)
    return subprocess.run(
        cmd, cwd=REPO, env=subproc.child_env(env), capture_output=True, text=True, timeout=timeout, **kw
    )


@pytest.fixture(scope="module")
def slurm():
    script = REPO / "launch" / "slurm_local.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_LOCAL_DIR=SLURM_DIR, SLURM_CONF=f"{SLURM_DIR}/slurm.conf", OMP_NUM_THREADS="1")
    was_up = _run(["bash", str(script), "status"], env, timeout=60).returncode == 0
    proc = _run(["bash", str(script), "start"], env, timeout=900)
    if proc.returncode in (2, 3):  # 3: cannot be installed here; 2: the daemons would not start on this machine
        log = Path(SLURM_DIR, "log", "slurmctld.log")
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        pytest.skip(f"no local slurm on this machine: {proc.stderr.strip()} {tail}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield env
    if not was_up:
        _run(["bash", str(script), "stop"], env, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_corpus")
    src = Path(shutil.__file__).parent / "json"
    for p in sorted(src.glob("*.py")):
        (root / p.name).write_text(p.read_text())
    return root


def _args(corpus: Path, run_dir: Path, steps: int = STEPS, **extra) -> list:
    ov = {
        "model": "tiny",
        "model.residual.mode": "block",
        "model.residual.num_blocks": 2,
        "data.sources": f"[{{path: '{corpus}', kind: text}}]",
        "data.seq_len": 64,
        "data.cache_dir": str(run_dir.parent / "data_cache"),
        "data.num_workers": 0,
        "trainer.device": "cpu",
        "trainer.max_steps": steps,
        "trainer.global_batch_size": 4,
        "trainer.micro_batch_size": 1,
        "trainer.log_every": 1,
        "trainer.val_every": 0,
        "trainer.sample_every": 0,
        "trainer.depth_stats_every": 0,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        "checkpoint.interval": 0,
        "run_dir": str(run_dir),
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def _losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def _sbatch(env, out: Path, args: list, *options) -> str:
    proc = _run(
        [
            "sbatch",
            "--parsable",
            "--nodes",
            "1",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--output={out}",
            *options,
            "launch/slurm.sbatch",
            *args,
        ],
        {**env, "GPUS_PER_NODE": "2"},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(env, job: str) -> dict:
    text = _run(["scontrol", "show", "job", job], env, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait_state(env, job: str, done, timeout: float = 420) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = _job(env, job)
        if done(info):
            return info
        time.sleep(2)
    raise AssertionError(f"job {job} did not reach the expected state: {_job(env, job)}")


def _finished(info: dict) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _wait_for_line(path: Path, pattern: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        time.sleep(1)
    raise AssertionError(f"{pattern!r} never appeared in {path}: {path.read_text() if path.exists() else ''}")


@pytest.fixture(scope="module")
def reference(slurm, corpus, tmp_path_factory):
    """Losses of the same run through ``launch/torchrun.sh --nproc 2`` (no slurm involved)."""
    run_dir = tmp_path_factory.mktemp("slurm_runs") / "torchrun"
    subproc.check(
        _run(
            ["bash", "launch/torchrun.sh", "--nproc", "2", "--", *_args(corpus, run_dir)],
            slurm,
            log_dir=run_dir.parent,
            name="torchrun",
        )
    )
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_sbatch_trains_like_torchrun(slurm, corpus, reference, tmp_path):
    out = tmp_path / "job.out"
    job = _sbatch(slurm, out, _args(corpus, tmp_path / "run"))
    info = _wait_state(slurm, job, _finished)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out.read_text()[-3000:]
    assert _losses(tmp_path / "run") == reference  # bit for bit


def test_usr1_saves_exits_zero_and_requeue_resumes_exactly(slurm, corpus, reference, tmp_path):
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    job = _sbatch(slurm, out, _args(corpus, run_dir))
    _wait_for_line(out, rf"\[step +2/{STEPS}\]")
    assert _run(["scancel", "-s", "USR1", job], slurm, timeout=30).returncode == 0
    info = _wait_state(slurm, job, _finished)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert "User defined signal" not in text  # torchrun's agent no longer dies of it
    stopped = [int(m) for m in re.findall(r"\[step +(\d+)/\d+\] stopping on SIGUSR1", text)]
    assert stopped and stopped[0] < STEPS, text[-3000:]
    first = _losses(run_dir)
    assert sorted(first) == list(range(1, stopped[0] + 1))

    assert _run(["scontrol", "requeue", job], slurm, timeout=30).returncode == 0
    info = _wait_state(slurm, job, lambda i: i.get("Restarts") == "1" and _finished(i))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out.read_text()[-3000:]
    assert f"event resumed: path={run_dir}/checkpoints/step_{stopped[0]:08d}" in out.read_text()
    assert _losses(run_dir) == reference  # the whole curve, bit for bit, across the preemption


def test_time_limit_signal_saves_before_the_limit(slurm, corpus, tmp_path):
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    # 2 minute limit, USR1 45 s before it (slurm checks every 30 s, so it comes 45-75 s after the start: after
    # start-up, when the workers' handlers are installed); 1000 steps cannot finish in 2 minutes here
    job = _sbatch(slurm, out, _args(corpus, run_dir, steps=1000), "--time=2", "--signal=USR1@45")
    info = _wait_state(slurm, job, _finished, timeout=400)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    stopped = [int(m) for m in re.findall(r"\[step +(\d+)/\d+\] stopping on SIGUSR1", text)]
    assert stopped and (run_dir / "checkpoints" / f"step_{stopped[0]:08d}").is_dir(), text[-3000:]


def test_hydra_sweep_submits_one_job_per_point(slurm, corpus, tmp_path):
    sweep = tmp_path / "sweep"
    args = _args(corpus, sweep, steps=3, **{"model.residual.num_blocks": "1,2", "checkpoint.interval": 3})
    subproc.check(
        _run(
            [PY, "-m", "attnres_train", "-m", "hydra/launcher=slurm_cpu", *args],
            slurm,
            timeout=600,
            log_dir=tmp_path / "logs",
            name="sweep",
        )
    )
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    # named in the slurm job's own process (the sweep_dirname resolver there: cli/sweep_dirs.py)
    assert [p.name for p in runs] == ["model.residual.num_blocks=1", "model.residual.num_blocks=2"], list(
        sweep.iterdir()
    )
    for run in runs:
        assert sorted(_losses(run)) == [1, 2, 3]
        assert (run / "checkpoints" / "step_00000003").is_dir()
    jobs = {p.name for p in (sweep / ".submitit").iterdir()}
    assert len(jobs) >= 1  # one array job (or one job per point), submitted through sbatch


def test_unschedulable_sweep_job_is_reported_and_cancelled(slurm, corpus, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**slurm, "ATTNRES_SLURM_PENDING_GRACE_S": "3"}
    args = _args(corpus, sweep, steps=3)
    t0 = time.monotonic()
    proc = _run(
        [PY, "-m", "attnres_train", "-m", "hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=64", *args],
        env,
        timeout=300,
        log_dir=tmp_path / "logs",
        name="sweep",
    )
    subproc.check(proc, 2)
    assert "error: slurm job" in proc.stderr and "can never start (PartitionConfig" in proc.stderr, subproc.failure(
        proc
    )
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 240
    assert _run(["squeue", "-h", "-o", "%i %T %r"], slurm, timeout=30).stdout.strip() == ""  # cancelled, not queued
