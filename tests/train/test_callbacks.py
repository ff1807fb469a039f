"""The Trainer's callback protocol: a user callback sees every step after the built-ins, with the step's stats
(validation added on its cadence), the checkpoint path on save steps, and start / end once each."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from attnres_train.cli.init_run import compose_run_config
from attnres_train.config.schema import validate_config
from attnres_train.parallel.mesh import single_process_context
from attnres_train.train.callbacks import TrainerCallback
from attnres_train.train.trainer import Trainer

from .conftest import read_metrics, tiny_overrides

PKG = Path(__file__).resolve().parents[2] / "attnres_train"


class Recorder(TrainerCallback):
    def __init__(self):
        self.calls, self.evals, self.saves = [], [], []

    def on_train_start(self, trainer):
        self.calls.append(("start", trainer.step))

    def on_step_end(self, trainer, info):
        self.calls.append(
            ("step", info.step, info.stop, info.final, dict(info.stats), info.checkpoint, tuple(info.batch_bt1.shape))
        )

    def on_train_end(self, trainer):
        self.calls.append(("end", trainer.step))

    def on_eval(self, trainer, step, metrics):
        self.evals.append((step, dict(metrics)))

    def on_checkpoint(self, trainer, step, path):
        self.saves.append((step, path.name, path.is_dir()))


def test_a_user_callback_sees_each_step_after_the_built_ins(corpus, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_run_config(
        tiny_overrides(corpus, run_dir, steps=4, **{"trainer.val_every": 2, "checkpoint.interval": 3})
    )
    validate_config(cfg, dp_world_size=1)
    rec = Recorder()
    torch.manual_seed(0)
    Trainer(cfg, run_dir, single_process_context(), callbacks=[rec]).fit()

    assert rec.calls[0] == ("start", 0) and rec.calls[-1] == ("end", 4)
    steps = rec.calls[1:-1]
    assert [c[1] for c in steps] == [1, 2, 3, 4] and all(c[2] == 4 for c in steps)
    assert [c[3] for c in steps] == [False, False, False, True]
    # validation (every 2 steps and on the last) ran before this callback: its loss is in the step's stats
    assert ["val_loss" in c[4] for c in steps] == [False, True, False, True]
    # checkpoints: every 3 steps and after the last
    assert [c[5].name if c[5] else None for c in steps] == [None, None, "step_00000003", "step_00000004"]
    assert all(c[6] == (4, 65) for c in steps)  # this rank's batch: global_batch_size rows of seq_len+1
    # the train records the logging callback wrote carry the same losses the callback saw
    logged = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert logged == {c[1]: c[4]["loss"] for c in steps}
    val = {r["step"]: r["val_loss"] for r in read_metrics(run_dir, "val")}
    assert val == {c[1]: c[4]["val_loss"] for c in steps if "val_loss" in c[4]}
    assert [(s, m["val_loss"]) for s, m in rec.evals] == sorted(val.items())
    assert rec.saves == [(3, "step_00000003", True), (4, "step_00000004", True)]


def test_the_loop_does_not_read_the_parallel_layout():
    """trainer.py and callbacks.py never look at tp / pp (what they need comes from the train module)."""
    for name in ("trainer.py", "callbacks.py"):
        tree = ast.parse((PKG / "train" / name).read_text())
        attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not attrs & {"tp", "pp", "tp_mesh", "tp_rank", "pp_rank", "vpp"}, (name, attrs & {"tp", "pp"})
