"""``logging.tensorboard=true`` (issue 15 item 8): event files in RUN_DIR/tensorboard/ whose scalars are the
logged metrics, each step once across a resume; without the tensorboard package, one ConfigError line.

``make setup`` does not install the tensorboard extra (it pulls grpcio and tensorboard-data-server); it puts the
two pure-Python wheels the writer and reader need in ``$VENV/tensorboard-alt`` (launch/setup_env.sh), and the
training and reading run in child processes with that directory on their path. The event files are read back
with tensorboard's own EventAccumulator, not with our writer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests import subproc
from tests.train.conftest import PY, REPO, read_metrics, tiny_overrides

ALT = Path(sys.prefix) / "tensorboard-alt"

READ = """
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"""


def _tb_env() -> dict:
    if importlib.util.find_spec("tensorboard") is not None:
        return {}
    if not (ALT / "tensorboard" / "__init__.py").is_file():
        pytest.skip(f"tensorboard is neither installed nor in {ALT} (run `make setup`)")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(ALT), os.environ.get("PYTHONPATH")]))}


def _train(args, tmp_path, name, env):
    cmd = [PY, "-m", "attnres_train", *args]
    return subproc.check(subproc.run(cmd, tmp_path / "logs", name, cwd=REPO, env={**os.environ, **env}, timeout=600))


def _read_scalars(run: Path, tmp_path, env) -> dict:
    cmd = [PY, "-c", READ, run / "tensorboard"]
    proc = subproc.check(subproc.run(cmd, tmp_path / "logs", "read", env={**os.environ, **env}, timeout=300))
    return json.loads(proc.stdout)


def test_scalars_are_the_logged_metrics_once_per_step_across_a_resume(corpus, tmp_path):
    env = _tb_env()
    run = tmp_path / "run"
    args = tiny_overrides(corpus, run, steps=4, **{"checkpoint.interval": 2, "logging.tensorboard": "true"})
    _train(args, tmp_path, "train", env)
    assert (run / "tensorboard").is_dir()
    logged = read_metrics(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    tb = _read_scalars(run, tmp_path, env)
    keys = sorted(k for k in logged[0] if k not in ("kind", "step", "time") and isinstance(logged[0][k], float))
    assert "loss" in keys and "lr" in keys
    for k in keys:  # TensorBoard keeps float32: a relative margin, not equality
        want = [(r["step"], r[k]) for r in logged]
        got = tb[f"train/{k}"]
        assert [s for s, _ in got] == [s for s, _ in want], k
        assert all(v == pytest.approx(w, rel=1e-6, abs=1e-30) for (_, v), (_, w) in zip(got, want)), (k, got, want)

    # a crash after step 4 whose last checkpoint is step 2: steps 3 and 4 run again; TensorBoard shows them once
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    _train(args, tmp_path, "resume", env)
    logged = read_metrics(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 3, 4]
    last = {r["step"]: r["loss"] for r in logged}  # the later record of a step wins
    got = _read_scalars(run, tmp_path, env)["train/loss"]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([last[s] for s in (1, 2, 3, 4)], rel=1e-6)


def test_without_tensorboard_one_config_error_and_nothing_written(tmp_path):
    run = tmp_path / "run"
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"  # as if not installed, whatever this venv has
        "from attnres_train.cli.train import main\n"
        f"sys.argv = ['attnres-train', 'model=tiny', 'logging.tensorboard=true', 'run_dir={run}']\n"
        "main()\n"
    )
    proc = subproc.run([PY, "-c", code], tmp_path / "logs", "no-tensorboard", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, subproc.failure(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: logging.tensorboard"), proc.stderr
    assert "pip install 'attnres-train[tensorboard]'" in lines[0] and "Traceback" not in proc.stdout + proc.stderr
    assert not run.exists()
