"""attnres-compare is fair or refuses (issue 14 item 5): matched tokens, seeds, paired deltas, no 2-point fits.

Every run directory here is synthetic: a real config.yaml and a metrics.jsonl written by the test with chosen
losses, so each expected number is computed by hand in the test (own mean / SD / pairing), not by the tool.
"""

import csv
import json
import math

import pytest

from attnres_train.cli import compare

from .helpers import make_config, write_run

TOKENS_PER_STEP = 8 * 64  # trainer.global_batch_size (default 8) × data.seq_len (64 in make_config)


def run_dir(path, variant="baseline", seed=0, steps=10, val=None, train=None, hidden_size=128, log_every=1):
    """A run of ``steps`` steps; ``val``/``train``: {step: loss} (train defaults to 5.0 at every logged step)."""
    mode, nb = {"baseline": ("prenorm", None), "block": ("block", 2), "full": ("full", None)}[variant]
    cfg = make_config(mode, nb, hidden_size=hidden_size)
    cfg.seed = seed
    train = train if train is not None else {s: 5.0 for s in range(log_every, steps + 1, log_every)}
    records = [
        {"kind": "train", "step": s, "loss": v, "tokens_seen": s * TOKENS_PER_STEP} for s, v in sorted(train.items())
    ]
    records += [{"kind": "val", "step": s, "val_loss": v} for s, v in sorted((val or {}).items())]
    return write_run(path, cfg, records)


