"""Will a run fit? Its per-rank memory estimate (the one formula ``attnres-plan`` prints) against what a rank has.

Why: a size that cannot fit (``model.vocab_size=10**12``, a huge hidden size, batch or sequence) would otherwise end
in an allocator traceback or the OOM killer after start-up, with ``run_dir`` already written. The pre-flight
(cli/preflight.py) calls :func:`check_memory_fit` before anything is allocated or written. Total memory, never
free memory, so the verdict does not depend on the machine's load. docs/training.md, "Memory check".
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..config.errors import ConfigError
from ..config.parallel import ParallelDims, resolve_parallel_dims
from ..config.schema import Config
from .pipeline.layout import PipelineLayout
from .pipeline.schedules import make_schedule, schedule_placement
from .plan_estimates import RankEstimate, TrainShape, estimate_ranks

REFUSE_FRACTION = 1.0  # refuse when the estimate exceeds the rank's total memory
WARN_FRACTION = 0.9  # one warning line above this fraction of it
SKIP_FIELD = "trainer.skip_memory_check"
# Fields the error may name (culprits): those above their schema default whose reset to it removes most of the
# estimate.
SIZE_FIELDS = (
    "model.vocab_size",
    "model.moe.num_experts",
    "model.moe.intermediate_size",
    "model.moe.dense_intermediate_size",
    "trainer.micro_batch_size",
    "data.seq_len",
    "model.num_layers",
    "model.hidden_size",
)


@dataclass(frozen=True)
class Capacity:
    """Memory one rank may use, in bytes, and where that figure comes from (for the message)."""

    nbytes: float
    source: str


def device_type(trainer_device: str) -> str:
    """``trainer.device`` -> 'cpu' | 'cuda', as ``parallel.mesh.pick_device`` decides it, without selecting a
    device (and without touching CUDA when the run is on the CPU)."""
    if trainer_device == "cpu":
        return "cpu"
    if trainer_device == "cuda" or torch.cuda.is_available():
        return "cuda"
    return "cpu"


def train_shape(cfg, dims: ParallelDims, dev: str) -> TrainShape:
    """The batch geometry and precisions of ``cfg`` as :mod:`plan_estimates` takes them."""
    tc = cfg.trainer
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and dev == "cuda")
    return TrainShape(
        micro_batch_size=tc.micro_batch_size,
        seq_len=cfg.data.seq_len,
        microbatches=tc.global_batch_size // (dims.dp * tc.micro_batch_size),
        activation_checkpointing=tc.activation_checkpointing,
        optimizer=cfg.optim.name,
        act_bytes=2 if bf16 else 4,
    )


def estimate(cfg, dims: ParallelDims, dev: str) -> List[RankEstimate]:
    """Per pipeline rank estimates of ``cfg`` under ``dims`` (the layout and schedule built as the trainer does)."""
    shape = train_shape(cfg, dims, dev)
    layout = sched = None
    if dims.pp > 1:
        pc = cfg.pipeline
        layout = PipelineLayout.from_pipeline_config(cfg.model, pc, dims.pp, dims.vpp, schedule_placement(pc.schedule))
        sched = make_schedule(
            pc.schedule, dims.pp, dims.vpp, shape.microbatches, pc.microbatch_group_size, pc.split_backward, pc.w_delay
        )
    return estimate_ranks(cfg.model, dims, shape, layout, sched)


def peak_bytes(cfg, dims: ParallelDims, dev: str) -> float:
    """The largest per-rank estimate of ``cfg`` (every rank checks the same figure and agrees)."""
    return max(r.total_memory for r in estimate(cfg, dims, dev))


def host_memory_bytes() -> Optional[Tuple[int, str]]:
    """Total host RAM (``/proc/meminfo`` MemTotal, or the cgroup's memory limit when lower); None off Linux."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total, source = int(fields["MemTotal"].split()[0]) * 1024, "host RAM, /proc/meminfo MemTotal"
    except (OSError, KeyError, ValueError):
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(path).read_text().strip())
        except (OSError, ValueError):  # absent, or "max" (no limit)
            continue
        if limit < total:
            total, source = limit, f"cgroup memory limit, {path}"
    return total, source


