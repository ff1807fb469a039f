"""A full disk during a checkpoint save: one clear error, no partial directory left, the previous checkpoint intact.

Two ways a save meets a full disk, both injected in-process (no tmpfs or root needed):
* the free-space check before the save (``shutil.disk_usage`` reports less than the last checkpoint's size);
* ENOSPC from the file writes themselves (DCP's writer raises ``OSError(errno.ENOSPC)`` after a partial file).
The run stops with ``TrainingAborted`` (the command line prints its message as one ``error:`` line, exit 3).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem

from attnres_train.checkpoint import CheckpointManager, verify_checkpoint
from attnres_train.cli.train import run
from attnres_train.train.faults import TrainingAborted

from .conftest import tiny_overrides

Usage = namedtuple("Usage", "total used free")


def _hashes(path: Path) -> dict:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _ckpt_dirs(run_dir: Path) -> list:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_free_space_is_checked_against_the_last_checkpoint_before_saving(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real = shutil.disk_usage
    seen = []

    def disk_usage(path):
        """Save 1: the real disk. Save 2: exactly the size of checkpoint 1's data files free (enough).
        Save 3: one byte less than checkpoint 2's (not enough)."""
        done = sorted(p for p in Path(path).glob("step_*") if (p / "COMMITTED").is_file())
        if not done:
            return real(path)
        size = sum(
            f.stat().st_size for f in done[-1].rglob("*") if f.is_file() and f.name not in ("meta.json", "COMMITTED")
        )
        seen.append((done[-1].name, size))
        free = size if len(seen) == 1 else size - 1
        return Usage(10 * size, 9 * size, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(TrainingAborted) as err:
        run(tiny_overrides(corpus, run_dir, steps=3, **{"checkpoint.interval": 1, "checkpoint.keep_last": 1}))
    msg = str(err.value)
    assert [name for name, _ in seen] == ["step_00000001", "step_00000002"]
    prev = run_dir / "checkpoints" / "step_00000002"
    assert msg.startswith("step 3: checkpoint save of step 3 refused") and "No space left" in msg, msg
    assert f"{seen[1][1] / 2**20:,.1f} MiB" in msg and f"{prev} is intact" in msg, msg
    assert _ckpt_dirs(run_dir) == ["step_00000002"]  # nothing of step 3, step 1 pruned after step 2 committed
    assert verify_checkpoint(prev)["step"] == 2


def test_enospc_while_writing_removes_the_partial_directory_and_keeps_the_previous(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_write = filesystem._FileSystemWriter._write_data
    calls = []

    def write_data(self, planner, file_queue):
        calls.append(1)
        if len(calls) == 1:
            return real_write(self, planner, file_queue)
        with open(Path(self.path) / "__0_0.distcp", "wb") as f:  # the disk fills up half way through a file
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filesystem._FileSystemWriter, "_write_data", write_data)
    snapshot = {}
    real_save = CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 3:  # the previous checkpoint as it was just before the failing save
            snapshot.update(_hashes(run_dir / "checkpoints" / "step_00000002"))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", save)
    with pytest.raises(TrainingAborted) as err:
        run(tiny_overrides(corpus, run_dir, steps=3, **{"checkpoint.interval": 2}))
    msg = str(err.value)
    prev = run_dir / "checkpoints" / "step_00000002"
    assert len(calls) == 2 and err.value.exit_code == 3
    assert msg.startswith("step 3: checkpoint save of step 3") and "No space left on device" in msg, msg
    assert "partial directory was removed" in msg and f"{prev} is intact" in msg, msg
    assert "\n" not in msg and "Traceback" not in msg
    assert _ckpt_dirs(run_dir) == ["step_00000002"]  # no step_00000003.tmp-*
    assert (run_dir / "train.log").read_text().splitlines()[-1].endswith(f"error: {msg}")  # the log says why
    assert snapshot and _hashes(prev) == snapshot
    verify_checkpoint(prev)


def test_an_interrupt_inside_a_save_stays_an_interrupt(tmp_path, monkeypatch):
    """A second Ctrl-C while DCP writes (which wraps errors in its CheckpointException) must still abort as an
    interrupt (exit 130), not be reported as a failed save; the partial directory goes all the same."""
    mgr = CheckpointManager(tmp_path, keep_last=2)
    state = {"w": torch.arange(10.0)}
    first = mgr.save(1, state, config_text="x: 1\n", meta={})

    def write_data(self, planner, file_queue):
        raise KeyboardInterrupt

    monkeypatch.setattr(filesystem._FileSystemWriter, "_write_data", write_data)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, state, config_text="x: 1\n", meta={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    verify_checkpoint(first)
