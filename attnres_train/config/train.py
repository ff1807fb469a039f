"""Optimizer / LR-schedule and checkpoint config schemas (Hydra structured configs) and their validation.

Like the model and data schemas these are plain values: :func:`validate_optim_config` and
:func:`validate_checkpoint_config` raise one :class:`ConfigError` naming the offending field (``optim.lr``,
``checkpoint.keep_last``, ...) so a bad sweep override fails before a model is built or a file is touched.

The schedule needs the run length, so ``validate_optim_config`` takes ``max_steps``: a warmup longer than the
run, or a WSD warmup + decay that do not fit in it, is almost certainly a typo and is rejected rather than
silently producing a run that never reaches its peak learning rate. See docs/training.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from .errors import ConfigError

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")
# torch.optim.Muon's ``adjust_lr_fn`` values (torch 2.13): "original" = Keller Jordan's sqrt(max(1, A/B));
# "match_rms_adamw" = Moonlight's 0.2 * sqrt(max(A, B)), which lets Muon reuse AdamW's lr and weight decay.
MUON_ADJUST_LR = ("match_rms_adamw", "original")
RESUME_KEYWORDS = ("auto", "none")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (docs/training.md, "Optimizer" and "Schedule")."""

    # "adamw": one AdamW for everything. "muon": Muon for 2-D/3-D hidden weight matrices, AdamW for the rest.
    name: str = "adamw"
    # Peak learning rate (AdamW groups; also Muon's unless muon_lr is set).
    lr: float = 3.0e-4
    # Decoupled weight decay for the decayed groups (see train/optim.py for which parameters get it).
    weight_decay: float = 0.1
    # AdamW's decay rates [beta1, beta2] of the first and second moment estimates.
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    # AdamW's epsilon, added to the denominator of the update.
    eps: float = 1.0e-8
    # Global gradient-norm clipping threshold; 0 disables clipping (the norm is still measured).
    grad_clip: float = 1.0
    # Muon only. null = use ``lr`` (right with adjust_lr "match_rms_adamw", which matches AdamW's update RMS).
    muon_lr: Optional[float] = None
    # Muon only: momentum of the update's moving average.
    muon_momentum: float = 0.95
    # Muon only: Nesterov momentum.
    muon_nesterov: bool = True
    # Muon only: Newton-Schulz iterations that orthogonalise each update.
    muon_ns_steps: int = 5
    # Muon only: torch.optim.Muon's adjust_lr_fn, "match_rms_adamw" (Moonlight: reuses AdamW's lr and weight
    # decay) or "original" (Keller Jordan's).
    muon_adjust_lr: str = "match_rms_adamw"
    # "cosine": warmup, cosine to min. "wsd": warmup, constant, linear decay over the last decay_fraction.
    # "constant": warmup, then constant.
    schedule: str = "cosine"
    # Linear warmup to the peak lr over this many first steps (every schedule); 0 = none.
    warmup_steps: int = 100
    # Final lr as a fraction of the peak (cosine and wsd).
    min_lr_ratio: float = 0.1
    # WSD only: fraction of max_steps (at the end of the run) over which lr decays linearly to the minimum.
    decay_fraction: float = 0.2


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written and which one a run resumes from (docs/training.md)."""

    # Save every ``interval`` optimizer steps; 0 = only at the end of training.
    interval: int = 1000
    # Keep the newest ``keep_last`` complete checkpoints (older ones are deleted after a new one commits);
    # 0 = keep all.
    keep_last: int = 3
    # "auto": newest complete checkpoint in the run's checkpoint dir, if any; "none": start fresh;
    # anything else: a checkpoint directory (or a directory of checkpoints: its newest complete one).
    resume: str = "auto"
    # Allow a run to start from step 0 in a run_dir whose checkpoints/ already holds checkpoints (resume=none),
    # or only uncommitted ones (resume=auto): its saves then replace and prune them. Without it such a start
    # is refused, since those directories might be the only copy of a run's state. Never discards a
    # checkpoint that resume=auto would load.
    overwrite: bool = False
    # Background saving: the state is copied to CPU memory, training continues while a thread writes the
    # files; the checkpoint is committed (COMMITTED marker) only after every rank's write finished. A save
    # waits for the previous one, and the run waits for the last one before it exits.
    async_save: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_optim_config(cfg: OptimConfig, max_steps: Optional[int] = None, prefix: str = "optim") -> OptimConfig:
    """Check every field (and, given ``max_steps``, that the schedule fits the run). Returns ``cfg``."""
    p = prefix
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"{p}.name", f"unknown optimizer {cfg.name!r}; choose one of {'|'.join(OPTIMIZERS)}")
    if not _is_num(cfg.lr) or cfg.lr <= 0:
        raise ConfigError(f"{p}.lr", f"must be a finite number > 0, got {cfg.lr!r}")
    if not _is_num(cfg.weight_decay) or cfg.weight_decay < 0:
        raise ConfigError(f"{p}.weight_decay", f"must be a finite number >= 0, got {cfg.weight_decay!r}")
    betas = list(cfg.betas) if cfg.betas is not None else []
    if len(betas) != 2 or not all(_is_num(b) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{p}.betas", f"must be two numbers in [0, 1), got {cfg.betas!r}")
    if not _is_num(cfg.eps) or cfg.eps <= 0:
        raise ConfigError(f"{p}.eps", f"must be a finite number > 0, got {cfg.eps!r}")
    if not _is_num(cfg.grad_clip) or cfg.grad_clip < 0:
        raise ConfigError(f"{p}.grad_clip", f"must be >= 0 (0 disables clipping), got {cfg.grad_clip!r}")
    if cfg.muon_lr is not None and (not _is_num(cfg.muon_lr) or cfg.muon_lr <= 0):
        raise ConfigError(f"{p}.muon_lr", f"must be a finite number > 0 or null (= lr), got {cfg.muon_lr!r}")
    if not _is_num(cfg.muon_momentum) or not 0.0 <= cfg.muon_momentum < 1.0:
        raise ConfigError(f"{p}.muon_momentum", f"must be in [0, 1), got {cfg.muon_momentum!r}")
    if not isinstance(cfg.muon_nesterov, bool):
        raise ConfigError(f"{p}.muon_nesterov", f"must be true or false, got {cfg.muon_nesterov!r}")
    if not _is_int(cfg.muon_ns_steps) or not 1 <= cfg.muon_ns_steps < 100:
        raise ConfigError(f"{p}.muon_ns_steps", f"must be an integer in [1, 99], got {cfg.muon_ns_steps!r}")
    if cfg.muon_adjust_lr not in MUON_ADJUST_LR:
        raise ConfigError(
            f"{p}.muon_adjust_lr", f"must be one of {'|'.join(MUON_ADJUST_LR)}, got {cfg.muon_adjust_lr!r}"
        )
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"{p}.schedule", f"unknown schedule {cfg.schedule!r}; choose one of {'|'.join(SCHEDULES)}")
    if not _is_int(cfg.warmup_steps) or cfg.warmup_steps < 0:
        raise ConfigError(f"{p}.warmup_steps", f"must be an integer >= 0, got {cfg.warmup_steps!r}")
    if not _is_num(cfg.min_lr_ratio) or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"{p}.min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio!r}")
    if not _is_num(cfg.decay_fraction) or not 0.0 <= cfg.decay_fraction <= 1.0:
        raise ConfigError(f"{p}.decay_fraction", f"must be in [0, 1], got {cfg.decay_fraction!r}")
    if max_steps is not None:
        if cfg.warmup_steps > max_steps:
            raise ConfigError(
                f"{p}.warmup_steps",
                f"{cfg.warmup_steps} is longer than the run ({max_steps} steps); the lr would never reach its peak",
            )
        if cfg.schedule == "wsd" and cfg.warmup_steps + wsd_decay_steps(cfg, max_steps) > max_steps:
            raise ConfigError(
                f"{p}.decay_fraction",
                f"warmup ({cfg.warmup_steps}) + decay ({wsd_decay_steps(cfg, max_steps)} steps) exceed the run "
                f"({max_steps} steps)",
            )
    return cfg


def wsd_decay_steps(cfg: OptimConfig, max_steps: int) -> int:
    """Number of final steps over which WSD decays (``round(decay_fraction * max_steps)``)."""
    return int(round(cfg.decay_fraction * max_steps))


def validate_checkpoint_config(cfg: CheckpointConfig, prefix: str = "checkpoint") -> CheckpointConfig:
    """Check every field; raise one ConfigError naming the first bad field. Returns ``cfg``."""
    p = prefix
    if not _is_int(cfg.interval) or cfg.interval < 0:
        raise ConfigError(f"{p}.interval", f"must be an integer >= 0 (0 = only at the end), got {cfg.interval!r}")
    if not _is_int(cfg.keep_last) or cfg.keep_last < 0:
        raise ConfigError(f"{p}.keep_last", f"must be an integer >= 0 (0 = keep all), got {cfg.keep_last!r}")
    if not isinstance(cfg.resume, str) or not cfg.resume.strip():
        raise ConfigError(f"{p}.resume", f"must be 'auto', 'none' or a checkpoint path, got {cfg.resume!r}")
    if not isinstance(cfg.overwrite, bool):
        raise ConfigError(f"{p}.overwrite", f"must be true or false, got {cfg.overwrite!r}")
    if cfg.overwrite and isinstance(cfg.resume, str) and cfg.resume.strip().lower() not in RESUME_KEYWORDS:
        raise ConfigError(
            f"{p}.overwrite",
            "has no effect when resuming from an explicit checkpoint path "
            f"(checkpoint.resume={cfg.resume}); it only applies with resume=auto or resume=none",
        )
    if not isinstance(cfg.async_save, bool):
        raise ConfigError(f"{p}.async_save", f"must be true or false, got {cfg.async_save!r}")
    return cfg
