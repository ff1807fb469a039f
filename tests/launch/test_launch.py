"""Launch scripts and Hydra launcher presets, without a cluster.

* ``bash -n`` on the scripts; ``launch/torchrun.sh --dry-run`` builds the standalone / c10d / static-rank
  torchrun commands and rejects bad options with one ``error:`` line (exit 2);
* ``launch/slurm.sbatch`` with ``DRY_RUN=1`` and faked ``SLURM_*`` variables prints the srun line (one task per
  node) and the torchrun command, with the master address taken from the allocation (via ``scontrol`` when
  present, else parsed from the node list);
* the ``hydra/launcher=slurm`` / ``slurm_1gpu`` presets compose (submitit's SlurmLauncher) and map slurm's
  per-task variables to torch.distributed's;
* (slow) two "nodes" on localhost with static ranks train together through ``launch/torchrun.sh``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests import subproc

REPO = Path(__file__).resolve().parents[2]
TORCHRUN, SBATCH = REPO / "launch" / "torchrun.sh", REPO / "launch" / "slurm.sbatch"


def sh(*args, env=None, **kw):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "NNODES"))}
    full.update(env or {})
    return subprocess.run(
        ["bash", *map(str, args)],
        capture_output=True,
        text=True,
        env=subproc.child_env(full),
        cwd=REPO,
        timeout=60,
        **kw,
    )


@pytest.mark.parametrize("script", [TORCHRUN, SBATCH])
def test_scripts_parse(script):
    assert sh("-n", script).returncode == 0
    assert os.access(script, os.X_OK)


def test_torchrun_commands():
    out = sh(TORCHRUN, "--dry-run", "--nproc", "2", "--", "model=tiny").stdout
    assert "torchrun_main --standalone --nnodes 1 --nproc-per-node 2 -m attnres_train model=tiny" in out
    out = sh(
        TORCHRUN,
        "--dry-run",
        "--nnodes",
        "4",
        "--nproc",
        "8",
        "--rdzv",
        "n0:29400",
        "--job-id",
        "run7",
        "--",
        "model=f3",
    ).stdout
    assert (
        "--nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint n0:29400 --rdzv-id run7 "
        "-m attnres_train model=f3"
    ) in out
    out = sh(
        TORCHRUN,
        "--dry-run",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--nproc",
        "4",
        "--max-restarts",
        "3",
        env={"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"},
    ).stdout
    assert (
        "--nnodes 2 --node-rank 1 --nproc-per-node 4 --master-addr 10.0.0.1 --master-port 1234 --max-restarts 3" in out
    )


@pytest.mark.parametrize(
    "args,text",
    [
        (["--nnodes", "2"], "--rdzv HOST:PORT (or MASTER_ADDR) is required"),
        (["--nproc", "x"], "--nproc must be a non-negative integer"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv", "a:1"], "--node-rank must be in 0..1"),
        (["model=tiny"], "unknown option model=tiny (put Hydra overrides after --)"),
        (["--nproc"], "--nproc needs a value"),
    ],
)
def test_torchrun_bad_options(args, text):
    proc = sh(TORCHRUN, *args)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and text in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_sbatch_dry_run_builds_srun_and_torchrun(tmp_path):
    env = {
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "gpu[03-04,07]",
        "SLURM_NNODES": "3",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(REPO),
        "PATH": "/usr/bin:/bin",
    }
    proc = sh(SBATCH, "model=f3", "run_dir=/shared/x", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "master: gpu03:29742, 3 node(s) x 4 process(es)"
    assert lines[1].startswith("srun --nodes 3 --ntasks-per-node 1 --kill-on-bad-exit=1 ")
    assert lines[1].endswith(
        "torchrun.sh --nnodes 3 --nproc 4 --rdzv gpu03:29742 --job-id 4242 -- model=f3 run_dir=/shared/x "
    )
    assert (
        "attnres_train.cli.torchrun_main --nnodes 3 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint gpu03:29742 "
        "--rdzv-id 4242 -m attnres_train model=f3 run_dir=/shared/x"
    ) in lines[2]
    # with scontrol on PATH its expansion wins (the real cluster path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (fake / "scontrol").chmod(0o755)
    proc = sh(SBATCH, env={**env, "PATH": f"{fake}:/usr/bin:/bin", "MASTER_PORT": "31000", "GPUS_PER_NODE": "2"})
    assert proc.stdout.splitlines()[0] == "master: node-a:31000, 3 node(s) x 2 process(es)"
    proc = sh(SBATCH, env={"DRY_RUN": "1"})
    assert proc.returncode == 2 and "not inside a slurm allocation" in proc.stderr


@pytest.mark.parametrize("preset,tasks,gpus", [("slurm", 8, 8), ("slurm_1gpu", 1, 1), ("slurm_cpu", 1, 0)])
def test_hydra_launcher_presets_compose(preset, tasks, gpus, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from attnres_train.cli.train import CONFIG_DIR
    from attnres_train.config.schema import register_configs

    register_configs()
    for k, v in {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8"}.items():
        monkeypatch.setenv(k, v)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[f"hydra/launcher={preset}", "run_dir=/shared/sweep"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    from hydra.experimental.callback import Callback
    from hydra.utils import get_class

    watcher = cfg.hydra.callbacks.slurm_pending._target_  # reports jobs slurm will never start
    assert issubclass(get_class(watcher), Callback)
    assert launcher.tasks_per_node == tasks and launcher.gpus_per_node == gpus
    assert launcher.submitit_folder == "/shared/sweep/.submitit/%j"
    assert any("MASTER_ADDR=$(scontrol show hostnames" in line for line in launcher.setup)
    assert dict(cfg.hydra.job.env_set) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    assert cfg.hydra.sweep.dir == "/shared/sweep"  # one run dir per job: /shared/sweep/<its swept overrides>


@pytest.mark.slow
def test_two_nodes_on_localhost_with_static_ranks(tmp_path):
    from tests.train.conftest import read_metrics, tiny_overrides, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = tiny_overrides(corpus, run_dir, steps=2)
    env = subproc.child_env(PYTHON=os.environ.get("PYTHON", str(REPO / ".venv" / "bin" / "python")))
    procs = [
        subprocess.Popen(
            [
                "bash",
                str(TORCHRUN),
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--nproc",
                "1",
                "--rdzv",
                f"127.0.0.1:{port}",
                "--",
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    logs = [
        subproc.save_output(tmp_path / "logs", f"node{r}", p.args, *o, p.returncode)
        for r, (p, o) in enumerate(zip(procs, outs))
    ]
    assert all(p.returncode == 0 for p in procs), f"exit statuses {[p.returncode for p in procs]}; output in {logs}"
    assert len(read_metrics(run_dir)) == 2
    assert "2 rank(s) on cpu: dp_replicate=1 dp_shard=2" in outs[0][0]  # one process group over both "nodes"
