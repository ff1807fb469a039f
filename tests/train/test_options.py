"""Trainer options: activation checkpointing, torch.compile, Muon, W&B offline logging."""

import pytest

from attnres_train.cli.train import run

from .conftest import read_metrics, tiny_overrides


def test_activation_checkpointing_gives_the_same_losses(corpus, tmp_path):
    base, ac = tmp_path / "base", tmp_path / "ac"
    run(tiny_overrides(corpus, base, steps=3))
    run(tiny_overrides(corpus, ac, steps=3, **{"trainer.activation_checkpointing": True}))
    a = [r["loss"] for r in read_metrics(base)]
    b = [r["loss"] for r in read_metrics(ac)]
    assert len(a) == 3
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-5 * abs(x)
    # router loads are not double counted by the recomputation
    assert [r["expert_imbalance_max"] for r in read_metrics(base)] == [
        r["expert_imbalance_max"] for r in read_metrics(ac)
    ]


@pytest.mark.slow
def test_compile_option_trains(corpus, tmp_path):
    # aot_eager checks that dynamo captures every decoder layer (DepthState in and out, MoE dispatch)
    # without spending minutes in inductor's C++ code generation on a 2-core CI machine.
    run(
        tiny_overrides(
            corpus, tmp_path / "c", steps=2, **{"trainer.compile": True, "trainer.compile_backend": "aot_eager"}
        )
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "c")]
    assert len(losses) == 2 and all(x == x for x in losses)


@pytest.mark.slow
def test_muon_optimizer_trains(corpus, tmp_path):
    run(tiny_overrides(corpus, tmp_path / "m", steps=4, **{"optim.name": "muon", "optim.lr": 0.02}))
    losses = [r["loss"] for r in read_metrics(tmp_path / "m")]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.slow
def test_wandb_offline_writes_a_local_run(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "w"
    run(tiny_overrides(corpus, run_dir, steps=2, **{"logging.wandb.mode": "offline"}))
    assert list((run_dir / "wandb").glob("offline-run-*")), list(run_dir.rglob("*"))[:20]
