"""Faults: non-finite steps are skipped (agreed by every rank) and too many stop the run; SIGTERM / SIGUSR1 stop
with a checkpoint and exit 0; a dead (kill -9) or hung (SIGSTOP) rank makes the others exit non-zero within
``trainer.dist_timeout_s`` instead of hanging.

The multi-rank tests start ranks themselves (plain processes with RANK / WORLD_SIZE / MASTER_* set) rather than
under torchrun where the point is the collective timeout: torchrun's agent notices a dead worker and SIGTERMs
the others within a second, which would hide whether the ranks' own timeouts work. A SIGSTOP'd rank is alive
as far as any launcher can tell, so only the collective timeout can end the others.

``python -m tests.train.test_faults --worker <overrides>`` is the rank entry point for these tests: it applies
the fault injection described by ``ATTNRES_TEST_NONFINITE`` (``steps=3,4;what=loss|grad;ranks=1``), sleeps
``ATTNRES_TEST_STEP_SLEEP`` seconds after each step, writes its pid to ``ATTNRES_TEST_PID_DIR/rank_<r>`` and runs
the normal command line.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnres_train.checkpoint import CheckpointManager, verify_checkpoint
from attnres_train.cli.train import run
from attnres_train.config.model import ModelConfig
from attnres_train.config.run import TrainerConfig
from attnres_train.config.train import OptimConfig
from attnres_train.model import build_model
from attnres_train.parallel.mesh import single_process_context
from attnres_train.train.faults import StopSignals, TrainingAborted, is_comm_failure
from attnres_train.train.train_module import TrainModule
from tests import subproc

from .conftest import PY, REPO, read_metrics, tiny_overrides


# -- fault injection (used in-process through monkeypatch, and by the --worker entry point) -----------------------
def install_nonfinite(setattr_fn, steps, what="grad", ranks=None) -> None:
    """Make the given 1-based steps non-finite on ``ranks`` (None: all): NaN gradients after backward
    (``what="grad"``) or a NaN loss with finite gradients (``what="loss"``)."""
    orig_tb, orig_fb = TrainModule.train_batch, TrainModule.forward_backward
    steps = set(steps)

    def train_batch(self, batch, step):
        self._inject_nan = (step + 1) in steps and (ranks is None or self.ctx.rank in ranks)
        return orig_tb(self, batch, step)

    def forward_backward(self, batch):
        stats = orig_fb(self, batch)
        if getattr(self, "_inject_nan", False):
            if what == "loss":
                stats = {**stats, "loss": float("nan")}
            else:
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
        return stats

    setattr_fn(TrainModule, "train_batch", train_batch)
    setattr_fn(TrainModule, "forward_backward", forward_backward)


def _worker_main(argv) -> None:
    spec = os.environ.get("ATTNRES_TEST_NONFINITE")
    if spec:
        kv = dict(part.split("=", 1) for part in spec.split(";"))
        ranks = {int(r) for r in kv["ranks"].split(",")} if kv.get("ranks") else None
        install_nonfinite(setattr, [int(s) for s in kv["steps"].split(",")], kv.get("what", "grad"), ranks)
    pause = float(os.environ.get("ATTNRES_TEST_STEP_SLEEP") or 0)
    if pause > 0:  # a signal sent "mid-run" must land mid-run on fast machines too
        real = TrainModule.train_batch

        def slow_train_batch(self, batch, step):
            out = real(self, batch, step)
            time.sleep(pause)
            return out

        TrainModule.train_batch = slow_train_batch
    pid_dir = os.environ.get("ATTNRES_TEST_PID_DIR")
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank_{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    from attnres_train.cli.train import main

    sys.argv = ["attnres-train", *argv]
    main()


# -- the train module's skip ---------------------------------------------------------------------------------------
def _tiny_module():
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg)
    tc = TrainerConfig(global_batch_size=2, micro_batch_size=2, max_steps=10)
    module = TrainModule(model, OptimConfig(lr=1e-3, warmup_steps=0), tc, single_process_context(), max_steps=10)
    batch = torch.randint(0, cfg.vocab_size, (2, 33))
    return module, batch


def _snapshot(module):
    params = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    buffers = {n: b.clone() for n, b in module.model.named_buffers() if "e_score_correction_bias" in n}
    opt = [
        {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for o in module.optimizers for s in o.state.values()
    ]
    return params, buffers, opt


@pytest.mark.parametrize("what", ["grad", "loss"])
def test_non_finite_step_is_skipped_without_touching_any_state(what, monkeypatch):
    module, batch = _tiny_module()
    assert not module.train_batch(batch, 0).get("skipped")  # optimizer state exists from here on
    before = _snapshot(module)
    assert before[1], "the tiny model has router biases"
    install_nonfinite(monkeypatch.setattr, steps=[2], what=what)
    out = module.train_batch(batch, 1)
    assert out["skipped"] is True and "expert_imbalance_max" not in out
    assert (not math.isfinite(out["grad_norm"])) if what == "grad" else not math.isfinite(out["loss"])
    after = _snapshot(module)
    for a, b in zip(before, after):
        assert a.keys() == b.keys() if isinstance(a, dict) else len(a) == len(b)
    for n in before[0]:
        assert torch.equal(before[0][n], after[0][n]), n  # no optimizer step
    for n in before[1]:
        assert torch.equal(before[1][n], after[1][n]), n  # no router-bias update
    for s0, s1 in zip(before[2], after[2]):
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k  # Adam moments and step count untouched
    assert all(p.grad is None for p in module.model.parameters())
    assert all(float(m.tokens_per_expert.sum()) == 0 for m in module.model.moe_layers())
    assert not module.train_batch(batch, 2).get("skipped")  # the next good step trains normally


def test_skipped_steps_then_stop_names_the_step_and_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    install_nonfinite(monkeypatch.setattr, steps=[3, 5, 6])
    with pytest.raises(TrainingAborted) as err:
        run(tiny_overrides(corpus, run_dir, steps=8, **{"checkpoint.interval": 2, "trainer.max_consecutive_skips": 1}))
    msg = str(err.value)
    assert msg.startswith("step 6:") and "2 consecutive steps (5..6)" in msg and "max_consecutive_skips=1" in msg
    good = run_dir / "checkpoints" / "step_00000004"
    assert str(good) in msg and "stopped without saving" in msg
    # step 3 was skipped alone (within the limit); step 6 is due for a checkpoint but skipped: none written
    assert [p.name for p in CheckpointManager(run_dir / "checkpoints", 0).complete()] == [
        "step_00000002",
        "step_00000004",
    ]
    train = read_metrics(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [bool(r.get("skipped")) for r in train] == [False, False, True, False, True, True]
    assert all(math.isfinite(r["loss"]) for r in train)  # NaN gradients, finite losses
    events = [r for r in read_metrics(run_dir, "event") if r.get("event") == "skipped_step"]
    assert [(e["step"], e["consecutive"]) for e in events] == [(3, 1), (5, 1), (6, 2)]
    assert verify_checkpoint(good)["step"] == 4


def test_stop_signal_handler_sets_a_flag_and_restores_the_old_handler():
    class One:  # the single-process context: no collective
        is_distributed = False

    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as s:
        assert s.agreed(One()) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert s.agreed(One()) == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_comm_failures_are_recognised():
    assert is_comm_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert is_comm_failure(RuntimeError("[../gloo/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"))
    assert is_comm_failure(torch.distributed.DistBackendError("NCCL watchdog"))
    assert not is_comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_comm_failure(KeyboardInterrupt())
    assert not is_comm_failure(TrainingAborted("rank 0: a collective operation failed (gloo ...)"))


# -- multi-rank: processes we start ourselves -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = subproc.child_env(PYTHONUNBUFFERED="1")  # threads pinned (tests/subproc.py)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start_ranks(world: int, overrides: list, log_dir: Path, **env_extra) -> list:
    port = _free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(world):
        env = _env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env_extra)
        out = open(log_dir / f"rank_{r}.log", "w")
        procs.append(
            subprocess.Popen(
                [PY, "-m", "attnres_train", *overrides], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        )
    return procs


def _wait_for_steps(run_dir: Path, n: int, procs: list, limit: float = 400) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if len(read_metrics(run_dir)) >= n:
                return
        except (OSError, ValueError):  # not there yet, or a line half written
            pass
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early: {[p.poll() for p in procs]}")
        time.sleep(0.2)
    raise AssertionError(f"no {n} training steps within {limit}s")


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def warm_cache(corpus, tmp_path_factory):
    """Runs share one data cache dir (tiny_overrides puts it next to the run dir), built once up front so no
    rank spends the collective timeout tokenizing while the others wait."""
    root = tmp_path_factory.mktemp("faults")
    run(tiny_overrides(corpus, root / "warm", steps=2))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_dead_or_hung_rank_makes_the_others_exit_within_the_timeout(fault, corpus, warm_cache):
    """kill -9 (dead: peers see the closed connection) on 4 ranks; SIGSTOP (hung: only the collective timeout can
    end the wait) on 2 ranks."""
    world, victim, timeout_s = (4, 2, 30) if fault == "kill" else (2, 1, 20)
    run_dir = warm_cache / f"dead_{fault}"
    args = tiny_overrides(
        corpus,
        run_dir,
        steps=400,
        **{"trainer.micro_batch_size": 1, "trainer.dist_timeout_s": timeout_s, "checkpoint.interval": 0},
    )
    procs = _start_ranks(world, args, run_dir.parent / f"logs_{fault}")
    try:
        _wait_for_steps(run_dir, 2, procs)
        t0 = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        survivors = [p for r, p in enumerate(procs) if r != victim]
        slack = 40
        elapsed = {}
        while time.monotonic() - t0 < timeout_s + slack and len(elapsed) < len(survivors):
            for p in survivors:
                if p.pid not in elapsed and p.poll() is not None:
                    elapsed[p.pid] = time.monotonic() - t0
            time.sleep(0.1)
        codes = [p.poll() for p in survivors]
    finally:
        _kill_all(procs)
    print(f"{fault}: survivors exited after {sorted(round(v, 1) for v in elapsed.values())} s, codes {codes}")
    assert len(elapsed) == len(survivors), f"survivors still running {timeout_s + slack}s after the {fault}: {codes}"
    assert all(c not in (0, None) for c in codes), codes
    if fault == "hang":  # nothing but the timeout can have ended the wait
        assert min(elapsed.values()) >= timeout_s - 2, elapsed
    logs = [(run_dir.parent / f"logs_{fault}" / f"rank_{r}.log").read_text() for r in range(world) if r != victim]
    for text in logs:
        assert "a collective operation failed during step" in text and "trainer.dist_timeout_s" in text, text[-3000:]
    for r in range(world):  # each survivor's own traceback of the failed collective (docs/training.md)
        if r != victim:
            text = (run_dir / "logs" / f"rank{r}.log").read_text()
            assert f"rank {r} (pid " in text and "Traceback (most recent call last)" in text, text[-3000:]
    assert not (run_dir / "logs" / f"rank{victim}.log").exists()  # kill -9 / SIGSTOP: the victim wrote nothing


@pytest.mark.slow
def test_two_ranks_agree_on_a_skip_and_on_a_stop_signal_seen_by_one_rank(corpus, warm_cache, monkeypatch):
    """Rank 1 alone sees a NaN loss at step 3 and alone receives SIGUSR1 later: both ranks skip step 3, both stop
    after the same step with one checkpoint, torchrun exits 0, and the resumed run continues the trajectory of
    an uninterrupted run (single process, same skip) within tolerance."""
    steps, extra = 8, {"trainer.micro_batch_size": 1, "checkpoint.interval": 0}
    ref_dir, dp_dir = warm_cache / "agree_ref", warm_cache / "agree_dp"
    with monkeypatch.context() as m:
        install_nonfinite(m.setattr, steps=[3], what="loss")
        run(tiny_overrides(corpus, ref_dir, steps=steps, **extra))
    ref = {r["step"]: r for r in read_metrics(ref_dir)}
    assert ref[3].get("skipped") and not any(ref[s].get("skipped") for s in ref if s != 3)

    pid_dir = warm_cache / "agree_pids"
    env = _env(
        ATTNRES_TEST_NONFINITE="steps=3;what=loss;ranks=1", ATTNRES_TEST_PID_DIR=pid_dir, ATTNRES_TEST_STEP_SLEEP=0.3
    )
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tests.train.test_faults",
        "--worker",
        *tiny_overrides(corpus, dp_dir, steps=steps, **extra),
    ]
    proc = subproc.popen(cmd, warm_cache / "logs", "torchrun-sigusr1", env=env, cwd=REPO)
    try:
        _wait_for_steps(dp_dir, 4, [proc])
        os.kill(int((pid_dir / "rank_1").read_text()), signal.SIGUSR1)
        out, err = subproc.communicate(proc, timeout=300)
    finally:
        _kill_all([proc])
    subproc.check(proc)
    assert "[rank 1] received SIGUSR1" in err and "stopping on SIGUSR1" in out, subproc.failure(proc)
    got = {r["step"]: r for r in read_metrics(dp_dir)}
    last = max(got)
    assert 4 <= last < steps and got[3].get("skipped") and not any(got[s].get("skipped") for s in got if s != 3)
    stopped = [r for r in read_metrics(dp_dir, "event") if r.get("event") == "stopped"]
    assert [(r["step"], r["signal"]) for r in stopped] == [(last, "SIGUSR1")]
    complete = CheckpointManager(dp_dir / "checkpoints", 0).complete()
    assert [p.name for p in complete] == [f"step_{last:08d}"]

    subproc.check(
        subproc.run(
            [
                PY,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "attnres_train",
                *tiny_overrides(corpus, dp_dir, steps=steps, **extra),
            ],
            warm_cache / "logs",
            "torchrun-resumed",
            env=_env(),
            cwd=REPO,
        )
    )
    got = {}
    for r in read_metrics(dp_dir):
        got[r["step"]] = r
    assert sorted(got) == list(range(1, steps + 1))
    worst = max(abs(got[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in got if s != 3)
    print(f"2 ranks vs single process, max relative loss delta over steps != 3: {worst:.2e}")
    assert worst <= 1e-4, {s: (got[s]["loss"], ref[s]["loss"]) for s in got}


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main([a for a in sys.argv[1:] if a != "--worker"])
