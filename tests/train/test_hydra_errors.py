"""Hydra-level bad input (unknown keys, wrong types, unknown group options, override syntax, run_dir): one line.

The CLI entry point runs in this process (sys.argv patched), so each case costs a config composition, not a
Python start-up. Every case: exit code 2, exactly one line starting ``error:`` that names the key or option,
no traceback, and nothing created or changed on disk (a hash of the whole temporary tree before and after;
the current directory is inside it, so ``run_dir=`` writing into it would show).
"""

import hashlib
import os
import sys
from pathlib import Path

import pytest

from attnres_train.cli.train import main

# (overrides, words the error line must contain). "@run" is the (existing) run directory of the case.
CASES = {
    "unknown_key": (["trainer.foo=1"], ["trainer.foo", "max_steps"]),
    "unknown_top_level_key": (["foo=1"], ["foo", "run_dir"]),
    "unknown_nested_key_suggests": (["model.moe.topk=2"], ["model.moe.topk", "did you mean top_k"]),
    "plus_adds_unknown_key": (["+trainer.foo=1"], ["trainer.foo", "unknown key"]),
    "plus_adds_unknown_top_level_key": (["+bar=2"], ["bar", "unknown key"]),
    "plus_adds_unknown_nested_key": (["+model.moe.topk=2"], ["model.moe.topk", "top_k"]),
    "plus_on_existing_key": (["+trainer.max_steps=3"], ["trainer.max_steps"]),
    "wrong_type_int": (["trainer.max_steps=abc"], ["trainer.max_steps", "int"]),
    "wrong_type_bool": (["trainer.compile=maybe"], ["trainer.compile", "bool"]),
    "wrong_type_float": (["optim.lr=fast"], ["optim.lr", "float"]),
    "unknown_model_option": (["model=nope"], ["model=nope", "tiny"]),
    "unknown_experiment_option": (["experiment=nope"], ["experiment=nope", "block_sweep"]),
    "override_syntax": (["trainer.max_steps=[1,"], ["trainer.max_steps=[1,", "override_grammar"]),
    "sweep_without_multirun": (["trainer.max_steps=1,2"], ["trainer.max_steps=1,2", "--multirun"]),
    "bad_value_before_any_write": (["trainer.max_steps=0"], ["trainer.max_steps", "positive"]),
    "empty_run_dir": (["run_dir="], ["run_dir", "empty"]),
    "run_dir_below_a_file": (["run_dir=@file/run"], ["run_dir", "not a directory"]),
}


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _invoke(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # main() sets it: setenv first records the original, so teardown restores it (a bare delenv of an unset
    # variable records nothing, and HYDRA_FULL_ERROR=1 leaked into later tests and their subprocesses)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["attnres-train", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def _check(code, out, err, needles):
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert len(err.strip().splitlines()) == 1, err  # nothing else on stderr (no Hydra report, no warning)
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_hydra_level_error(case, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("existing file")
    (tmp_path / "file").write_text("a file, not a directory")
    overrides, needles = CASES[case]
    overrides = [o.replace("@file", str(tmp_path / "file")) for o in overrides]
    argv = ["model=tiny", f"run_dir={run}", *overrides]
    before = _snapshot(tmp_path)
    code, out, err = _invoke(argv, tmp_path, monkeypatch, capsys)
    _check(code, out, err, needles)
    assert _snapshot(tmp_path) == before


def test_new_run_dir_is_not_created_on_bad_input(tmp_path, monkeypatch, capsys):
    code, out, err = _invoke(
        ["model=tiny", f"run_dir={tmp_path / 'new' / 'run'}", "optim.lr=-1"], tmp_path, monkeypatch, capsys
    )
    _check(code, out, err, ["optim.lr"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_run_dir_on_a_pseudo_filesystem(tmp_path, monkeypatch, capsys):
    code, out, err = _invoke(["model=tiny", "run_dir=/proc/attnres_run"], tmp_path, monkeypatch, capsys)
    _check(code, out, err, ["run_dir", "/proc/attnres_run"])
    assert not Path("/proc/attnres_run").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_run_dir_without_permission(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, out, err = _invoke(["model=tiny", f"run_dir={locked / 'run'}"], tmp_path, monkeypatch, capsys)
        _check(code, out, err, ["run_dir", str(locked / "run")])
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_user_asking_for_the_trace_gets_it(tmp_path, monkeypatch, capsys):
    """HYDRA_FULL_ERROR=1 set by the user keeps Hydra's behaviour: the exception itself, for debugging."""
    from hydra.errors import ConfigCompositionException

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["attnres-train", "trainer.foo=1", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigCompositionException):
        main()


def test_plus_key_refused_by_the_typed_config_too():
    """The compose API (attnres_train.cli.train.run, notebooks) keeps Hydra's struct node with the extra key."""
    from hydra import compose, initialize_config_dir

    from attnres_train.cli.train import CONFIG_DIR
    from attnres_train.config.errors import ConfigError
    from attnres_train.config.schema import as_config, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        dcfg = compose(config_name="config", overrides=["+trainer.foo=1", "+model.moe.topk=2"])
    with pytest.raises(ConfigError) as info:
        as_config(dcfg)
    assert info.value.field in ("trainer.foo", "model.moe.topk")
    assert "unknown key" in info.value.message


def test_run_dir_check_is_safe_for_ranks_starting_together(tmp_path):
    """Every rank of a torchrun job runs the check on the same new run_dir at the same moment."""
    import threading

    from attnres_train.train.run_dir import check_run_dir

    errors = []
    for trial in range(20):
        start = threading.Barrier(8)

        def rank(target=tmp_path / f"t{trial}" / "a" / "run", start=start):
            start.wait()
            try:
                check_run_dir(target)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=rank) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert list((tmp_path / f"t{trial}" / "a" / "run").iterdir()) == []  # no probe files left
    assert errors == []


def test_compose_api_raises_the_same_one_line_error(tmp_path):
    from attnres_train.cli.train import run
    from attnres_train.config.errors import UserInputError

    with pytest.raises(UserInputError, match=r"^model=nope: no such option in group 'model'.*tiny"):
        run(["model=nope", f"run_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()
