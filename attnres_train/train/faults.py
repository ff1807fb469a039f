"""Faults the training loop survives or reports: preemption signals, non-finite steps, failed collectives.

Why one module: each fault must end the same way on every rank (a flag agreed by one MAX all-reduce) and
with one message. :class:`StopSignals` turns SIGTERM / SIGUSR1 / SIGINT into a stop after the current step
(a second Ctrl-C aborts, except within :data:`REPEAT_WINDOW_S`: torchrun forwards the terminal's SIGINT);
:class:`TrainingAborted` and :func:`comm_failure_message` turn too many NaN/Inf steps or a dead or hung peer
into one line naming the rank, step and newest checkpoint. docs/training.md, "Faults", has the details.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
SIGINT_EXIT_CODE = 130  # 128 + SIGINT: what shells report for a Ctrl-C'd command
REPEAT_WINDOW_S = 1.0  # a SIGINT this soon after the first is the same press (torchrun's forwarded copy)

# Text of the errors gloo / NCCL / the TCP store raise when a peer is gone or a collective timed out.
_COMM_FAILURE_MARKERS = (
    "gloo",
    "Gloo",
    "NCCL",
    "nccl",
    "Connection reset",
    "Connection closed",
    "Connection refused",
    "Broken pipe",
    "Timed out",
    "timed out",
    "Socket Timeout",
    "DistNetworkError",
)


class TrainingAborted(RuntimeError):
    """The run cannot go on (a peer rank failed, or too many non-finite steps); the message says what to do.

    ``exit_code``: what the command line should exit with (3: distinct from bad input's 2).
    """

    exit_code = 3


class StopSignals:
    """Context manager: SIGTERM / SIGUSR1 / SIGINT set a flag instead of killing the process (main thread only).

    The previous handlers are restored on exit. A signal that arrives before the first step is honoured
    after it; one that arrives during a blocking collective is seen when the collective returns. A second
    SIGINT (more than ``REPEAT_WINDOW_S`` after the first) raises ``KeyboardInterrupt``: abort now.
    """

    def __init__(self, rank: int = 0, names=STOP_SIGNALS):
        self.rank = rank
        self.names = tuple(names)
        self.received: int = 0
        self._first_sigint: Optional[float] = None
        self._previous = {}

    @staticmethod
    def _say(msg: str) -> None:
        # os.write, not print: a handler may interrupt a print on the same stream (reentrant call error)
        try:
            os.write(2, msg.encode())
        except OSError:
            pass

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None:
                if now - self._first_sigint < REPEAT_WINDOW_S:
                    return  # the same Ctrl-C, forwarded by a launcher
                self._say(f"[rank {self.rank}] received SIGINT again: aborting now without saving\n")
                raise KeyboardInterrupt
            self._first_sigint = now
        if not self.received:
            self.received = int(signum)
            again = " (press Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
            self._say(
                f"[rank {self.rank}] received {signal.Signals(signum).name}: finishing the current step, then "
                f"saving a checkpoint and exiting{again}\n"
            )

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()

    def agreed(self, ctx) -> Optional[str]:
        """Name of a stop signal received by any rank (collective over the world when distributed), or None."""
        value = float(self.received)
        if ctx.is_distributed:
            t = torch.tensor([value], device=ctx.device)
            ctx.all_reduce_max_(t)
            value = float(t.item())
        return signal.Signals(int(value)).name if value else None


def is_comm_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer died, hung past the timeout or lost its connection."""
    if isinstance(exc, TrainingAborted):
        return False
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)):
        return False
    text = f"{type(exc).__name__}: {exc}"
    return any(m in text for m in _COMM_FAILURE_MARKERS)


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def comm_failure_message(exc: BaseException, rank: int, activity: str, timeout_s: int, checkpoint) -> str:
    """``activity``: what the ranks were doing (``step 12``, ``the checkpoint save after step 12``...)."""
    where = (
        (
            f"the newest complete checkpoint is {checkpoint}; the requeued or restarted job resumes from it with "
            "checkpoint.resume=auto"
        )
        if checkpoint
        else "no checkpoint of this run exists yet"
    )
    return (
        f"rank {rank}: a collective operation failed during {activity} ({first_line(exc)}). Another rank died, "
        f"hung or lost its connection (collectives time out after trainer.dist_timeout_s={timeout_s}s); "
        f"{where}."
    )


def write_rank_log(run_dir: Path, rank: int, exc: BaseException) -> Optional[Path]:
    """RUN_DIR/logs/rank<k>.log: this rank's traceback of the error that ended its run (appended, time-stamped).

    Why: rank 0 prints one line and under torchrun the other ranks' tracebacks interleave or are lost; each
    rank's file keeps the whole story. Never raises (a full disk must not hide the original error); None then.
    """
    path = Path(run_dir) / "logs" / f"rank{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank} (pid {os.getpid()}) failed:\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + "\n")
    except OSError:
        return None
    return path
