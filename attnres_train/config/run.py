"""Trainer and logging config schema: the loop's cadence, batch geometry, precision, metrics sinks.

Kept apart from the optimizer/checkpoint schemas (``config/train.py``) and the model/data schemas so each
group can be swapped with a Hydra override without touching the others. Validation raises one ConfigError
naming the field (``trainer.global_batch_size``...), before any data is read or model built.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import List, Optional

from .errors import ConfigError


@dataclass
class TrainerConfig:
    """The training loop: run length, batch geometry, cadence of logs / validation / samples, device, precision."""

    # Optimizer steps of the whole run; the LR schedule is laid out over them.
    max_steps: int = 300
    # Stop (with a checkpoint) once this step is reached, without changing the LR schedule, which is
    # always laid out over max_steps (null = run to max_steps). Useful for staged jobs and resume tests.
    stop_at: Optional[int] = None
    # Sequences per optimizer step over all data-parallel ranks; must equal
    # micro_batch_size * grad_accum * dp_world_size for an integer grad_accum >= 1.
    global_batch_size: int = 8
    # Sequences per forward/backward on each data-parallel rank (gradient accumulation makes up the rest).
    micro_batch_size: int = 8
    # The metrics record (console, train.log, metrics.jsonl and the other sinks) every k steps.
    log_every: int = 10
    # Validation every k steps (0 = off) on ``val_batches`` held-out batches: in all, or of each of
    # data.val_sources when set (null = every held-out sample). docs/data.md, "Validation".
    val_every: int = 100
    # Held-out batches per validation, in all or per data.val_sources entry (null = every held-out sample).
    val_batches: Optional[int] = 4
    # A generated text sample in the logs every k steps (0 = off).
    sample_every: int = 100
    # The text each logged sample continues.
    sample_prompt: str = "def "
    # Tokens generated per logged sample.
    sample_tokens: int = 48
    # 0 = greedy (tiny models often repeat one token), > 0 = temperature sampling.
    sample_temperature: float = 0.7
    # Per-layer AttnRes depth-attention entropy / mean weights every k steps (0 = off).
    depth_stats_every: int = 50
    # auto: bf16 autocast where the device supports it well (CUDA with bf16), fp32 otherwise.
    precision: str = "auto"
    # auto (CUDA when available, else CPU) | cuda | cpu; under torchrun each rank takes cuda:<LOCAL_RANK>.
    device: str = "auto"
    # Recompute each decoder layer's activations in the backward instead of keeping them (less memory, more compute).
    activation_checkpointing: bool = False
    # torch.compile each decoder layer (backend: compile_backend).
    compile: bool = False
    # CPU only: keep freed host memory in the process (glibc mallopt) instead of returning it to the OS, so a
    # step does not page-fault its working set in again every step (f2 preset: 4.6 s -> 3.0 s per step).
    # The process then keeps its peak heap. No effect on GPU runs or without glibc (train/host_memory.py).
    keep_host_memory: bool = True
    # CPU threads per process (torch.set_num_threads). null = OMP_NUM_THREADS if set, else the cores this process
    # may use divided by the processes on this node (train/threads.py). More than the available cores is an error.
    num_threads: Optional[int] = None
    # torch.compile backend: "inductor" (default, generates kernels), "aot_eager" (graph capture only).
    compile_backend: str = "inductor"
    # Peak FLOP/s of one device for MFU; 0 = auto: the known-GPU table, or on CPU a matmul probe cached per machine
    # (~/.cache/attnres-train/peak_flops.json). The header names the source (docs/training.md, "Metrics").
    peak_flops: float = 0.0
    # Seconds for collective timeouts, on every process group (a dead or hung rank makes the others exit with
    # an error naming the step instead of hanging).
    dist_timeout_s: int = 600
    # A step whose loss or gradient norm is NaN/Inf is skipped (no optimizer step, no router-bias update);
    # more than this many skipped steps in a row stop the run without saving (0 = stop at the first).
    max_consecutive_skips: int = 3
    # Start even when the memory estimate exceeds a rank's total memory (else refused before anything is
    # written). The estimate is per rank against its GPU, or host RAM shared by the node's ranks; docs/training.md,
    # "Memory check".
    skip_memory_check: bool = False


@dataclass
class WandbConfig:
    """Weights & Biases logging (one W&B run per run_dir, resumed with it)."""

    # online | offline | disabled
    mode: str = "disabled"
    # W&B project the run is logged to.
    project: str = "attnres-train"
    # W&B team or user (null = your default entity).
    entity: Optional[str] = None
    # Display name of the W&B run (null = W&B picks one).
    name: Optional[str] = None
    # Tags attached to the W&B run.
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    """Where the metrics records go (docs/training.md, "Metrics"); RUN_DIR/train.log always gets them."""

    # Print the metrics lines on the console (false: only the trainer's messages).
    console: bool = True
    # Write RUN_DIR/metrics.jsonl (one JSON object per record; what the analysis tools read).
    jsonl: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # TensorBoard event files in RUN_DIR/tensorboard/ (the logged metrics as scalars); needs the tensorboard
    # package: pip install 'attnres-train[tensorboard]'. docs/training.md, "Logging".
    tensorboard: bool = False


def _pos(v, path):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(path, f"must be a positive integer, got {v!r}")


def _nonneg(v, path):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(path, f"must be an integer >= 0, got {v!r}")


def validate_trainer_config(cfg: TrainerConfig, dp_world_size: int = 1) -> int:
    """Validate and return the gradient-accumulation factor."""
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "log_every"):
        _pos(getattr(cfg, name), f"trainer.{name}")
    if cfg.stop_at is not None:
        _pos(cfg.stop_at, "trainer.stop_at")
    if cfg.val_batches is not None:
        _pos(cfg.val_batches, "trainer.val_batches")
    for name in ("val_every", "sample_every", "sample_tokens", "depth_stats_every", "max_consecutive_skips"):
        _nonneg(getattr(cfg, name), f"trainer.{name}")
    per_step = cfg.micro_batch_size * dp_world_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            "trainer.global_batch_size",
            f"{cfg.global_batch_size} is not divisible by micro_batch_size ({cfg.micro_batch_size}) x "
            f"data-parallel ranks ({dp_world_size})",
        )
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError("trainer.precision", f"must be auto|fp32|bf16, got {cfg.precision!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("trainer.device", f"must be auto|cpu|cuda, got {cfg.device!r}")
    if cfg.sample_temperature < 0:
        raise ConfigError("trainer.sample_temperature", f"must be >= 0, got {cfg.sample_temperature!r}")
    if cfg.peak_flops < 0:
        raise ConfigError("trainer.peak_flops", f"must be >= 0, got {cfg.peak_flops!r}")
    _pos(cfg.dist_timeout_s, "trainer.dist_timeout_s")
    if cfg.num_threads is not None:
        _pos(cfg.num_threads, "trainer.num_threads")
        cores = _available_cores()
        if cfg.num_threads > cores:
            raise ConfigError(
                "trainer.num_threads",
                f"{cfg.num_threads} threads, but this process may run on only "
                f"{cores} core(s); use at most {cores}, or null for the automatic choice",
            )
    return cfg.global_batch_size // per_step


def _available_cores() -> int:
    """Cores this process may run on (same rule as attnres_train.train.threads.available_cores)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def validate_logging_config(cfg: LoggingConfig) -> None:
    if cfg.wandb.mode not in ("online", "offline", "disabled"):
        raise ConfigError("logging.wandb.mode", f"must be online|offline|disabled, got {cfg.wandb.mode!r}")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:  # no silent no-op
        raise ConfigError(
            "logging.tensorboard",
            "needs the tensorboard package, which is not installed: pip install 'attnres-train[tensorboard]' "
            "(or pip install tensorboard), or set logging.tensorboard=false",
        )
