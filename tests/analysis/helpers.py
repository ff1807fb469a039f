"""Fake run directories for analysis tests: a real config.yaml (the trainer's format) and metrics.jsonl."""

import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from attnres_train.config.schema import Config


def make_config(mode="prenorm", num_blocks=None, num_layers=4, hidden_size=128, seq_len=64, **data) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size = num_layers, hidden_size
    m.mla_layers = [i for i in range(num_layers) if i % 4 == 3]
    m.residual.mode, m.residual.num_blocks = mode, num_blocks
    cfg.data.seq_len = seq_len
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def write_run(path: Path, cfg: Config, records=()) -> Path:
    """A run directory as the trainer leaves it (config.yaml + metrics.jsonl), without checkpoints."""
    path.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(path)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    with open(path / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def train_records(steps, losses, tokens_per_step, val=None):
    out = [
        {
            "kind": "train",
            "step": s,
            "loss": loss,
            "tokens_seen": s * tokens_per_step,
            "expert_imbalance_mean": 1.5,
            "expert_imbalance_max": 2.0,
        }
        for s, loss in zip(steps, losses)
    ]
    if val is not None:
        out.append({"kind": "val", "step": steps[-1], "val_loss": val, "val_ppl": math.exp(val)})
    return out


def experiment_override(name: str) -> str:
    """``experiment=<name>`` once configs/config.yaml lists ``experiment`` in its defaults, else ``+experiment=``."""
    from attnres_train.config.paths import CONFIG_DIR

    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml")).get("defaults", [])
    listed = any(
        isinstance(d, dict) and any(str(k).replace("optional ", "").split("@")[0].strip() == "experiment" for k in d)
        for d in defaults
    )
    return f"experiment={name}" if listed else f"+experiment={name}"
