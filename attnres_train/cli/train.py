"""`attnres-train` / `python -m attnres_train`: the Hydra main that composes the config and runs the Trainer.

Bad input (config values, data files, checkpoints, paths) ends with one line ``error: ...`` on stderr and exit
code 2, without a traceback and without touching existing checkpoints; an aborted run (too many NaN/Inf steps,
a dead or hung peer, a failed checkpoint save) ends the same way with exit code 3. Ctrl-C stops after the
current step with a checkpoint and exit code 130 (a second Ctrl-C: at once, no save, also 130); SIGTERM /
SIGUSR1 stop the same way with exit code 0 (preemption: the requeued job resumes). Works under torchrun (one
process per rank) and with ``-m`` multirun sweeps (each job gets ``run_dir/<its swept overrides>``, cli/sweep_dirs.py).
``--help`` prints the config fields from the schema (cli/help.py); ``--check-only`` runs only the pre-flight
(launch/torchrun.sh, before any worker starts). docs/training.md, "Bad input".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from omegaconf.errors import OmegaConfBaseException

from ..config.errors import ConfigError, UserInputError
from ..config.paths import CONFIG_DIR
from ..config.schema import as_config, register_configs, validate_config
from . import preflight as preflight_checks
from .help import print_help, wants_help
from .preflight import Checked, Refused, hydra_error_message, remove_created_run_dir
from .sweep_dirs import register_resolver

# torch and everything built on it are imported inside the functions that train: a bad config or run_dir is
# refused (PreflightCallback) before torch loads, in well under a second.


def _fail(message: str, code: int = 2) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _task(dcfg):
    from ..parallel.mesh import shutdown_process_group
    from ..train.faults import SIGINT_EXIT_CODE, TrainingAborted
    from ..train.trainer import Trainer

    run_dir = Path(".")
    try:
        cfg = as_config(dcfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        cfg.run_dir = str(run_dir)
        try:
            trainer = Trainer(cfg, run_dir, parallel_context(cfg))
            result = trainer.fit()
        finally:
            shutdown_process_group()
    except (ConfigError, UserInputError) as exc:
        remove_created_run_dir()  # bad input found after the pre-flight: leave no empty run_dir behind
        _fail(str(exc))
    except TrainingAborted as exc:  # NaN/Inf limit, a dead or hung peer: one line, its own exit code
        _fail(str(exc), exc.exit_code)
    except OmegaConfBaseException as exc:
        remove_created_run_dir()
        _fail(hydra_error_message(exc) or str(exc).splitlines()[0])
    except KeyboardInterrupt:  # Ctrl-C before the loop, or a second Ctrl-C inside it
        _fail(
            "interrupted (Ctrl-C): stopped at once without saving; the newest complete checkpoint in "
            f"{run_dir / 'checkpoints'}, if any, is intact (checkpoint.resume=auto continues from it)",
            SIGINT_EXIT_CODE,
        )
    if trainer.stop_signal == "SIGINT":  # stopped cleanly with a checkpoint, but the run did not finish
        sys.exit(SIGINT_EXIT_CODE)
    return result.get("val_loss", result.get("loss"))


def parallel_context(cfg):
    """The run's one ParallelContext: the process group from torchrun's environment (if world > 1), the config
    validated for that world size, then every mesh (``parallel.mesh.build_parallel_context``)."""
    from ..parallel.mesh import build_parallel_context, init_process_group

    world, device = init_process_group(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    validate_config(cfg, dp_world_size=world)
    return build_parallel_context(cfg.parallel, cfg.model, cfg.data.seq_len, world, device.type)


def run(overrides, ctx=None) -> dict:
    """Compose the config with Hydra's compose API and train in this process (tests, notebooks).

    ``overrides`` are the same strings as on the command line; set ``run_dir=...``. Errors propagate
    (ConfigError / UserInputError) instead of exiting.
    """
    from ..train.trainer import Trainer

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        try:
            dcfg = compose(config_name="config", overrides=list(overrides))
        except Exception as exc:  # noqa: BLE001 - Hydra's composition errors as the one-line UserInputError
            message = hydra_error_message(exc)
            if message is None:
                raise
            raise UserInputError(message) from None
    cfg = as_config(dcfg)
    if ctx is None:
        ctx = parallel_context(cfg)
    else:
        validate_config(cfg, dp_world_size=ctx.world_size)
    return Trainer(cfg, Path(cfg.run_dir), ctx).fit()


def resolvable_cfg_request(argv):
    """``--cfg hydra --resolve`` as ``--cfg all --package hydra --resolve``: the same node, resolved.

    Hydra prints ``--cfg hydra`` from a copy without the job's keys, so ``hydra.run.dir: ${run_dir}`` cannot
    resolve there; selecting the ``hydra`` package of the whole config resolves it against the root."""
    flags = {"--cfg": None, "-c": None}
    for i, a in enumerate(argv):
        if a in flags and i + 1 < len(argv):
            flags[a] = i + 1
        elif a.startswith("--cfg="):
            argv = [*argv[:i], "--cfg", a.split("=", 1)[1], *argv[i + 1 :]]
            flags["--cfg"] = i + 1
    at = flags["--cfg"] if flags["--cfg"] is not None else flags["-c"]
    wants_resolve = "--resolve" in argv  # (Hydra's -r is --run)
    has_package = any(a in ("--package", "-p") or a.startswith("--package=") for a in argv)
    if at is None or argv[at] != "hydra" or not wants_resolve or has_package:
        return argv
    return [*argv[:at], "all", "--package", "hydra", *argv[at + 1 :]]


def check_flags(argv) -> None:
    """Hydra's own flags misused: one error line (exit 2) instead of argparse's usage block or Hydra's ValueError."""
    query = [a for a in argv if a.startswith("query=")]
    completing = any(a in ("-sc", "--shell-completion") for a in argv)
    if completing and query and "COMP_LINE" not in os.environ:  # Hydra: a KeyError traceback
        _fail(
            f"--shell-completion {query[0]} is run by the shell's completion function, which sets COMP_LINE (unset "
            'here); to install completion: eval "$(attnres-train --shell-completion install=bash)"'
        )
    parser = get_args_parser()
    parser.error = lambda message: _fail(f"{message} (see attnres-train --help; Hydra's flags: --hydra-help)")
    args = parser.parse_args(argv)
    modes = [("--run", args.run), ("--multirun", args.multirun), ("--cfg", args.cfg is not None)]
    modes += [("--info", args.info is not None), ("--shell-completion", args.shell_completion)]
    given = [name for name, on in modes if on]
    if len(given) > 1:
        _fail(f"{' and '.join(given)} cannot be combined: give one of {', '.join(name for name, _ in modes)}")
    if args.resolve and args.cfg is None:
        _fail("--resolve works only with --cfg (e.g. attnres-train --cfg job --resolve)")


