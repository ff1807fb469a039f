"""End-to-end: a short run trains (loss falls), writes metrics and a checkpoint; exact resume; multirun."""

import pytest

from attnres_train.cli.train import run
from tests import subproc

from .conftest import PY, REPO, read_metrics, tiny_overrides


def test_short_run_learns_and_writes_metrics_and_checkpoint(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run(
        tiny_overrides(
            corpus,
            run_dir,
            steps=40,
            **{
                "trainer.val_every": 20,
                "trainer.sample_every": 20,
                "trainer.depth_stats_every": 20,
                "trainer.val_batches": 2,
            },
        )
    )
    train = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, 41))
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 1.0, (first, last)
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb", "expert_imbalance_max"):
        assert key in train[-1]
    assert train[-1]["mfu"] > 0
    val = read_metrics(run_dir, "val")
    assert [r["step"] for r in val] == [20, 40] and val[-1]["val_loss"] < val[0]["val_loss"] + 0.5
    depth = read_metrics(run_dir, "depth")
    assert depth and len(depth[0]["depth_entropy"]) == 2 * 4 + 1
    assert all(abs(sum(w) - 1) < 1e-4 for w in depth[0]["depth_mean_weights"])
    assert read_metrics(run_dir, "sample")[0]["text"] is not None
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "COMMITTED").exists() and ckpts[-1].name.endswith("40")
    assert "residual" in (run_dir / "config.yaml").read_text()
    assert "residual" in (ckpts[-1] / "config.yaml").read_text()


def test_exact_resume_is_bitwise_identical(corpus, tmp_path):
    k = 5
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_overrides(corpus, full, steps=2 * k))
    run(tiny_overrides(corpus, part, steps=2 * k, **{"trainer.stop_at": k}))
    run(tiny_overrides(corpus, part, steps=2 * k, **{"checkpoint.resume": "auto"}))
    a = [r["loss"] for r in read_metrics(full)]
    b = [r["loss"] for r in read_metrics(part)]
    assert len(a) == 2 * k and len(b) == 2 * k
    assert a == b  # bitwise: model, optimizer, LR schedule, data order, router biases and RNG restored
    ga = [r["grad_norm"] for r in read_metrics(full)]
    gb = [r["grad_norm"] for r in read_metrics(part)]
    assert ga == gb


@pytest.mark.slow
def test_hydra_multirun_over_block_counts_writes_two_run_dirs(corpus, tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny_overrides(corpus, sweep, steps=3)
    args = [a for a in args if not a.startswith("model.residual.num_blocks=")]
    subproc.check(
        subproc.run(
            [PY, "-m", "attnres_train", "-m", "model.residual.num_blocks=1,2", *args], tmp_path, "multirun", cwd=REPO
        )
    )
    dirs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name != "data_cache")
    # named after the swept override only (docs/training.md "Sweeps"); the shared overrides are left out
    assert [d.name for d in dirs] == ["model.residual.num_blocks=1", "model.residual.num_blocks=2"]
    for d, nb in zip(dirs, (1, 2)):
        assert len(read_metrics(d)) == 3
        assert f"num_blocks: {nb}" in (d / "config.yaml").read_text()
