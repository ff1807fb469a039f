"""A Hydra callback for submitit sweeps on slurm: a watcher that says why a sweep's jobs are not running.

Why: submitit's launcher submits the sweep and then blocks on the results, so a job slurm will never start
(reason ``PartitionConfig``, a down partition, a bad constraint) stays PENDING and the sweep waits silently.
This callback polls ``squeue`` while it waits, reports jobs pending longer than
``ATTNRES_SLURM_PENDING_GRACE_S`` (default 60) with slurm's reason, and for a reason that never clears
(``NEVER_STARTS``) cancels the job and exits 2 after one ``error:`` line. Why it exits and why a callback
rather than a launcher: docs/launch.md (slurm).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# Pending reasons that waiting cannot fix (slurm's squeue(1) "JOB REASON CODES").
NEVER_STARTS = frozenset(
    {
        "PartitionConfig",
        "PartitionDown",
        "PartitionInactive",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "BadConstraints",
        "InvalidAccount",
        "InvalidQOS",
        "DependencyNeverSatisfied",
        "ReqNodeNotAvail",
        "Nodes_required_for_job_are_DOWN,_DRAINED_or_reserved_for_jobs_in_higher_priority_partitions",
    }
)
GRACE_ENV = "ATTNRES_SLURM_PENDING_GRACE_S"


def pending_grace_s() -> float:
    raw = os.environ.get(GRACE_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"error: {GRACE_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise SystemExit(f"error: {GRACE_ENV}={raw!r} must be >= 0")
    return value


def sweep_job_ids(submitit_folder: str) -> list:
    """Job ids submitted into a submitit folder pattern such as ``/runs/sweep/.submitit/%j``."""
    root = Path(submitit_folder.split("%j")[0])
    if not root.is_dir():
        return []
    ids = set()
    for p in root.rglob("*_submitted.pkl"):
        m = re.match(r"^(\d+)", p.name)
        if m:
            ids.add(m.group(1))
    return sorted(ids, key=int)


def pending_reasons(job_ids: Sequence[str]) -> Dict[str, str]:
    """``{job id: reason}`` for the given jobs that slurm lists as PENDING (array tasks by their own id)."""
    if not job_ids:
        return {}
    out = subprocess.run(
        ["squeue", "-h", "-t", "PENDING", "-o", "%i %r", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    reasons = {}
    for line in out.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            reasons[parts[0]] = parts[1].strip()
    return reasons


class PendingWatcher(threading.Thread):
    """Polls the sweep's pending jobs until stopped; reports and (for ``NEVER_STARTS``) cancels stuck ones."""

    def __init__(self, submitit_folder: str, grace_s: float, poll_s: float = 5.0, exit_on_never: bool = True):
        super().__init__(daemon=True, name="attnres-slurm-pending")
        self.exit_on_never = exit_on_never
        self.folder, self.grace_s, self.poll_s = submitit_folder, grace_s, poll_s
        self.first_seen: Dict[str, float] = {}
        self.reported: set = set()
        self.cancelled: Dict[str, str] = {}
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            try:
                self.check(time.monotonic())
            except (OSError, subprocess.SubprocessError) as exc:  # squeue unavailable for a moment: try again
                print(f"warning: could not query slurm for the sweep's pending jobs: {exc}", file=sys.stderr)

    def check(self, now: float) -> None:
        for job, reason in pending_reasons(sweep_job_ids(self.folder)).items():
            since = self.first_seen.setdefault(job, now)
            if now - since < self.grace_s or job in self.reported:
                continue
            self.reported.add(job)
            base = reason.split("(")[0].strip()
            if base in NEVER_STARTS:
                print(
                    f"error: slurm job {job} can never start ({reason}): its resource request does not fit the "
                    f"partition; cancelling it. Fix hydra.launcher.* (cpus_per_task, gpus_per_node, mem_gb, "
                    f"partition, timeout_min) or pick another preset (docs/launch.md)",
                    file=sys.stderr,
                    flush=True,
                )
                subprocess.run(["scancel", job.split("_")[0]], capture_output=True, timeout=30)  # an array: all of it
                self.cancelled[job] = reason
                if self.exit_on_never:
                    print(
                        "error: the sweep stops here (its other slurm jobs keep their state: squeue)",
                        file=sys.stderr,
                        flush=True,
                    )
                    sys.stdout.flush()
                    os._exit(2)
            else:
                print(f"slurm job {job} still pending after {now - since:.0f} s: {reason}", file=sys.stderr, flush=True)


class PendingJobsCallback(Callback):
    """Runs a :class:`PendingWatcher` on the sweep's submitit folder while a multirun is in progress."""

    def __init__(self) -> None:
        self.watcher: Optional[PendingWatcher] = None

    # submitit pickles the Hydra context (callbacks included) into every job: the thread stays behind
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.watcher = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = OmegaConf.select(config, "hydra.launcher.submitit_folder", default=None)
        if folder:
            self.watcher = PendingWatcher(str(folder), pending_grace_s())
            self.watcher.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
