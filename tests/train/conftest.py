"""Fixtures for training tests: a small generated corpus and the overrides of a seconds-long tiny run."""

import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

WORDS = (
    "alpha beta gamma delta kernel block residual query key value softmax norm layer expert router "
    "token stream depth cache stage pipeline gradient"
).split()


def write_corpus(root: Path, docs: int = 60, seed: int = 0) -> Path:
    """Repetitive, learnable text: loss drops quickly even for a tiny byte-level model."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        lines = []
        for _ in range(12):
            w = rng.sample(WORDS, 4)
            lines.append(f"def {w[0]}_{w[1]}(x):\n    return x + {w[2]} * {w[3]}\n")
        (root / f"doc_{i:03d}.txt").write_text("".join(lines))
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_overrides(corpus: Path, run_dir: Path, steps: int = 12, **extra) -> list:
    ov = {
        "model": "tiny",
        "model.residual.mode": "block",
        "model.residual.num_blocks": 2,
        "data.sources": f"[{{path: '{corpus}', kind: text}}]",
        "data.seq_len": 64,
        "data.cache_dir": str(run_dir.parent / "data_cache"),
        "data.num_workers": 0,
        "trainer.max_steps": steps,
        "trainer.global_batch_size": 4,
        "trainer.micro_batch_size": 2,
        "trainer.log_every": 1,
        "trainer.val_every": 0,
        "trainer.sample_every": 0,
        "trainer.depth_stats_every": 0,
        "trainer.peak_flops": 1e11,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        "checkpoint.interval": 0,
        "run_dir": str(run_dir),
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def read_metrics(run_dir: Path, kind: str = "train") -> list:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
