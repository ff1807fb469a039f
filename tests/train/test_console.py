"""The readable console and RUN_DIR/train.log (step k/N, s/step, tokens, elapsed, ETA, formatted numbers), rank 0
only, and ``trainer.num_threads`` (resolved, applied with torch.set_num_threads, printed, checked)."""

from __future__ import annotations

import os
import re

import pytest
import torch

from attnres_train.cli.train import run
from attnres_train.config.errors import ConfigError
from attnres_train.config.run import LoggingConfig, TrainerConfig, validate_trainer_config
from attnres_train.train.metrics import MetricsLogger
from attnres_train.train.threads import resolve_num_threads
from attnres_train.train.train_module import TrainModule

from .conftest import read_metrics, tiny_overrides

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_console_and_train_log_have_the_same_readable_lines(corpus, tmp_path, capsys, monkeypatch, keep_threads):
    run_dir = tmp_path / "run"
    threads = 1  # (more would only slow the test down on a busy machine)
    torch.set_num_threads(3)  # what the run must change
    seen = []
    real = TrainModule.train_batch

    def train_batch(self, batch, step):  # read back inside the run, where the work happens
        seen.append(torch.get_num_threads())
        return real(self, batch, step)

    monkeypatch.setattr(TrainModule, "train_batch", train_batch)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the configured value wins over the environment
    steps = 4
    run(tiny_overrides(corpus, run_dir, steps=steps, **{"trainer.val_every": 2, "trainer.num_threads": threads}))
    printed = [
        ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("[step", "run_dir", "threads", "warning:"))
    ]

    log = (run_dir / "train.log").read_text().splitlines()
    stamped = [ln for ln in log if STAMP.match(ln)]
    assert len(stamped) >= steps + 2 and all(STAMP.match(ln) for ln in log if not ln.startswith(" ")), log
    assert [STAMP.sub("", ln) for ln in stamped] == printed  # the same lines, with a time stamp

    assert seen == [threads] * steps
    [start] = [r for r in read_metrics(run_dir, "event") if r["event"] == "start"]
    assert start["num_threads"] == threads and start["threads_from"] == "trainer.num_threads"
    assert any(ln.startswith(f"threads {threads} per process (trainer.num_threads) | start-up ") for ln in printed)

    train = {r["step"]: r for r in read_metrics(run_dir)}
    for k in range(1, steps + 1):
        [line] = [ln for ln in printed if ln.startswith(f"[step {k}/{steps}] loss ")]
        r = train[k]
        tokens = k * 4 * 64  # global batch x seq_len per step
        shown = f"{tokens / 1000:.3g}k" if tokens >= 1000 else str(tokens)
        assert r["tokens_seen"] == tokens and f"| tokens {shown} |" in line, line
        assert f"loss {r['loss']:.4f} |" in line and f"| {r['s_per_step']:.3g} s/step |" in line, line
        eta = int(round(r["eta_s"]))
        assert f"| ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d} |" in line, line
        assert "| elapsed 0:" in line and r["elapsed_s"] >= r["s_per_step"] > 0, line
    assert train[steps]["eta_s"] == 0
    vals = [ln for ln in printed if " val_loss " in ln]
    assert [ln.split("]")[0] for ln in vals] == ["[step 2/4", "[step 4/4"], vals
    for ln in printed:  # no raw floats: at most 4 significant digits after a decimal point
        assert not re.search(r"\d\.\d{5,}", ln), ln


def test_a_float_field_is_never_printed_raw():
    rec = {"kind": "val", "step": 7, "time": 0.0, "val_loss": 4.020409107208252, "val_ppl": 55.70251846313477}
    assert MetricsLogger._format(rec, 10) == "[step  7/10] val_loss 4.02 | val_ppl 55.7"
    rec = {"kind": "event", "step": 3, "time": 0.0, "event": "skipped_step", "loss": 1.23456789e-09, "consecutive": 1}
    assert MetricsLogger._format(rec) == "[step      3] event skipped_step: loss=1.235e-09 consecutive=1"


def test_only_rank_0_writes_train_log(tmp_path):
    MetricsLogger(tmp_path, LoggingConfig(), enabled=False).info("hello")
    assert not (tmp_path / "train.log").exists()


def test_num_threads_resolution_and_limits(monkeypatch):
    cores = _cores()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_num_threads(None)[0] == max(1, cores // 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert resolve_num_threads(None)[0] == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_num_threads(None) == (1, "OMP_NUM_THREADS")
    assert resolve_num_threads(cores) == (cores, "trainer.num_threads")
    for bad in (0, -1, cores + 1):
        with pytest.raises(ConfigError) as err:
            validate_trainer_config(TrainerConfig(num_threads=bad))
        assert err.value.field == "trainer.num_threads"
    assert "only" in str(err.value) and f"{cores} core" in str(err.value)
