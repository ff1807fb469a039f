"""``python -m attnres_train.cli.torchrun_main <torchrun arguments>``: torchrun, ending in one line when a worker fails.

torch.distributed.run reports a failed worker by raising ChildFailedError (a traceback of the launcher and a
report box) and exits 1, whatever the worker's exit code. launch/torchrun.sh starts the workers through this
module: the same launcher (``torch.distributed.run.main``), but a failed worker ends in one line naming the failed
rank(s), their exit code and per-rank log, and the launcher exits with the worker's own code (2 bad input, 3
aborted run, 130 Ctrl-C, 128+N for signal N). docs/training.md, "--check-only and torchrun".
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

# attnres-train's own exit codes after which the worker has printed its one `error:` line (cli/train.py): the
# launcher's line then must not be a second `error:` line.
WORKER_PRINTED_ERROR = {2: "bad input", 3: "run aborted"}
# torchrun's agent logs these for a failed worker; the launcher's one line says the same (rank, exit code).
AGENT_NOISE = ("failed (exitcode: ", "Sending process ")


class _DropAgentNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(AGENT_NOISE)


def run_dir_from(argv: list[str]) -> str | None:
    """The ``run_dir=`` override given to the workers (the last one wins, as in Hydra), else None."""
    found = None
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key == "run_dir":
            found = value
    return found


def exit_code(code: int) -> int:
    """A worker's exit code as a shell reports it: killed by signal N (negative in torchrun) -> 128 + N."""
    return 128 - code if code < 0 else code


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def failure_line(failures: dict, run_dir: str | None) -> tuple[str, int]:
    """One line for torchrun's failures ({global rank: ProcessFailure}) and the launcher's exit code.

    The root cause is the earliest worker that exited by itself (code > 0), else one killed by a signal other than
    SIGTERM (the signal the agent stops the remaining workers with), else the earliest one."""

    def cause_first(rank):
        code = failures[rank].exitcode
        return (0 if code > 0 else 1 if code != -signal.SIGTERM else 2, failures[rank].timestamp, rank)

    code = failures[min(failures, key=cause_first)].exitcode
    same = sorted(r for r, f in failures.items() if f.exitcode == code)
    who = f"rank{'s' if len(same) > 1 else ''} {', '.join(map(str, same))}"
    logs = [Path(run_dir) / "logs" / f"rank{r}.log" for r in same] if run_dir else []
    logs = [str(p) for p in logs if p.is_file()]
    where = f"; log: {', '.join(logs)}" if logs else ""
    others = [f"rank {r} {describe(failures[r].exitcode)}" for r in sorted(set(failures) - set(same))]
    peers = f"; then {', '.join(others)}" if others else ""
    if code in WORKER_PRINTED_ERROR:  # the worker's own `error:` line above is the message
        kind = WORKER_PRINTED_ERROR[code]
        return f"torchrun: {who} {describe(code)} ({kind}: see the error line above){where}{peers}", code
    if not logs:
        where = "; each failed rank's traceback is in run_dir/logs/rank<k>.log (once run_dir exists)"
    return f"error: {who} {describe(code)}{where}{peers}", exit_code(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropAgentNoise())
    try:
        torchrun(argv)
    except ChildFailedError as exc:
        line, code = failure_line(exc.failures, run_dir_from(argv))
        print(line, file=sys.stderr, flush=True)
        return code
    except SignalException as exc:  # the agent itself was signalled; it forwarded the signal to the workers
        name = signal.Signals(exc.sigval).name
        print(
            f"torchrun: stopped on {name}: it forwarded {name} to the workers (their lines above say "
            "whether they saved a checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
