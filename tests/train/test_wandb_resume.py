"""W&B: the run id lives in the run dir, so a resumed run logs into the same W&B run (offline mode, no network)."""

import re

import pytest

from attnres_train.cli.train import run

from .conftest import read_metrics, tiny_overrides

pytest.importorskip("wandb")


def test_resume_reuses_the_wandb_run_id(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # MetricsLogger only sets it when unset: keep it per test
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(corpus, run_dir, steps=4, **{"logging.wandb.mode": "offline"})
    run(overrides + ["trainer.stop_at=2"])
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    first = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(first) == 1 and (first[0] / f"run-{run_id}.wandb").is_file(), first

    run(overrides)  # checkpoint.resume=auto: continues from step 2
    assert any(e.get("event") == "resumed" for e in read_metrics(run_dir, "event"))
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    # Each launch's offline record is of the same W&B run (wandb names the file by run id). The directory is
    # offline-run-<time>-<id>, with "-1" appended when both launches fall in the same second.
    for d in runs:
        assert re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", d.name), d.name
        assert [f.name for f in d.glob("run-*.wandb")] == [f"run-{run_id}.wandb"], d
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