def rows_of(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_runs_of_different_lengths_are_compared_at_the_shorter_ones_last_common_validation(tmp_path, capsys):
    # The case: a 22-step block run against a 3-step baseline. The block run's step-22 loss (much lower,
    # it trained 7x longer) must not be compared with the baseline's step-3 loss.
    run_dir(tmp_path / "sweep" / "0", "baseline", steps=3, val={3: 4.00})
    run_dir(tmp_path / "sweep" / "1", "block", steps=22, val={3: 3.90, 10: 3.5, 22: 3.00})
    out = tmp_path / "cmp"
    assert compare.main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    md = capsys.readouterr().out
    rows = rows_of(out / "comparison.csv")
    assert [r["variant"] for r in rows] == ["baseline", "block N=2"]
    assert [int(r["compared_tokens"]) for r in rows] == [3 * TOKENS_PER_STEP] * 2
    assert [int(r["tokens"]) for r in rows] == [3 * TOKENS_PER_STEP, 22 * TOKENS_PER_STEP]
    assert [float(r["loss"]) for r in rows] == [4.00, 3.90]
    assert float(rows[1]["delta_vs_reference"]) == pytest.approx(3.90 - 4.00)
    assert "trained further" in md and str(tmp_path / "sweep" / "1") in md


def test_the_latest_validation_every_run_has_is_used(tmp_path, capsys):
    # Baseline validated at steps 4 and 8 (trained 10); block at 4, 6, 8, 12. Common and reached: 4, 8 -> 8.
    run_dir(tmp_path / "a", "baseline", steps=10, val={4: 4.4, 8: 4.2, 10: 4.1})
    run_dir(tmp_path / "b", "block", steps=12, val={4: 4.3, 6: 4.25, 8: 4.1, 12: 3.9})
    out = tmp_path / "cmp"
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    capsys.readouterr()
    rows = rows_of(out / "comparison.csv")
    assert {int(r["compared_tokens"]) for r in rows} == {8 * TOKENS_PER_STEP}
    assert [float(r["loss"]) for r in rows] == [4.2, 4.1]


def test_no_common_validation_point_is_refused_naming_the_runs(tmp_path, capsys):
    a = run_dir(tmp_path / "a", "baseline", steps=3, val={3: 4.0})
    b = run_dir(tmp_path / "b", "block", steps=22, val={22: 3.0})
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = error_line(capsys)
    assert "no token count at which every run logged a validation loss" in err
    assert str(a) in err and str(b) in err
    assert not (tmp_path / "cmp").exists()  # nothing written before the input was checked


def test_runs_without_validation_are_refused_and_train_loss_is_opt_in_and_flagged(tmp_path, capsys):
    # Train losses: one noisy batch at the end (2.0) after a plateau at 5.0 / 4.0.
    train_a = {s: 5.0 for s in range(1, 21)}
    train_a[20] = 2.0
    train_b = {s: 4.0 for s in range(1, 21)}
    a = run_dir(tmp_path / "s" / "0", "baseline", steps=20, train=train_a)
    run_dir(tmp_path / "s" / "1", "full", steps=20, train=train_b, val={20: 3.9})
    assert compare.main([str(tmp_path / "s"), "--out", str(tmp_path / "x")]) == 2
    err = error_line(capsys)
    assert str(a) in err and "no validation loss" in err and "--loss train" in err
    out = tmp_path / "cmp"
    assert compare.main([str(tmp_path / "s"), "--out", str(out), "--loss", "train", "--train-window", "0.2"]) == 0
    md = capsys.readouterr().out
    assert "**training** losses (not held out)" in md and "(train, 4 batches)" in md
    rows = rows_of(out / "comparison.csv")
    assert [r["loss_source"] for r in rows] == ["train", "train"] and [r["loss_batches"] for r in rows] == ["4", "4"]
    # window (16, 20] steps: the mean of 5, 5, 5, 2 — not the last batch alone
    assert float(rows[0]["loss"]) == pytest.approx((5.0 * 3 + 2.0) / 4)
    assert float(rows[1]["loss"]) == pytest.approx(4.0)


SEED_EFFECT = {0: 0.0, 1: 0.10, 2: 0.25}  # large seed-to-seed variation shared by both variants
BLOCK_GAIN = {0: -0.020, 1: -0.030, 2: -0.025}  # the block run is this much better than the same seed's baseline


def _mean(xs):
    return sum(xs) / len(xs)


def _sd(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_seeds_are_aggregated_and_deltas_are_paired_by_seed(tmp_path, capsys):
    k = 0
    for seed, shift in SEED_EFFECT.items():
        run_dir(tmp_path / "s" / str(k), "baseline", seed=seed, val={10: 4.0 + shift})
        run_dir(tmp_path / "s" / str(k + 1), "block", seed=seed, val={10: 4.0 + shift + BLOCK_GAIN[seed]})
        k += 2
    out = tmp_path / "cmp"
    assert compare.main([str(tmp_path / "s"), "--out", str(out)]) == 0
    md = capsys.readouterr().out
    agg = {r["variant"]: r for r in rows_of(out / "aggregate.csv")}
    base = [4.0 + s for s in SEED_EFFECT.values()]
    block = [4.0 + s + BLOCK_GAIN[k] for k, s in SEED_EFFECT.items()]
    assert agg["baseline"]["seeds"] == "0 1 2" and agg["baseline"]["n"] == "3"
    assert float(agg["baseline"]["loss_mean"]) == pytest.approx(_mean(base), abs=1e-12)
    assert float(agg["baseline"]["loss_sd"]) == pytest.approx(_sd(base), abs=1e-12)
    assert float(agg["block N=2"]["loss_sd"]) == pytest.approx(_sd(block), abs=1e-12)
    gains = list(BLOCK_GAIN.values())
    assert float(agg["block N=2"]["delta_mean"]) == pytest.approx(_mean(gains), abs=1e-12)
    # paired: the spread of the per-seed gains (0.005), not of the losses (~0.12)
    assert float(agg["block N=2"]["delta_sd"]) == pytest.approx(_sd(gains), abs=1e-12)
    assert _sd(gains) < _sd(base) / 10
    assert agg["block N=2"]["pairs"] == "3" and float(agg["baseline"]["delta_mean"]) == 0.0
    assert f"{_mean(gains):+.4f} ± {_sd(gains):.4f}" in md
    labels = [r["label"] for r in rows_of(out / "comparison.csv")]
    assert len(set(labels)) == 6 and all(f"seed {s}" in lab for s, lab in zip([0, 0, 1, 1, 2, 2], labels))
    assert (out / "loss_bars.png").stat().st_size > 1000 and (out / "loss_curves.png").stat().st_size > 1000


def test_unpaired_seed_gets_no_delta_and_a_note(tmp_path, capsys):
    run_dir(tmp_path / "s" / "0", "baseline", seed=0, val={10: 4.0})
    run_dir(tmp_path / "s" / "1", "block", seed=0, val={10: 3.9})
    run_dir(tmp_path / "s" / "2", "block", seed=1, val={10: 3.8})
    out = tmp_path / "cmp"
    assert compare.main([str(tmp_path / "s"), "--out", str(out)]) == 0
    md = capsys.readouterr().out
    rows = rows_of(out / "comparison.csv")
    assert [(r["variant"], r["seed"]) for r in rows] == [("baseline", "0"), ("block N=2", "0"), ("block N=2", "1")]
    assert float(rows[1]["delta_vs_reference"]) == pytest.approx(-0.1) and rows[2]["delta_vs_reference"] == ""
    assert "no baseline run with the same size and seed" in md and "seed 1" in md


def test_the_same_variant_size_and_seed_twice_is_refused(tmp_path, capsys):
    a = run_dir(tmp_path / "a", "block", seed=3, val={10: 3.9})
    b = run_dir(tmp_path / "b", "block", seed=3, val={10: 3.8})
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = error_line(capsys)
    assert str(a) in err and str(b) in err and "seed" in err


def test_two_sizes_are_not_fitted(tmp_path, capsys):
    k = 0
    for width in (64, 128):
        for variant in ("baseline", "full"):
            run_dir(tmp_path / "s" / str(k), variant, hidden_size=width, val={10: 4.0 - width / 1000})
            k += 1
    out = tmp_path / "cmp"
    assert compare.main([str(tmp_path / "s"), "--out", str(out)]) == 0
    md = capsys.readouterr().out
    fits = {r["variant"]: r for r in rows_of(out / "fits.csv")}
    assert fits["baseline"]["A"] == "" and fits["full"]["A"] == "" and fits["full"]["compute_advantage"] == ""
    assert "Nothing fitted" in md and "not fitted: a power-law fit needs at least 3" in md and "R² = 1" in md
    assert "| variant | A | α |" not in md


def test_summary_rows_are_plain_json_numbers(tmp_path, capsys):
    """comparison.csv's numbers parse back (no 'None' strings), so a notebook can read them."""
    run_dir(tmp_path / "s" / "0", "baseline", val={10: 4.0})
    out = tmp_path / "cmp"
    assert compare.main([str(tmp_path / "s"), "--out", str(out)]) == 0
    capsys.readouterr()
    row = rows_of(out / "comparison.csv")[0]
    assert "None" not in json.dumps(row)
    assert float(row["compared_flops"]) > 0 and float(row["pflops_days"]) > 0


def test_runs_that_differ_in_more_than_the_variant_are_flagged(tmp_path, capsys):
    run_dir(tmp_path / "s" / "0", "baseline", val={10: 4.0})
    b = run_dir(tmp_path / "s" / "1", "block", val={10: 3.9})
    text = (b / "config.yaml").read_text()
    (b / "config.yaml").write_text(text.replace("\n  lr: ", "\n  lr: 0.5  # was ", 1))
    assert compare.main([str(tmp_path / "s"), "--out", str(tmp_path / "cmp")]) == 0
    md = capsys.readouterr().out
    assert "differ in more than the residual variant and the seed (optim.lr)" in md
