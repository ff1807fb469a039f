"""How many CPU threads each training process uses (``trainer.num_threads``), decided once and printed.

Why: torch's intra-op pool defaults to every core per process, which oversubscribes a shared or multi-rank
machine (a tiny model on a busy 2-core box: 22-50 tokens/s with the default, 208-257 with one thread). Order:
``trainer.num_threads``, else ``OMP_NUM_THREADS``, else the usable cores / ``LOCAL_WORLD_SIZE`` (at least 1).
docs/training.md, "Threads".
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; the machine's count where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _positive_env(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def resolve_num_threads(configured: Optional[int]) -> Tuple[int, str]:
    """(threads, where the number comes from) per the order in the module docstring."""
    if configured:
        return int(configured), "trainer.num_threads"
    omp = _positive_env("OMP_NUM_THREADS")
    if omp:
        return omp, "OMP_NUM_THREADS"
    cores, local = available_cores(), _positive_env("LOCAL_WORLD_SIZE") or 1
    return max(1, cores // local), f"auto: {cores} core(s) / {local} process(es) on this node"


def apply_num_threads(configured: Optional[int]) -> Tuple[int, str]:
    """Set torch's intra-op thread count; returns what :func:`resolve_num_threads` decided."""
    n, source = resolve_num_threads(configured)
    torch.set_num_threads(n)
    return n, source
