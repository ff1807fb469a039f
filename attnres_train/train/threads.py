"""How many CPU threads each training process uses (``trainer.num_threads``), decided once and printed.

Why: torch's intra-op pool defaults to every core it can see, per process. Several ranks on one machine, or a
machine shared with other jobs, then oversubscribe the cores and the same run gets several times slower: a
tiny model on a busy 2-core box ran at 22–50 tokens/s with torch's default and 208–257 with one thread
(issue 15). So the trainer sets the number explicitly, from (first that applies):

1. ``trainer.num_threads`` when set;
2. ``OMP_NUM_THREADS`` when set (torchrun sets it to 1 when it starts several processes per node);
3. the cores this process may run on (``os.sched_getaffinity``) divided by the processes on this node
   (``LOCAL_WORLD_SIZE``, set by torchrun; 1 otherwise), at least 1.

The choice and its source are printed in the run header and logged as the ``start`` event.
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
