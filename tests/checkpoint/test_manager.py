"""CheckpointManager: round trip, atomicity, retention, corruption detection, resume resolution, RNG, safety.

Optimizer state is created by stepping on random gradients (no forward pass) to keep the suite fast.
"""

import json
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import attnres_train.checkpoint.manager as manager_mod
from attnres_train.checkpoint import (
    CheckpointManager,
    capture_rng,
    read_config_text,
    restore_rng,
    step_dir_name,
    verify_checkpoint,
)
from attnres_train.checkpoint.safe_dcp import SafeFileSystemReader
from attnres_train.config.errors import UserInputError
from attnres_train.config.model import ModelConfig
from attnres_train.config.train import OptimConfig
from attnres_train.model import build_model
from attnres_train.train.optim import build_optimizers
from tests.train.test_optim import Toy

CONFIG_TEXT = "model:\n  name: tiny\n"


def _trained(seed):
    torch.manual_seed(seed)
    model = build_model(ModelConfig())
    opts = build_optimizers(model, OptimConfig())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for o in opts:
        o.step()
        o.zero_grad()
    return model, opts


def _state(model, opts):
    msd, osd = get_state_dict(model, opts)
    return {"model": msd, "optim": osd}


def _save(mgr, step, model, opts, **meta):
    return mgr.save(step, _state(model, opts), config_text=CONFIG_TEXT, meta={"tokens_seen": step * 10, **meta})


@pytest.fixture(scope="module")
def trained():
    return _trained(0)


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_round_trip_model_and_adamw(tmp_path, trained):
    model, opts = trained
    mgr = CheckpointManager(tmp_path, keep_last=3)
    meta = {"tokens_seen": 70, "data": {"epoch": 1, "offset": 123}, "step": 7, "world_size": 1}
    path = mgr.save(7, _state(model, opts), config_text=CONFIG_TEXT, meta=meta)
    assert path == tmp_path / "step_00000007" and mgr.latest() == path
    assert (path / "COMMITTED").is_file() and (path / "rng" / "rank_0.pt").is_file()
    assert read_config_text(path) == CONFIG_TEXT == mgr.read_config_text(path)

    fresh_model = build_model(ModelConfig())
    fresh_opts = build_optimizers(fresh_model, OptimConfig())
    target = _state(fresh_model, fresh_opts)
    meta = mgr.load(path, target)
    set_state_dict(fresh_model, fresh_opts, model_state_dict=target["model"], optim_state_dict=target["optim"])

    assert meta["step"] == 7 and meta["tokens_seen"] == 70 and meta["data"] == {"epoch": 1, "offset": 123}
    assert meta["world_size"] == 1 and "rng/rank_0.pt" in meta["manifest"] and ".metadata" in meta["manifest"]
    _assert_same(dict(model.state_dict()), dict(fresh_model.state_dict()))  # params and router-bias buffers
    _assert_same(_state(model, opts)["optim"], _state(fresh_model, fresh_opts)["optim"])
    assert fresh_opts[0].state_dict()["state"][0]["step"].item() == 1