def capacity(dev: str, local_rank: int = 0, local_world_size: int = 1) -> Optional[Capacity]:
    """What one rank has: its GPU's total memory, or the host's RAM shared by the node's ranks (None: unknown)."""
    if dev == "cuda":
        if not torch.cuda.is_available():  # trainer.device=cuda without CUDA: pick_device names the field
            return None
        props = torch.cuda.get_device_properties(local_rank)
        return Capacity(float(props.total_memory), f"cuda:{local_rank} total memory ({props.name})")
    host = host_memory_bytes()
    if host is None:
        return None
    total, source = host
    if local_world_size > 1:
        return Capacity(total / local_world_size, f"{source}, shared by {local_world_size} ranks on this node")
    return Capacity(float(total), source)


def culprits(cfg, dims: ParallelDims, dev: str, need: float) -> List[str]:
    """``SIZE_FIELDS`` above their schema default whose reset to it shrinks the estimate most (and any within 10 %
    of that; the one furthest above its default first), as ``key=value``."""
    default, saved = Config(), {}
    for key in SIZE_FIELDS:
        if _get(cfg, key) <= _get(default, key):
            continue
        smaller = copy.deepcopy(cfg)
        owner, name = _owner(smaller, key)
        setattr(owner, name, _get(default, key))
        try:
            saved[key] = need - peak_bytes(smaller, dims, dev)
        except (ValueError, ConfigError):  # e.g. fewer layers than pipeline stages or AttnRes blocks
            continue
    best = max(saved.values(), default=0.0)
    keys = [k for k, v in saved.items() if best > 0 and v >= 0.9 * best]
    keys.sort(key=lambda k: -_get(cfg, k) / max(_get(default, k), 1))
    return [f"{k}={_get(cfg, k)}" for k in keys]


def check_memory_fit(cfg, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1) -> Optional[str]:
    """Raise a ConfigError when the estimate exceeds the rank's total memory; a warning line above 90 % of it,
    else None. ``cfg`` is a validated Config; nothing is allocated."""
    if cfg.trainer.skip_memory_check:
        return None
    dev = device_type(cfg.trainer.device)
    cap = capacity(dev, local_rank, local_world_size)
    if cap is None:
        return None
    dims = resolve_parallel_dims(cfg.parallel, world_size, model_cfg=cfg.model, seq_len=cfg.data.seq_len)
    ranks = estimate(cfg, dims, dev)
    worst = max(ranks, key=lambda r: r.total_memory)
    need = worst.total_memory
    if need <= WARN_FRACTION * cap.nbytes:
        return None
    figures = f"about {_size(need)} per rank ({_parts(worst, dims.pp > 1)}) against {_size(cap.nbytes)} ({cap.source})"
    if need <= REFUSE_FRACTION * cap.nbytes:
        return (
            f"warning: the run may not fit in memory: {figures}; {SKIP_FIELD}=true silences this check "
            "(docs/training.md, 'Memory check')"
        )
    names = culprits(cfg, dims, dev, need)
    cause = f"most of it comes from {' and '.join(names)}: make it smaller" if names else "use a smaller model or batch"
    raise ConfigError(
        names[0].split("=")[0] if names else "model",
        f"the run does not fit in memory: {figures}; {cause}, shard over more ranks (parallel.*; attnres-plan "
        f"prints the per-rank figures), or set {SKIP_FIELD}=true to start anyway (docs/training.md, 'Memory check')",
    )


def _parts(r: RankEstimate, pipeline: bool) -> str:
    m = r.memory
    where = f"pp rank {r.pp_rank}: " if pipeline else ""
    state = m["weights"] + m["grads"] + m["optimizer"] + m["fsdp_buffers"]
    acts = m["activations"] + m["block_cache"] + m.get("pipeline_sends", 0.0)
    return f"{where}weights, grads and optimizer state {_size(state)}, activations {_size(acts)}"


def _owner(cfg, key: str):
    *path, name = key.split(".")
    owner = cfg
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _get(cfg, key: str):
    owner, name = _owner(cfg, key)
    return getattr(owner, name)


def _size(nbytes: float) -> str:
    for unit, div in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def local_ranks() -> Tuple[int, int, int]:
    """(world size, local rank, ranks on this node) from torchrun's environment (1, 0, 1 without it)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    return world, int(env.get("LOCAL_RANK", "0") or 0), int(env.get("LOCAL_WORLD_SIZE", str(world)) or world)
