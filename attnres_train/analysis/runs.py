"""Read finished runs back: config.yaml, metrics.jsonl and checkpoints → one :class:`RunSummary` per run.

Why compute is derived here rather than logged: the trainer records ``tokens_seen`` in every train record and
the resolved config in ``config.yaml``; training compute is ``train_flops_per_token(model, seq_len) ×
tokens_seen`` (the same analytic counter that drives MFU), so every finished run, old or new, local or from
slurm, can be compared without changes to the training loop.

A "run directory" holds ``config.yaml``; a "sweep directory" (``-m`` multirun) holds one run
directory per job. :func:`find_runs` accepts either. Bad input raises :class:`UserInputError` with one clear line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from omegaconf import OmegaConf

from ..config.errors import UserInputError
from ..model.flops import count_params, train_flops_per_token
from .fit import pflops_days


@dataclass
class Run:
    """A run directory with its parsed config (plain dict) and metrics records (file order)."""

    path: Path
    config: dict
    records: List[dict]

    def kind(self, kind: str) -> List[dict]:
        """Records of one ``kind``, one per step (a resumed run's later record for a step wins), by step."""
        by_step: Dict[int, dict] = {}
        for r in self.records:
            if r.get("kind") == kind and isinstance(r.get("step"), int):
                by_step[r["step"]] = r
        return [by_step[s] for s in sorted(by_step)]

    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"


@dataclass
class RunSummary:
    """One row of the comparison table."""

    run: str
    variant: str
    model: str
    num_layers: int
    hidden_size: int
    active_params: int  # active non-embedding parameters (the "size" of scaling laws)
    steps: int
    tokens: int
    flops: float
    pflops_days: float
    final_loss: float  # last validation loss (or last train loss when the run never validated; see source)
    loss_source: str  # "val", "train" or "none"
    seed: int = 0

    def as_row(self) -> dict:
        return asdict(self)


def variant_label(model_cfg: dict) -> str:
    """``baseline`` (PreNorm), ``block N=4`` / ``block N=4 (sublayer)`` (the paper's partition) / ``block S=2``
    (Block AttnRes), or ``full``."""
    r = model_cfg.get("residual") or {}
    mode = r.get("mode", "prenorm")
    if mode == "prenorm":
        return "baseline"
    if mode == "full":
        return "full"
    if r.get("num_blocks") is not None:
        rule = " (sublayer)" if r.get("partition") == "sublayer" else ""
        return f"block N={r['num_blocks']}{rule}"
    if r.get("block_size") is not None:
        return f"block S={r['block_size']}"
    return "block"


def variant_order(label: str) -> tuple:
    """Sort key: baseline, block by N, full (the order of the paper's block-size sweep, Fig. 6)."""
    if label == "baseline":
        return (0, 0)
    if label.startswith("block N="):
        n, _, rule = label[len("block N=") :].partition(" ")
        return (1, int(n), rule)
    if label.startswith("block"):
        return (2, label)
    return (3, label)


def read_metrics(path: Path) -> List[dict]:
    """All JSON records of ``metrics.jsonl`` (missing file → []; a torn last line of a crashed run is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def load_run(run_dir) -> Run:
    path = Path(run_dir)
    if not path.exists():
        raise UserInputError(f"{run_dir}: no such run directory")
    if not path.is_dir():
        raise UserInputError(f"{run_dir}: not a directory")
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise UserInputError(f"{run_dir}: not a run directory (no config.yaml; train with run_dir={run_dir})")
    try:
        config = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=False)
    except Exception as exc:  # yaml / omegaconf parse errors come in many types
        raise UserInputError(f"{cfg_file}: cannot be parsed: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserInputError(f"{cfg_file}: has no model section (not written by attnres-train?)")
    return Run(path=path, config=config, records=read_metrics(path / "metrics.jsonl"))


def _is_run_dir(p: Path) -> bool:
    return (p / "config.yaml").is_file()


def _child_key(p: Path):
    """Natural order: ``0, 1, 10`` and ``num_blocks=2`` before ``num_blocks=10`` (sweep dirs, docs/training.md)."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", p.name))]


def find_runs(paths: Iterable) -> List[Path]:
    """Run directories named by ``paths``: each is a run directory or a sweep directory of run directories."""
    out: List[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserInputError(f"{raw}: no such run or sweep directory")
        if _is_run_dir(p):
            out.append(p)
            continue
        children = (
            sorted((c for c in p.iterdir() if c.is_dir() and _is_run_dir(c)), key=_child_key) if p.is_dir() else []
        )
        if not children:
            raise UserInputError(f"{raw}: neither a run directory (config.yaml) nor a sweep directory of runs")
        out.extend(children)
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def final_loss(run: Run) -> tuple:
    """``(loss, source)``: the last validation loss, else the last train loss, else ``(nan, "none")``."""
    val = [r for r in run.kind("val") if isinstance(r.get("val_loss"), (int, float))]
    if val:
        return float(val[-1]["val_loss"]), "val"
    train = [r for r in run.kind("train") if isinstance(r.get("loss"), (int, float))]
    if train:
        return float(train[-1]["loss"]), "train"
    return math.nan, "none"


def tokens_seen(run: Run) -> tuple:
    """``(steps, tokens)`` reached by the run according to its last train record (or checkpoint event)."""
    train = run.kind("train")
    if train and "tokens_seen" in train[-1]:
        return int(train[-1]["step"]), int(train[-1]["tokens_seen"])
    return 0, 0


def training_flops(config: dict, tokens: int) -> float:
    """Training compute of ``tokens`` tokens: ``train_flops_per_token(model, data.seq_len) × tokens``."""
    seq_len = int((config.get("data") or {}).get("seq_len", 256))
    return train_flops_per_token(config["model"], seq_len) * tokens


def summarize(run: Run, name: Optional[str] = None) -> RunSummary:
    m = run.config["model"]
    try:
        counts = count_params(m)
    except Exception as exc:  # ConfigError from an edited / foreign config
        raise UserInputError(f"{run.path / 'config.yaml'}: model section is not valid: {exc}") from None
    steps, tokens = tokens_seen(run)
    flops = training_flops(run.config, tokens)
    loss, source = final_loss(run)
    return RunSummary(
        run=name or str(run.path),
        variant=variant_label(m),
        model=str(m.get("name", "?")),
        num_layers=int(m.get("num_layers", 0)),
        hidden_size=int(m.get("hidden_size", 0)),
        active_params=int(counts.active_non_embedding),
        steps=steps,
        tokens=tokens,
        flops=flops,
        pflops_days=pflops_days(flops),
        final_loss=loss,
        loss_source=source,
        seed=int(run.config.get("seed") or 0),
    )
