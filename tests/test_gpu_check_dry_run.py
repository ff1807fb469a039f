"""bench/gpu_check.py --dry-run (CPU, toy widths) runs its training sections end to end and prints finite RESULTs.

Why: the GPU readiness check only runs on rare, short device loans; this keeps its CPU-runnable code paths
(sections c and d, the section guards, the SKIP lines of the CUDA-only sections) from rotting in between.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from tests import subproc

REPO = Path(__file__).resolve().parents[1]
EXPECTED = (
    "train_f2_step",
    "train_f2_tokens_per_s",
    "train_f2_mfu",
    "train_f3_step",
    "train_f3_tokens_per_s",
    "train_f3_mfu",
    "block_over_prenorm_step_time_f2",
)


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    proc = subproc.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run"],
        tmp_path,
        "gpu_check",
        env=env,
        cwd=REPO,
        timeout=180,
    )
    out = proc.stdout
    subproc.check(proc)
    assert "ERROR" not in out, out
    assert "SKIP attnres_triton (no CUDA)" in out and "SKIP kda_fla (no CUDA)" in out, out
    results = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            _, name, value, _unit = line.split()
            results[name] = float(value)
    for name in EXPECTED:
        assert name in results and math.isfinite(results[name]) and results[name] > 0, (name, out)
