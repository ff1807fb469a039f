"""Sweep run directories named after the swept overrides (``runs/sweep/model.residual.num_blocks=2``), not numbers.

Why: a numbered ``sweep/3`` says nothing about the run. Hydra's ``override_dirname`` lists *every* override, so
this callback excludes the ones every job shares (and refuses a sweep that lists a value twice: two jobs in one
directory), and the ``sweep_dirname`` resolver makes the name filesystem-safe. Details: docs/training.md "Sweeps".
"""

from __future__ import annotations

import hashlib

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from .preflight import Refused

RESOLVER = "sweep_dirname"
MAX_NAME_BYTES = 200  # below every common filesystem's 255-byte name limit, with room for a hash suffix


def sweep_dirname(override_dirname: str, job_num) -> str:
    """A directory name for one sweep job: its swept overrides, ``/`` / ``%`` / control characters
    percent-encoded (so two different override sets never map to one name), long names cut with a hash;
    the job number when nothing is swept."""
    if not override_dirname:
        return str(job_num)
    name = "".join(f"%{ord(c):02X}" if c in "/%\\" or ord(c) < 32 or ord(c) == 127 else c for c in override_dirname)
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[: MAX_NAME_BYTES - 13].decode(errors="ignore") + "~" + digest
    return name


def register_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, sweep_dirname)


class SweepDirsCallback(Callback):
    """Keeps the shared (non-swept) command-line overrides out of each job's directory name."""

    def __init__(self) -> None:
        # Before any job dir is resolved; launchers that run jobs elsewhere (submitit) carry registered
        # resolvers to the job's process in Hydra's Singleton state (tests/launch/test_slurm.py)
        register_resolver()

    def on_multirun_start(self, config, **kwargs) -> None:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        shared = [o.key_or_group for o in parsed if not o.is_sweep_override()]
        swept = [o for o in parsed if o.is_sweep_override()]
        params = config.hydra.sweeper.get("params") or {}
        swept += OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        for o in swept:
            if o.is_sweep_override() and not o.is_hydra_override():
                values = [str(v) for v in o.sweep_string_iterator()] if o.is_discrete_sweep() else []
                repeated = sorted({v for v in values if values.count(v) > 1})
                if repeated:
                    raise Refused(
                        f"{o.input_line}: lists {repeated[0]} twice; two sweep jobs would share one run dir "
                        "(give each value once)"
                    )
        if shared:
            keys = list(config.hydra.job.config.override_dirname.exclude_keys) + shared
            config.hydra.overrides.hydra.append(
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(_quote(k) for k in keys)}]"
            )


def _quote(key: str) -> str:
    return "'" + key.replace("\\", "\\\\").replace("'", "\\'") + "'"
