"""What a failed or impossible checkpoint save reports, and the sizes the free-space check compares.

Why a module of its own: a full disk must end in one clear message (not DCP's ``CheckpointException``
traceback) that says the partial directory is gone and the previous checkpoint is intact; the manager raises
:class:`CheckpointSaveError` for both the refusal before writing and a failure while writing, and the trainer
turns it into ``TrainingAborted`` (exit 3). See docs/training.md ("Checkpoints", "Disk full").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException


class CheckpointSaveError(RuntimeError):
    """A save could not be written (not enough free space, an I/O error). The partial directory was removed;
    the committed checkpoints are untouched. The message says so and names the newest one."""


def root_error(exc: BaseException) -> BaseException:
    """The first rank's underlying error of DCP's CheckpointException (a BaseException wrapping every rank's)."""
    if isinstance(exc, CheckpointException):
        failures = [e for e, _ in exc.failures.values()]
        if failures:
            return failures[0]
    return exc


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def checkpoint_bytes(meta_file: Path) -> int:
    """Total size of a complete checkpoint's files, from the manifest in its meta.json (no directory walk)."""
    meta = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    return sum(int(info["size"]) for info in meta["manifest"].values())


def state_bytes(state_dict) -> int:
    """This rank's tensor bytes in a nested state dict (DTensors: the local shard)."""
    if isinstance(state_dict, dict):
        return sum(state_bytes(v) for v in state_dict.values())
    if isinstance(state_dict, (list, tuple)):
        return sum(state_bytes(v) for v in state_dict)
    if torch.is_tensor(state_dict):
        local = getattr(state_dict, "_local_tensor", state_dict)
        return local.numel() * local.element_size()
    return 0
