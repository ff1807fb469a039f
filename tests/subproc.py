"""Running a command from a test: threads pinned, and the whole output kept in a file that a failure names.

Why: CI has 2 shared cores, so every child (and every torchrun worker, which inherits the environment) gets
``OMP_NUM_THREADS=1`` and ``MKL_NUM_THREADS=1`` unless the test overrides them on purpose; and a failed
command's message used to keep only the last 3,000 characters of stderr. :func:`run` writes the full stdout and
stderr to ``<log_dir>/<name>.log`` (``log_dir`` under the test's ``tmp_path``) and :func:`check` puts that path,
with the stderr tail, in the assertion message.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

PINNED_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TAIL = 3000


def child_env(base: Optional[Mapping[str, str]] = None, **overrides: str) -> dict:
    """``base`` (default: this process's environment) with the thread pins, then ``overrides`` on top."""
    env = dict(os.environ if base is None else base)
    env.update(PINNED_THREADS)
    env.update(overrides)
    return env


def _text(out) -> str:
    if out is None:
        return ""
    return out.decode(errors="replace") if isinstance(out, bytes) else out


def save_output(log_dir: Path, name: str, cmd: Sequence, stdout, stderr, returncode=None) -> Path:
    """Write the command, its exit status and its whole stdout/stderr to a new ``<log_dir>/<name>[-N].log``."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "cmd"
    path, n = log_dir / f"{stem}.log", 1
    while path.exists():
        n += 1
        path = log_dir / f"{stem}-{n}.log"
    path.write_text(
        f"$ {' '.join(map(str, cmd))}\nexit status: {returncode}\n"
        f"--- stdout ---\n{_text(stdout)}\n--- stderr ---\n{_text(stderr)}\n"
    )
    return path


def run(
    cmd: Sequence,
    log_dir: Path,
    name: str = "cmd",
    *,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 600,
    **kwargs,
) -> subprocess.CompletedProcess:
    """``subprocess.run`` with text output captured, threads pinned (:func:`child_env` over ``env``) and the
    whole output saved (``proc.log``). A timeout saves what was captured and fails naming the file."""
    cmd = [str(c) for c in cmd]
    try:
        proc = subprocess.run(cmd, env=child_env(env), capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        log = save_output(log_dir, name, cmd, exc.stdout, exc.stderr, f"killed after {timeout} s")
        raise AssertionError(f"{name}: timed out after {timeout} s; full stdout/stderr in {log}") from None
    proc.log = save_output(log_dir, name, cmd, proc.stdout, proc.stderr, proc.returncode)
    return proc


def popen(
    cmd: Sequence, log_dir: Path, name: str = "cmd", *, env: Optional[Mapping[str, str]] = None, **kwargs
) -> subprocess.Popen:
    """``subprocess.Popen`` with text pipes and threads pinned, for tests that signal or kill the child;
    :func:`communicate` collects and saves its output."""
    proc = subprocess.Popen(
        [str(c) for c in cmd], env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )
    proc.log_dir, proc.log_name = Path(log_dir), name
    return proc


def communicate(proc: subprocess.Popen, timeout: float) -> Tuple[str, str]:
    """``proc.communicate`` that saves the whole output (``proc.log``); a timeout kills the child and fails
    naming the file."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        log = save_output(proc.log_dir, proc.log_name, proc.args, out, err, f"killed after {timeout} s")
        raise AssertionError(f"{proc.log_name}: timed out after {timeout} s; full stdout/stderr in {log}") from None
    proc.log = save_output(proc.log_dir, proc.log_name, proc.args, out, err, proc.returncode)
    proc.err_text = err
    return out, err


def failure(proc, what: str = "") -> str:
    """An assertion message: the exit status, the file with the whole output, the stderr tail."""
    log = getattr(proc, "log", None)
    where = f"full stdout/stderr in {log}" if log else "output not saved"
    head = f"{what}: " if what else ""
    err = getattr(proc, "err_text", proc.stderr)
    return (
        f"{head}exit status {proc.returncode}; {where}\n--- last {TAIL} characters of stderr ---\n"
        f"{_text(err if isinstance(err, (str, bytes)) else None)[-TAIL:]}"
    )


def check(proc, returncode: int = 0, what: str = "") -> subprocess.CompletedProcess:
    """Assert the exit status; the message names the saved output file."""
    assert proc.returncode == returncode, failure(proc, what)
    return proc
