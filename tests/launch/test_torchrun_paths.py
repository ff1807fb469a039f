"""``launch/torchrun.sh`` runs in the caller's directory (issue 15 item 9).

Why: the script used to ``cd`` into the repository, so a relative ``run_dir``, data path or the default
``data.cache_dir`` landed inside the checkout. Here the script is called by a relative path from a temporary
directory with relative paths only; everything must land there and nothing in the checkout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests import subproc

REPO = Path(__file__).resolve().parents[2]


def test_relative_paths_resolve_against_the_callers_directory(tmp_path):
    work = tmp_path / "caller"
    (work / "corpus").mkdir(parents=True)
    for i in range(20):
        (work / "corpus" / f"d{i}.txt").write_text(f"def f{i}(x):\n    return x * alpha + beta\n" * 4)
    run_name = f"h4-torchrun-paths-{os.getpid()}"  # unique, so a leftover in the checkout is this test's
    script = os.path.relpath(REPO / "launch" / "torchrun.sh", work)
    overrides = [
        "model=tiny",
        "trainer.max_steps=2",
        "data.sources=[{path: corpus, kind: text}]",
        "data.seq_len=64",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=2",
        "trainer.log_every=1",
        "trainer.val_every=0",
        "trainer.sample_every=0",
        "trainer.depth_stats_every=0",
        "trainer.peak_flops=1e11",
        "optim.warmup_steps=1",
        f"run_dir={run_name}",
    ]  # data.cache_dir keeps its relative default (data_cache)
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", script, "--nproc", "1", "--", *overrides]
    proc = subproc.check(subproc.run(cmd, tmp_path / "logs", "torchrun", cwd=work, env=env, timeout=600))
    run = work / run_name
    assert (run / "checkpoints" / "step_00000002").is_dir(), subproc.failure(proc)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2]
    assert (work / "data_cache").is_dir() and any((work / "data_cache").iterdir())
    assert not (REPO / run_name).exists()