def main() -> None:
    if not CONFIG_DIR.is_dir():
        _fail(f"config directory {CONFIG_DIR} not found (reinstall attnres-train: pip install . or pip install -e .)")
    if wants_help(sys.argv[1:]):  # our help from the schema; Hydra's stays behind --hydra-help
        try:
            print_help(sys.argv[1:])
        except Exception as exc:  # noqa: BLE001 - a bad override next to --help: the same one error line
            message = hydra_error_message(exc)
            if message is None:
                raise
            _fail(message)
    # --check-only: the pre-flight alone (config, run_dir), exit 0 or one error line; launch/torchrun.sh runs it
    preflight_checks.CHECK_ONLY = "--check-only" in sys.argv[1:]
    sys.argv = [sys.argv[0], *resolvable_cfg_request([a for a in sys.argv[1:] if a != "--check-only"])]
    check_flags(sys.argv[1:])
    register_configs()
    register_resolver()  # ${sweep_dirname:...} in hydra.sweep.subdir (cli/sweep_dirs.py)
    # Hydra prints its own errors in several lines and exits 1 unless HYDRA_FULL_ERROR is set, in which case it
    # raises them; we set it to catch them and print one `error:` line (exit 2). A user who set it wants the trace.
    user_wants_trace = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)(_task)()
    except Refused as exc:  # the config or run_dir, checked before Hydra creates run_dir (cli/preflight.py)
        _fail(str(exc))
    except Checked:  # --check-only, and the checks passed
        sys.exit(0)
    except Exception as exc:  # noqa: BLE001 - reworded when it is a config/Hydra error, re-raised otherwise
        message = None if user_wants_trace else hydra_error_message(exc)
        if message is None:
            raise
        _fail(message)


if __name__ == "__main__":
    main()
