"""Load a run's checkpoint, saved under any parallel layout, into one plain single-process model.

Why one function: checkpoints are torch.distributed.checkpoint directories whose tensors carry the plain
model's parameter names whatever the layout (dp, FSDP, TP, PP, EP), so one process reads every full tensor
into a model built from the run's config.yaml. ``attnres-eval``, ``attnres-analyze`` and notebooks load runs
through it. docs/analysis.md, "Loading a run".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch

from ..checkpoint import CheckpointManager, is_complete, step_dir_name
from ..config.errors import ConfigError, UserInputError
from ..config.model import as_model_config
from ..model import build_model
from .runs import Run, load_run


class LoadedModel(NamedTuple):
    model: torch.nn.Module  #: the run's model in eval mode, with the checkpoint's weights
    checkpoint: Path  #: the checkpoint directory read
    meta: dict  #: the checkpoint's meta (``step``, ``tokens_seen``, ...)


def resolve_checkpoint(run: Run, checkpoint: Optional[str] = None) -> Path:
    """The run's newest complete checkpoint, or ``checkpoint``: a path (a step dir, or a dir of them) or a
    step dir's name under RUN_DIR/checkpoints (``step_00000300``, or ``step_300``)."""
    root = run.checkpoint_root
    if not checkpoint:
        path = CheckpointManager(root, keep_last=0).latest()
        if path is None:
            raise UserInputError(
                f"{run.path}: no complete checkpoint under {root} (train with checkpoint.interval or let the "
                "run finish)"
            )
        return path
    path = Path(str(checkpoint)).expanduser()
    if not path.exists():
        m = re.fullmatch(r"step_(\d+)", str(checkpoint))
        path = root / (step_dir_name(int(m.group(1))) if m else str(checkpoint))
    if is_complete(path):
        return path
    if path.is_dir():
        newest = CheckpointManager(path, keep_last=0).latest()
        if newest is not None:
            return newest
    why = "does not exist" if not path.exists() else "is not a complete checkpoint (no COMMITTED marker)"
    raise UserInputError(f"checkpoint {checkpoint}: {path} {why}")


def load_run_model(
    run: Union[str, Path, Run],
    checkpoint: Optional[str] = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    reference_kernels: bool = True,
) -> LoadedModel:
    """``(model, checkpoint, meta)``: the model of run directory ``run`` with the weights of ``checkpoint``
    (default: the newest complete one; see :func:`resolve_checkpoint`), in eval mode, in ``dtype`` on ``device``.

    ``reference_kernels``: use the pure-torch KDA and AttnRes kernels (same math as fla / Triton; they run on
    any device, e.g. a login node's CPU) instead of the ones the run's config names.
    Bad input (no run, no such checkpoint, weights of another model) raises ``UserInputError``."""
    run = run if isinstance(run, Run) else load_run(run)
    try:
        cfg = as_model_config(run.config["model"])
        if reference_kernels:  # the residual impl only where the config reads it (PreNorm has no kernel to pick)
            cfg.kda.impl = "torch"
            if cfg.residual.mode != "prenorm" and cfg.residual.two_phase:
                cfg.residual.impl = "torch"
        model = build_model(cfg)
    except ConfigError as exc:
        raise UserInputError(f"{run.path / 'config.yaml'}: {exc}") from None
    path = resolve_checkpoint(run, checkpoint)
    state = {"model": model.state_dict()}
    meta = CheckpointManager(run.checkpoint_root, keep_last=0).load(path, state, restore_rng_state=False)
    model.load_state_dict(state["model"])
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, path, meta)
