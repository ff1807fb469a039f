"""End to end: a tiny ``-m experiment=block_sweep`` through the real CLI, then attnres-analyze / attnres-compare."""

import csv
import json
import sys

import numpy as np
import pytest

from attnres_train.cli import analyze, compare
from tests import subproc

from ..train.conftest import REPO, write_corpus
from .helpers import experiment_override

VARIANTS = ["baseline", "block N=1", "block N=2", "block N=4", "block N=8", "full"]


@pytest.mark.slow
def test_tiny_block_sweep_analyze_and_compare(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", docs=30)
    sweep = tmp_path / "sweep"
    overrides = [
        experiment_override("block_sweep"),
        "model=tiny",
        "model.hidden_size=64",
        "model.moe.num_experts=4",
        f"data.sources=[{{path: '{corpus}', kind: text}}]",
        "data.seq_len=16",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=2",
        "trainer.log_every=1",
        "trainer.val_every=2",
        "trainer.val_batches=1",
        "trainer.depth_stats_every=2",
        "trainer.peak_flops=1e11",
        "optim.warmup_steps=1",
        "logging.console=false",
        f"run_dir={sweep}",
    ]
    subproc.check(
        subproc.run([sys.executable, "-m", "attnres_train", "-m", *overrides], tmp_path / "logs", "sweep", cwd=REPO)
    )
    # one run dir per job, named after its swept override (docs/training.md "Sweeps"), listed in job order
    residual = ["{mode:prenorm,num_blocks:null,block_size:null}"]
    residual += [f"{{mode:block,num_blocks:{n},block_size:null}}" for n in (1, 2, 4, 8)]
    residual += ["{mode:full,num_blocks:null,block_size:null}"]
    runs = [sweep / f"model.residual={r}" for r in residual]
    assert sorted(p.name for p in sweep.iterdir() if (p / "config.yaml").is_file()) == sorted(p.name for p in runs)

    assert analyze.main([str(sweep), "--batch-size", "2"]) == 0
    for run, variant in zip(runs, VARIANTS):
        out = run / "analysis"
        expected = ["loss_curves.png", "layer_profile.png", "expert_load.png"]
        if variant != "baseline":
            expected += ["depth_weights.png", "depth_entropy.png"]
        for name in expected:
            assert (out / name).stat().st_size > 1000, (run, name)
        assert (out / "depth_weights.png").exists() == (variant != "baseline")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["run"]["variant"] == variant and summary["run"]["steps"] == 2
        assert len(summary["output_rms"]) == len(summary["grad_norm"]) == 8
        if variant != "baseline":
            mat = np.array(summary["depth_weights"], dtype=float)  # None -> nan
            assert mat.shape[0] == 17 and len(summary["readers"]) == 17
            np.testing.assert_allclose(np.nansum(mat, axis=1), 1.0, atol=1e-5)

    assert compare.main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    with open(sweep / "compare" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [str(p) for p in runs]
    assert [r["variant"] for r in rows] == VARIANTS
    for r in rows:
        assert r["loss_source"] == "val" and np.isfinite(float(r["loss"])) and int(r["tokens"]) == 2 * 2 * 16
        assert int(r["compared_tokens"]) == 2 * 2 * 16
        assert float(r["compared_flops"]) > 0
    assert float(rows[0]["delta_vs_reference"]) == 0.0
    for name in ("scaling_fits.png", "loss_bars.png", "loss_curves.png"):
        assert (sweep / "compare" / name).stat().st_size > 1000
    md = (sweep / "compare" / "comparison.md").read_text()
    assert all(f"| {p} | {v} |" in md for p, v in zip(runs, VARIANTS)) and md in printed
