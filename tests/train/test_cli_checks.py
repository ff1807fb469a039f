"""``attnres-train --check-only`` (what launch/torchrun.sh runs before torchrun) and ``--cfg hydra --resolve``.

Both run in this process (sys.argv patched). The bad-input side of ``--check-only`` and the 2-process launcher
are rows of tests/train/test_bad_input_table.py.
"""

import sys

import pytest

from attnres_train.cli.train import main


def _main(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # main() sets it: recorded so that teardown unsets it again
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    monkeypatch.setattr(sys, "argv", ["attnres-train", *argv])
    try:
        main()
    except SystemExit as exc:
        return exc.code
    return 0


def test_check_only_accepts_a_good_run_and_writes_nothing(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "new" / "deeper" / "run"
    code = _main(["--check-only", "model=tiny", f"run_dir={run_dir}"], tmp_path, monkeypatch)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "error" not in out.err
    assert list(tmp_path.iterdir()) == []  # the run_dir it checked (and created to test it) is gone again


def test_check_only_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    code = _main(["--check-only", "model=tiny", "optim.lr=-1", f"run_dir={tmp_path / 'run'}"], tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: optim.lr") and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags", [["--cfg", "hydra", "--resolve"], ["--cfg=hydra", "--resolve"], ["-c", "hydra", "--resolve"]]
)
def test_cfg_hydra_resolve_resolves_run_dir(flags, tmp_path, monkeypatch, capsys):
    """Hydra alone fails here ('Interpolation key run_dir not found'): hydra.run.dir is ${run_dir}."""
    target = tmp_path / "somewhere" / "run"
    code = _main([*flags, f"run_dir={target}", "seed=7"], tmp_path, monkeypatch)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "error" not in out.err.lower(), out.err
    lines = out.out.splitlines()
    run_at = lines.index("run:")  # the hydra node's own keys, at the top level of what is printed
    assert lines[run_at + 1] == f"  dir: {target}"
    assert f"  dir: {target}" in lines[lines.index("sweep:") + 1 :]
    assert "${" not in out.out.split("\nhelp:")[0]  # everything before Hydra's help texts is resolved
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_resolve_is_unchanged(tmp_path, monkeypatch, capsys):
    code = _main(["--cfg", "job", "--resolve", "seed=7", f"run_dir={tmp_path / 'r'}"], tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert code == 0
    assert "seed: 7" in out.splitlines() and "hydra:" not in out
