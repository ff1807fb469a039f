"""Never delete what might be the only copy, and never call a NaN run a success.

* ``checkpoint.resume=auto`` with only uncommitted checkpoints (files and manifest written, no marker) refuses,
  naming them and ``checkpoint.overwrite``; ``resume=none`` refuses on a run dir that holds checkpoints.
  Both end in one ``error:`` line, exit 2, with the run dir byte for byte unchanged.
* A run whose last steps are non-finite (``optim.lr=1e30``) stops with TrainingAborted (exit 3) and writes no
  final checkpoint.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from attnres_train.checkpoint import CheckpointManager, check_fresh_start
from attnres_train.cli.train import run
from attnres_train.config.errors import ConfigError, UserInputError
from attnres_train.config.train import CheckpointConfig, validate_checkpoint_config
from attnres_train.train.faults import TrainingAborted
from tests import subproc

from .conftest import PY, REPO, read_metrics, tiny_overrides


def _snapshot(root: Path) -> dict:
    """{relative path: sha256} of every file, and the set of directories: any change shows."""
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    dirs = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}
    return {"files": files, "dirs": dirs}


def _cli(args, log_dir):
    return subproc.run([PY, "-m", "attnres_train", *args], log_dir / "logs", "train", cwd=REPO)


def _one_error_line(proc) -> str:
    subproc.check(proc, 2)
    assert "Traceback" not in proc.stderr + proc.stdout, subproc.failure(proc)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, subproc.failure(proc)
    return errors[0]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A run dir with one committed checkpoint (step 2)."""
    run_dir = tmp_path_factory.mktemp("noloss") / "run"
    run(tiny_overrides(corpus, run_dir, steps=2))
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_resume_auto_refuses_when_only_uncommitted_checkpoints_exist(trained, corpus, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step_00000002"
    (ckpt / "COMMITTED").unlink()  # killed just before the marker: every file and the manifest are there
    (run_dir / "checkpoints" / "step_00000004.tmp-0badcafe").mkdir()  # an unfinished write: never blocks alone
    before = _snapshot(run_dir)
    with pytest.raises(UserInputError) as err:
        run(tiny_overrides(corpus, run_dir, steps=4))
    msg = str(err.value)
    assert "checkpoint.resume=auto" in msg and "step_00000002" in msg and "checkpoint.overwrite=true" in msg, msg
    assert "tmp-0badcafe" not in msg, msg
    assert _snapshot(run_dir) == before

    # the flag that forces a fresh start does so (and its first save removes the leftovers)
    run(tiny_overrides(corpus, run_dir, steps=2, **{"checkpoint.overwrite": "true"}))
    assert [p.name for p in CheckpointManager(run_dir / "checkpoints", 0).complete()] == ["step_00000002"]
    assert CheckpointManager(run_dir / "checkpoints", 0).stale() == []


def test_leftover_tmp_dirs_without_a_manifest_do_not_block_a_fresh_auto_start(corpus, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000003.tmp-12345678").mkdir(parents=True)
    check_fresh_start(run_dir / "checkpoints", "auto", overwrite=False)  # no error: nothing loadable there
    with pytest.raises(UserInputError):
        (run_dir / "checkpoints" / "step_00000003.tmp-12345678" / "meta.json").write_text("{}")
        check_fresh_start(run_dir / "checkpoints", "auto", overwrite=False)


def test_resume_none_refuses_on_a_run_dir_with_checkpoints(trained, corpus, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    before = _snapshot(run_dir)
    line = _one_error_line(_cli(tiny_overrides(corpus, run_dir, steps=2, **{"checkpoint.resume": "none"}), tmp_path))
    assert "checkpoint.resume=none" in line and str(run_dir / "checkpoints") in line, line
    assert "step_00000002" in line and "checkpoint.overwrite=true" in line, line
    assert _snapshot(run_dir) == before


def test_overwrite_with_an_explicit_resume_path_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        validate_checkpoint_config(CheckpointConfig(resume="/some/ckpt", overwrite=True))
    assert err.value.field == "checkpoint.overwrite" and "resume=auto or resume=none" in str(err.value)


def test_a_run_ending_in_non_finite_steps_fails_and_saves_nothing(corpus, tmp_path):
    run_dir = tmp_path / "run"
    # lr=1e30: step 1 is finite, then the weights are ~1e30 and every later step is NaN; 3 steps stay within
    # trainer.max_consecutive_skips=3, so only the "last step skipped" rule can stop it.
    with pytest.raises(TrainingAborted) as err:  # the command line exits with its exit_code, 3
        run(tiny_overrides(corpus, run_dir, steps=3, **{"optim.lr": "1e30", "checkpoint.interval": 1}))
    assert err.value.exit_code == 3
    msg = str(err.value)
    assert "NaN/Inf on 2 consecutive steps (2..3)" in msg and "last step" in msg and "step_00000001" in msg, msg
    assert [bool(r.get("skipped")) for r in read_metrics(run_dir)] == [False, True, True]
    # the good step 1 was saved (interval 1); the skipped final step 3 was not
    assert [p.name for p in CheckpointManager(run_dir / "checkpoints", 0).complete()] == ["step_00000001"]
