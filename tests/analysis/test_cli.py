"""attnres-compare on synthetic runs with a known power law, and one-line errors (exit 2) on bad input."""

import csv

import pytest

from attnres_train.analysis.fit import PowerLaw, compute_advantage, pflops_days
from attnres_train.analysis.runs import training_flops
from attnres_train.cli import analyze, compare

from .helpers import make_config, train_records, write_run

LAWS = {"baseline": (2.0, 0.05), "block N=2": (1.95, 0.052)}
WIDTHS = (64, 128, 256)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def scaling_runs(tmp_path_factory):
    """3 sizes x 2 variants whose final validation loss follows LAWS exactly in PFLOP/s-days."""
    root = tmp_path_factory.mktemp("scaling")
    k = 0
    for width in WIDTHS:
        for variant, (A, alpha) in LAWS.items():
            mode, nb = ("prenorm", None) if variant == "baseline" else ("block", 2)
            cfg = make_config(mode, nb, hidden_size=width)
            steps, tpb = 100 * width, 4 * 64
            c = pflops_days(training_flops(_plain(cfg), steps * tpb))  # what the run's compute will be
            loss = A * c**-alpha
            write_run(root / str(k), cfg, train_records([steps // 2, steps], [loss + 0.5, loss + 0.01], tpb, val=loss))
            k += 1
    return root


def _plain(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def test_compare_recovers_the_laws_and_the_advantage(scaling_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main([str(scaling_runs), "--out", str(out), "--budget", "1e-6"]) == 0
    printed = capsys.readouterr().out
    assert "| variant | A | α |" in printed
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["run"].rsplit("/", 1)[1] for r in rows} == {str(i) for i in range(6)}
    assert [r["variant"] for r in rows] == ["baseline", "block N=2"] * 3
    assert all(r["loss_source"] == "val" for r in rows)
    assert all(r["compared_tokens"] == r["tokens"] for r in rows)  # same length per size: read at the end
    assert [float(r["delta_vs_reference"]) for r in rows[::2]] == [0.0, 0.0, 0.0]
    with open(out / "fits.csv") as f:
        fits = {r["variant"]: r for r in csv.DictReader(f)}
    for variant, (A, alpha) in LAWS.items():
        assert float(fits[variant]["A"]) == pytest.approx(A, rel=1e-6)
        assert float(fits[variant]["alpha"]) == pytest.approx(alpha, rel=1e-6)
        assert int(fits[variant]["points"]) == 3
    expected = compute_advantage(PowerLaw(*LAWS["baseline"]), PowerLaw(*LAWS["block N=2"]), 1e-6)
    assert float(fits["block N=2"]["compute_advantage"]) == pytest.approx(expected, rel=1e-6)
    assert float(fits["baseline"]["compute_advantage"]) == pytest.approx(1.0)
    for name in ("scaling_fits.png", "loss_bars.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "comparison.md").read_text().count("\n| ") >= 6 + 2


def test_compare_default_out_is_inside_the_sweep(scaling_runs, capsys):
    assert compare.main([str(scaling_runs)]) == 0
    assert (scaling_runs / "compare" / "comparison.csv").is_file()
    capsys.readouterr()


def test_analyze_metrics_only_needs_no_checkpoint(scaling_runs, tmp_path, capsys):
    out = tmp_path / "a"
    assert analyze.main([str(scaling_runs / "1"), "--metrics-only", "--out", str(out)]) == 0
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert (out / "expert_load.png").stat().st_size > 1000
    assert (out / "summary.json").is_file()
    capsys.readouterr()


@pytest.mark.parametrize("tool", [analyze, compare])
def test_missing_run_dir_is_one_error_line(tool, tmp_path, capsys):
    assert tool.main([str(tmp_path / "nope")]) == 2
    assert "nope" in _error_line(capsys)


@pytest.mark.parametrize("tool", [analyze, compare])
def test_directory_without_runs_is_one_error_line(tool, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert tool.main([str(tmp_path / "empty")]) == 2
    assert "neither a run directory" in _error_line(capsys)


def test_analyze_run_without_checkpoint_is_one_error_line(scaling_runs, tmp_path, capsys):
    assert analyze.main([str(scaling_runs / "0"), "--out", str(tmp_path / "x")]) == 2
    assert "no complete checkpoint" in _error_line(capsys)
    assert not (tmp_path / "x").exists()  # nothing written before the input was checked


def test_bad_flags_are_one_error_line(scaling_runs, capsys):
    assert compare.main([str(scaling_runs), "--budget", "-1"]) == 2
    assert "--budget" in _error_line(capsys)
    assert compare.main([str(scaling_runs), "--variant", "block N=3"]) == 2
    assert "block N=3" in _error_line(capsys)
    assert analyze.main([str(scaling_runs), "--out", "x"]) == 2
    assert "exactly one run" in _error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        analyze.main(["--batch-size"])
    assert exc.value.code == 2
    _error_line(capsys)
