"""Sweep run dirs are named after each job's swept overrides (not 0, 1, ...), filesystem-safe and distinct; a
sweep that lists a value twice is refused before anything is written; the analysis tools find the named dirs."""

import pytest

from attnres_train.analysis.runs import find_runs
from attnres_train.cli.sweep_dirs import MAX_NAME_BYTES, sweep_dirname
from tests import subproc

from .conftest import PY, REPO, tiny_overrides


def sweep_args(corpus, sweep, *extra):
    args = tiny_overrides(corpus, sweep, steps=1, **{"optim.warmup_steps": 0, "trainer.val_every": 0})
    return [PY, "-m", "attnres_train", "-m", *extra, *args]


def test_two_job_sweep_writes_dirs_named_after_the_swept_override(corpus, tmp_path):
    sweep = tmp_path / "sweep"
    p = subproc.run(sweep_args(corpus, sweep, "seed=3,7"), tmp_path, "sweep", cwd=REPO)
    subproc.check(p)
    names = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    assert names == ["seed=3", "seed=7"]  # shared overrides (model, data, trainer.*, run_dir) left out
    for name in names:
        assert f"seed: {name[5:]}\n" in (sweep / name / "config.yaml").read_text()
        assert (sweep / name / "metrics.jsonl").is_file()
    assert [r.name for r in find_runs([sweep])] == names  # attnres-analyze / attnres-compare read them


def test_runs_of_a_sweep_dir_are_read_in_natural_order(tmp_path):
    names = ["k=10", "k=2", "0", "k=2,seed=1", "10", "2"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("seed: 0\n")
    assert [r.name for r in find_runs([tmp_path])] == ["0", "2", "10", "k=2", "k=2,seed=1", "k=10"]


def test_a_sweep_listing_a_value_twice_is_refused_before_any_dir(corpus, tmp_path):
    sweep = tmp_path / "sweep"
    p = subproc.run(sweep_args(corpus, sweep, "seed=3,3"), tmp_path, "dup", cwd=REPO)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "seed=3,3" in errors[0], p.stderr
    assert "Traceback" not in p.stderr and not sweep.exists()


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("seed=3", "seed=3"),
        ("+experiment/size=f2,model.residual={mode:full}", "+experiment%2Fsize=f2,model.residual={mode:full}"),
        ("data.path=a%2Fb", "data.path=a%252Fb"),  # '%' itself encoded: no two raw names meet
        ("x=a\tb\\c", "x=a%09b%5Cc"),
        ("", "4"),  # nothing swept (a one-job -m run): the job number
    ],
)
def test_names_are_single_path_components(raw, expected):
    assert sweep_dirname(raw, 4) == expected


def test_long_names_are_cut_below_the_limit_and_stay_distinct():
    a, b = "k=" + "v" * 400 + "1", "k=" + "v" * 400 + "2"
    na, nb = sweep_dirname(a, 0), sweep_dirname(b, 1)
    assert na != nb and na.startswith("k=vvv")
    assert max(len(na.encode()), len(nb.encode())) <= MAX_NAME_BYTES < 255
