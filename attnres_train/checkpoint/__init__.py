"""Checkpointing: atomic, verified ``torch.distributed.checkpoint`` saves with config, meta, RNG and retention.

See :mod:`attnres_train.checkpoint.manager` (saving, loading, retention) and
:mod:`attnres_train.checkpoint.layout` (the on-disk format, listing, verification), and docs/training.md
("Checkpoints").
"""

from .layout import is_complete, read_config_text, step_dir_name, verify_checkpoint
from .manager import CheckpointManager
from .rng import capture_rng, restore_rng
from .space import CheckpointSaveError
from .start_guard import check_fresh_start

__all__ = [
    "CheckpointManager",
    "CheckpointSaveError",
    "capture_rng",
    "check_fresh_start",
    "is_complete",
    "read_config_text",
    "restore_rng",
    "step_dir_name",
    "verify_checkpoint",
]
