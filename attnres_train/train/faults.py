"""Faults the training loop survives or reports: preemption signals, non-finite steps, failed collectives.

* **Preemption** (:class:`StopSignals`): SIGTERM and SIGUSR1 (slurm's usual preemption warning) only set a
  flag. The trainer asks :meth:`StopSignals.agreed` after every step; it all-reduces the flag (MAX, one
  scalar) over the whole world, so every rank sees the same answer at the same step even when only one rank
  got the signal. The trainer then saves a checkpoint (blocking), prints what it did and returns normally,
  so the process exits 0 and a requeued job continues with ``checkpoint.resume=auto``.
* **Non-finite steps**: the train module skips an optimizer step whose loss or gradient norm is NaN/Inf
  (decision agreed over the world, see ``TrainModule.optimizer_step``); the trainer counts consecutive skips
  and stops with :class:`TrainingAborted` once there are more than ``trainer.max_consecutive_skips``.
* **Dead or hung ranks**: every process group times out after ``trainer.dist_timeout_s``
  (``dist.init_distributed``); a collective that fails (peer gone: at once; peer hung: after the timeout) is
  turned into :class:`TrainingAborted` with one message naming the rank, the step and the newest checkpoint
  (:func:`comm_failure_message`).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")

# Text of the errors gloo / NCCL / the TCP store raise when a peer is gone or a collective timed out.
_COMM_FAILURE_MARKERS = ("gloo", "Gloo", "NCCL", "nccl", "Connection reset", "Connection closed", "Connection refused",
                         "Broken pipe", "Timed out", "timed out", "Socket Timeout", "DistNetworkError")


class TrainingAborted(RuntimeError):
    """The run cannot go on (a peer rank failed, or too many non-finite steps); the message says what to do.

    ``exit_code``: what the command line should exit with (3: distinct from bad input's 2).
    """

    exit_code = 3


class StopSignals:
    """Context manager: SIGTERM / SIGUSR1 set a flag instead of killing the process (main thread only).

    The previous handlers are restored on exit. A signal that arrives before the first step is honoured
    after it; one that arrives during a blocking collective is seen when the collective returns.
    """

    def __init__(self, rank: int = 0, names=STOP_SIGNALS):
        self.rank = rank
        self.names = tuple(names)
        self.received: int = 0
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if not self.received:
            self.received = int(signum)
            # os.write, not print: a handler may interrupt a print on the same stream (reentrant call error)
            msg = (f"[rank {self.rank}] received {signal.Signals(signum).name}: finishing the current step, then "
                   "saving a checkpoint and exiting\n")
            try:
                os.write(2, msg.encode())
            except OSError:
                pass

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
    where = (f"the newest complete checkpoint is {checkpoint}; the requeued or restarted job resumes from it with "
             "checkpoint.resume=auto") if checkpoint else "no checkpoint of this run exists yet"
    return (f"rank {rank}: a collective operation failed during {activity} ({first_line(exc)}). Another rank died, "
            f"hung or lost its connection (collectives time out after trainer.dist_timeout_s={timeout_s}s); "
            f"{where}.")
