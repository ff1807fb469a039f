"""A wheel of the package, installed into a fresh venv, trains from another directory (issue 15 item 9).

Why: the Hydra configs sit at the repository root; only the package namespace travels in a wheel, so a
non-editable install used to find no configs. The wheel is built from a copy of the sources (the checkout is
not touched), installed with ``--no-deps --no-index`` into a new venv that sees this interpreter's
site-packages through a ``.pth`` (no network), and every command runs in a temporary directory without
PYTHONPATH: the package must come from the venv, not from the checkout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import site
import sys
import sysconfig
from pathlib import Path

import pytest

from tests import subproc

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "attnres_train", "kernels", "configs")


def _dependency_dirs() -> list:
    """This interpreter's site-packages (torch, hydra, ...). Named in a ``.pth`` they join sys.path, but their own
    ``.pth`` files (the editable install's finder, which maps attnres_train to the checkout) are not run."""
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    return sorted(d for d in dirs if os.path.isdir(d))


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    logs = root / "logs"
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", "."]
    subproc.check(subproc.run(build, logs, "pip-wheel", cwd=src, timeout=300), what="building the wheel")
    (wheel,) = (src / "dist").glob("attnres_train-*.whl")

    env_dir = root / "venv"
    subproc.check(subproc.run([sys.executable, "-m", "venv", "--without-pip", env_dir], logs, "venv", timeout=120))
    py = env_dir / "bin" / "python"
    purelib = subproc.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], logs, "purelib")
    (Path(purelib.stdout.strip()) / "_attnres_deps.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    install = [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel]
    subproc.check(subproc.run(install, logs, "pip-install", timeout=300), what="installing the wheel")
    return env_dir


def _run(venv: Path, cwd: Path, name: str, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subproc.run(args, cwd.parent / "logs", name, cwd=cwd, env=env, timeout=600)


def test_installed_package_comes_from_the_venv_with_its_configs(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import attnres_train, json; from attnres_train.config import paths; "
        "print(json.dumps([attnres_train.__file__, str(paths.CONFIG_DIR)]))"
    )
    proc = subproc.check(_run(venv, work, "where", venv / "bin" / "python", "-c", code))
    pkg_file, config_dir = map(Path, json.loads(proc.stdout))
    assert pkg_file.is_relative_to(venv) and not pkg_file.is_relative_to(REPO), pkg_file
    assert config_dir.is_relative_to(venv) and config_dir.name == "_configs", config_dir
    shipped = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))
    assert sorted(str(p.relative_to(config_dir)) for p in config_dir.rglob("*.yaml")) == shipped


def test_wheel_trains_from_another_directory(venv, tmp_path):
    work = tmp_path / "work"
    (work / "corpus").mkdir(parents=True)
    for i in range(30):
        (work / "corpus" / f"doc{i}.txt").write_text(f"def alpha_{i}(x):\n    return x + beta * gamma\n" * 4)
    overrides = [
        "model=tiny",
        "trainer.max_steps=3",
        "data.sources=[{path: corpus, kind: text}]",
        "data.seq_len=64",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=2",
        "trainer.log_every=1",
        "trainer.val_every=0",
        "trainer.sample_every=0",
        "trainer.depth_stats_every=0",
        "trainer.peak_flops=1e11",
        "optim.warmup_steps=1",
        "run_dir=run",  # relative: the run lands in the caller's directory
    ]
    proc = subproc.check(_run(venv, work, "attnres-train", "attnres-train", *overrides), what="attnres-train")
    run = work / "run"
    assert (run / "checkpoints" / "step_00000003").is_dir(), sorted(p.name for p in run.iterdir())
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), recs
    assert f"[step 3/3] loss {losses[-1]:.4f}" in (run / "train.log").read_text(), proc.log
    assert not (REPO / "run").exists()


def test_installed_cli_tools_find_the_presets(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    presets = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
    helped = subproc.check(_run(venv, work, "help", "attnres-train", "--help")).stdout
    assert f"model={'|'.join(presets)} " in helped, helped[:2000]
    planned = subproc.check(_run(venv, work, "plan", "attnres-plan", "--model", "f3", "--world-size", "8")).stdout
    assert planned.startswith("model f3: "), planned[:500]
    (work / "corpus").mkdir()
    (work / "corpus" / "a.txt").write_text("hello tokens\n" * 20)
    prepared = _run(venv, work, "prepare", "attnres-prepare", "corpus", "--out", "shards", "--no-progress")
    assert "wrote " in subproc.check(prepared).stdout and any((work / "shards").iterdir())
