"""Background (async) saves, the manifest's run fields, and retention that never drops the checkpoint just saved.

Single process; the multi-rank async path runs in tests/train/test_kill_resume.py (kill -9 during an async
write) and the trainer tests.
"""

import hashlib
import threading

import pytest
import torch
from torch import nn

import attnres_train.checkpoint.manager as manager_mod
from attnres_train.checkpoint import CheckpointManager, is_complete, verify_checkpoint
from attnres_train.config.errors import ConfigError
from attnres_train.config.run import TrainerConfig, validate_trainer_config
from attnres_train.config.train import CheckpointConfig, validate_checkpoint_config

CONFIG_TEXT = "model:\n  name: toy\n"


def _state(model):
    return {"model": model.state_dict()}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))


def test_async_save_snapshots_state_then_commits(tmp_path):
    model = _model()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(tmp_path, keep_last=2)
    path = mgr.save(3, _state(model), config_text=CONFIG_TEXT, meta={"tokens_seen": 30}, blocking=False)
    with torch.no_grad():  # training goes on while the background thread writes: must not leak into the file
        for p in model.parameters():
            p.add_(1.0)
    assert mgr.pending == path
    assert mgr.wait() == path and mgr.pending is None and mgr.wait() is None
    meta = verify_checkpoint(path)
    assert meta["step"] == 3 and meta["tokens_seen"] == 30
    assert meta["config_sha256"] == hashlib.sha256(CONFIG_TEXT.encode()).hexdigest()
    target = _state(_model(1))
    mgr.load(path, target)
    for k, v in snapshot.items():
        assert torch.equal(target["model"][k], v), k


def test_async_checkpoint_is_not_complete_before_its_commit(tmp_path, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    real = manager_mod.build_manifest

    def slow_manifest(directory):
        entered.set()
        release.wait(30)
        return real(directory)

    monkeypatch.setattr(manager_mod, "build_manifest", slow_manifest)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    path = mgr.save(2, _state(_model()), config_text=CONFIG_TEXT, meta={}, blocking=False)
    assert entered.wait(30)  # the DCP files are written; the commit has not happened
    assert not is_complete(path) and mgr.latest() is None and len(mgr.stale()) == 1
    release.set()
    assert mgr.wait() == path and is_complete(path) and mgr.stale() == []


def test_async_failure_is_raised_by_wait_and_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    good = mgr.save(1, _state(_model()), config_text=CONFIG_TEXT, meta={})

    def boom(directory):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(manager_mod, "build_manifest", boom)
    mgr.save(2, _state(_model()), config_text=CONFIG_TEXT, meta={}, blocking=False)
    with pytest.raises(RuntimeError, match="step 2.*disk full.*partial directory was removed"):
        mgr.wait()
    assert mgr.latest() == good and mgr.stale() == []
    monkeypatch.undo()
    # the next save (async too) waits for nothing, removes the leftover and commits
    third = mgr.save(3, _state(_model()), config_text=CONFIG_TEXT, meta={}, blocking=False)
    assert mgr.wait() == third and mgr.stale() == [] and [p.name for p in mgr.complete()] == [good.name, third.name]


def test_next_save_waits_for_the_previous_one(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        mgr.save(step, _state(_model(step)), config_text=CONFIG_TEXT, meta={}, blocking=False)
    mgr.wait()
    assert [p.name for p in mgr.complete()] == ["step_00000001", "step_00000002", "step_00000003"]
    for p in mgr.complete():
        verify_checkpoint(p)


def test_retention_never_deletes_the_checkpoint_just_saved(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    for step in (2, 8):
        mgr.save(step, _state(_model()), config_text=CONFIG_TEXT, meta={})
    assert [p.name for p in mgr.complete()] == ["step_00000008"]
    # a run resumed from an older checkpoint saves step 5 while step 8 (a run that went further) exists
    five = mgr.save(5, _state(_model()), config_text=CONFIG_TEXT, meta={})
    assert mgr.complete() == [five]
    mgr2 = CheckpointManager(tmp_path, keep_last=2)
    mgr2.save(8, _state(_model()), config_text=CONFIG_TEXT, meta={})
    six = mgr2.save(6, _state(_model()), config_text=CONFIG_TEXT, meta={})
    assert six in mgr2.complete() and len(mgr2.complete()) == 2


def test_manifest_records_run_position_layout_and_config_hash(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    layout = {"world_size": 1, "pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1, "sp": False, "ep": 1}
    path = mgr.save(
        4,
        _state(_model()),
        config_text=CONFIG_TEXT,
        meta={"tokens_seen": 1024, "layout": layout, "data": {"consumed_samples": 16}},
    )
    meta = verify_checkpoint(path)
    assert meta["step"] == 4 and meta["tokens_seen"] == 1024 and meta["layout"] == layout
    assert meta["config_sha256"] == meta["manifest"]["config.yaml"]["sha256"]
    assert {".metadata", "config.yaml", "rng/rank_0.pt"} <= set(meta["manifest"])
    with pytest.raises(ValueError, match="config_sha256"):
        mgr.save(5, _state(_model()), config_text=CONFIG_TEXT, meta={"config_sha256": "x"})


def test_fault_config_fields():
    validate_checkpoint_config(CheckpointConfig(async_save=True))
    with pytest.raises(ConfigError) as err:
        validate_checkpoint_config(CheckpointConfig(async_save="yes"))
    assert err.value.field == "checkpoint.async_save"
    validate_trainer_config(TrainerConfig(max_consecutive_skips=0, global_batch_size=8, micro_batch_size=8))
    with pytest.raises(ConfigError) as err:
        validate_trainer_config(TrainerConfig(max_consecutive_skips=-1, global_batch_size=8, micro_batch_size=8))
    assert err.value.field == "trainer.max_consecutive_skips"