def test_round_trip_muon_and_adamw_list(tmp_path):
    # A toy model: get_state_dict initialises a fresh optimizer's state with a zero-grad, lr=0 step, and
    # bf16 Newton-Schulz on the tiny model's matrices is slow on CPUs without bf16 matmuls.
    def make(seed):
        torch.manual_seed(seed)
        toy = Toy()
        return toy, build_optimizers(toy, OptimConfig(name="muon"))

    model, opts = make(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for o in opts:
        o.step()
        o.zero_grad()
    mgr = CheckpointManager(tmp_path, keep_last=1)
    path = _save(mgr, 1, model, opts)
    fresh_model, fresh_opts = make(2)
    target = _state(fresh_model, fresh_opts)
    assert target["optim"]["state"], "DCP loads in place: the fresh optimizer state must exist"
    mgr.load(path, target)
    set_state_dict(fresh_model, fresh_opts, model_state_dict=target["model"], optim_state_dict=target["optim"])
    _assert_same(_state(model, opts), _state(fresh_model, fresh_opts))


def test_crash_mid_save_leaves_no_complete_checkpoint(tmp_path, trained, monkeypatch):
    model, opts = trained
    mgr = CheckpointManager(tmp_path, keep_last=3)
    first = _save(mgr, 1, model, opts)

    def crash(_dir):  # runs after DCP has written its files and the RNG file
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(manager_mod, "build_manifest", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _save(mgr, 2, model, opts)
    assert not (tmp_path / step_dir_name(2)).exists()
    assert mgr.stale() == []  # an error (not a kill) removes its partial directory
    stale = tmp_path / "step_00000002.tmp-0badcafe"  # what a kill at that point leaves
    shutil.copytree(first, stale)
    (stale / "COMMITTED").unlink()
    assert mgr.stale() == [stale]
    assert mgr.latest() == first
    with pytest.raises(UserInputError, match="tmp"):
        mgr.resolve(str(stale))

    # A crash between rename and marker: a final-named dir without COMMITTED is not complete either.
    half = tmp_path / step_dir_name(5)
    shutil.copytree(first, half)
    (half / "COMMITTED").unlink()
    assert mgr.latest() == first and half in mgr.stale()

    third = _save(mgr, 3, model, opts)  # the next save removes the leftovers
    assert mgr.stale() == [] and mgr.latest() == third and not half.exists()


def test_retention_keeps_newest(tmp_path, trained):
    model, opts = trained
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        _save(mgr, step, model, opts)
    assert [p.name for p in mgr.complete()] == ["step_00000003", "step_00000004"]
    keep_all = CheckpointManager(tmp_path, keep_last=0)
    _save(keep_all, 5, model, opts)
    assert len(keep_all.complete()) == 3
    old_meta = json.loads((tmp_path / "step_00000005" / "meta.json").read_text())
    assert _save(keep_all, 5, model, opts, note="again") == tmp_path / "step_00000005"  # this run's state wins
    new_meta = verify_checkpoint(tmp_path / "step_00000005")
    assert new_meta["note"] == "again" and "note" not in old_meta and mgr.stale() == []


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("two")
    mgr = CheckpointManager(root, keep_last=3)
    _save(mgr, 1, *trained)
    _save(mgr, 2, *trained)
    return root


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta", "dcp_metadata", "rng", "marker"])
def test_corrupted_checkpoint_is_rejected_and_previous_still_loads(tmp_path, trained, two_checkpoints, damage):
    shutil.copytree(two_checkpoints, tmp_path / "ckpt")
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    prev, bad = mgr.complete()
    victim = bad / {
        "meta": "meta.json",
        "dcp_metadata": ".metadata",
        "rng": "rng/rank_0.pt",
        "marker": "COMMITTED",
    }.get(damage, "__0_0.distcp")
    if damage in ("truncate", "dcp_metadata", "rng", "marker"):
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        victim.unlink()
    else:
        meta = json.loads(victim.read_text())
        meta["step"] = 99
        victim.write_text(json.dumps(meta))
    target = _state(*trained)
    with pytest.raises(UserInputError) as err:
        mgr.load(mgr.resolve("auto"), target)
    msg = str(err.value)
    assert str(victim) in msg and str(prev) in msg and "still usable" in msg
    assert mgr.load(prev, target)["step"] == 1


def test_resume_resolution(tmp_path, trained):
    model, opts = trained
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    assert mgr.resolve("auto") is None and mgr.resolve("none") is None and mgr.resolve(None) is None
    a, b = _save(mgr, 1, model, opts), _save(mgr, 2, model, opts)
    assert mgr.resolve("auto") == b and mgr.resolve("none") is None
    assert mgr.resolve(str(a)) == a
    assert mgr.resolve(str(tmp_path / "ckpt")) == b  # a directory of checkpoints: its newest
    missing = tmp_path / "nope"
    with pytest.raises(UserInputError, match=str(missing)):
        mgr.resolve(str(missing))
    with pytest.raises(UserInputError, match="not a complete checkpoint"):
        mgr.resolve(str(tmp_path))


def _draw():
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_rng_capture_restore(tmp_path, trained):
    state = capture_rng()
    expected = _draw()
    _draw()
    restore_rng(state)
    assert _draw() == expected

    model, opts = trained
    mgr = CheckpointManager(tmp_path, keep_last=1)
    path = _save(mgr, 1, model, opts)
    expected = _draw()
    mgr.load(path, _state(model, opts))  # restores this rank's RNG state
    assert _draw() == expected
    saved = torch.load(path / "rng" / "rank_0.pt", weights_only=True)  # plain tensors and scalars only
    assert isinstance(saved["python"]["state"], torch.Tensor)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_metadata_unpickling_is_restricted(tmp_path, trained):
    model, opts = trained
    mgr = CheckpointManager(tmp_path, keep_last=1)
    path = _save(mgr, 1, model, opts)
    SafeFileSystemReader(str(path)).read_metadata()  # DCP's own metadata classes are allowed
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserInputError, match="builtins.print"):
        SafeFileSystemReader(str(path)).read_metadata()


def test_meta_must_be_json_and_not_reserved(tmp_path, trained):
    model, opts = trained
    mgr = CheckpointManager(tmp_path, keep_last=1)
    with pytest.raises(ValueError, match="step"):
        mgr.save(1, _state(model, opts), config_text="", meta={"step": 3})
    with pytest.raises(ValueError, match="manifest"):
        mgr.save(1, _state(model, opts), config_text="", meta={"manifest": {}})
    with pytest.raises(TypeError):
        mgr.save(1, _state(model, opts), config_text="", meta={"x": nn.Linear(1, 1)})
    assert list(tmp_path.iterdir()) == []


def test_mismatched_state_is_a_user_error(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    path = mgr.save(1, {"model": nn.Linear(4, 4).state_dict()}, config_text="", meta={})
    with pytest.raises(UserInputError, match="Size mismatch.*model.weight"):
        mgr.load(path, {"model": nn.Linear(4, 3).state_dict()})
    with pytest.raises(UserInputError, match="Missing key.*model.extra"):
        mgr.load(path, {"model": {**nn.Linear(4, 4).state_dict(), "extra": torch.zeros(1)}})
