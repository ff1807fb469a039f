"""``attnres-compare RUN_DIR...``: validation loss per run at matched tokens, seeds aggregated with deltas paired
by seed, power-law fits per variant over ≥ 3 sizes, and the compute advantage of each variant over a reference.

    attnres-compare runs/block_sweep                           # -> runs/block_sweep/compare/
    attnres-compare runs/scaling --reference baseline --budget 5.6

Why it refuses rather than guesses: a loss difference means something only between runs read at the same
point of training on held-out data (:mod:`attnres_train.analysis.matching`). Options, refusals and the files
written: docs/analysis.md. Bad input prints one ``error: ...`` line and exits 2 before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..analysis.fit import compute_advantage, fit_power_law, pflops_days
from ..analysis.matching import aggregate, loss_curve, match, pair_deltas, size_key, size_name
from ..analysis.runs import find_runs, load_run, summarize, variant_order
from ..config.errors import ConfigError, UserInputError
from .arg_parser import ErrorLineParser

RUN_COLUMNS = (
    "run",
    "label",
    "variant",
    "model",
    "num_layers",
    "hidden_size",
    "active_params",
    "seed",
    "steps",
    "tokens",
    "compared_tokens",
    "compared_flops",
    "pflops_days",
    "loss",
    "loss_source",
    "loss_batches",
    "delta_vs_reference",
)
AGG_COLUMNS = (
    "model",
    "num_layers",
    "hidden_size",
    "variant",
    "compared_tokens",
    "seeds",
    "n",
    "loss_mean",
    "loss_sd",
    "delta_mean",
    "delta_sd",
    "pairs",
)
FIT_COLUMNS = (
    "variant",
    "A",
    "alpha",
    "r2",
    "points",
    "budget_pflops_days",
    "loss_at_budget",
    "reference",
    "compute_advantage",
)


def build_parser() -> argparse.ArgumentParser:
    p = ErrorLineParser(prog="attnres-compare", description="Compare runs at matched tokens: loss table, seeds, fits.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or sweep directories of runs")
    p.add_argument(
        "--out", default=None, help="output directory (default: SWEEP_DIR/compare, or the runs' common parent/compare)"
    )
    p.add_argument(
        "--reference",
        default="baseline",
        help="variant deltas and the advantage are measured against (default baseline)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        help="variant(s) to report an advantage for (default: every fitted variant); repeatable",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="compute budget in PFLOP/s-days for the advantage (default: the largest compared compute)",
    )
    p.add_argument(
        "--loss",
        choices=("val", "train"),
        default="val",
        help="val (default): validation loss, refused for runs that never validated; train: training "
        "loss averaged over the last --train-window of tokens, flagged as not held out",
    )
    p.add_argument(
        "--train-window",
        type=float,
        default=0.1,
        help="with --loss train: fraction of the matched tokens whose logged train losses are averaged",
    )
    return p


def default_out(args_runs: List[str], runs: List[Path]) -> Path:
    if len(args_runs) == 1 and not (Path(args_runs[0]) / "config.yaml").is_file():
        return Path(args_runs[0]) / "compare"
    parents = [str(p.resolve().parent) for p in runs]
    return Path(os.path.commonpath(parents)) / "compare"


def fit_variants(aggs, reference: str, budget: Optional[float], variants: Optional[List[str]]):
    """Per variant: a fit over its sizes' seed means (or why there is none) and the advantage at ``budget``."""
    points: Dict[str, list] = {}
    for a in aggs:
        flops = statistics.fmean(a.flops)
        if math.isfinite(a.mean) and a.mean > 0 and flops > 0:
            points.setdefault(a.variant, []).append((pflops_days(flops), a.mean))
    fits, notes = {}, {}
    for v, pts in points.items():
        try:
            fits[v] = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        except ValueError as exc:
            notes[v] = f"not fitted: {exc}"
    if budget is None:
        budget = max((p[0] for pts in points.values() for p in pts), default=None)
    rows = []
    ref = fits.get(reference)
    for v in sorted(set(points) | set(notes), key=_order):
        law = fits.get(v)
        row = {
            "variant": v,
            "A": "",
            "alpha": "",
            "r2": "",
            "points": len(points.get(v, [])),
            "budget_pflops_days": budget if budget else "",
            "loss_at_budget": "",
            "reference": reference,
            "compute_advantage": "",
        }
        if law is not None:
            row.update(A=law.A, alpha=law.alpha, r2=law.r2)
            if budget:
                row["loss_at_budget"] = float(law.loss(budget))
            if ref is not None and budget and (variants is None or v in variants or v == reference):
                try:
                    row["compute_advantage"] = compute_advantage(ref, law, budget)
                except ValueError as exc:
                    notes[v] = str(exc)
        rows.append(row)
    return points, fits, rows, notes, budget


def _order(label: str):
    return variant_order(label)


def _fmt(v, kind: str = "g") -> str:
    if v == "" or v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if kind == "loss":
        return f"{v:.4f}"
    if kind == "delta":
        return f"{v:+.4f}"
    if kind == "int":
        return f"{int(v):,}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pm(mean, sd, kind="loss") -> str:
    return _fmt(mean, kind) + ("" if sd is None else f" ± {sd:.4f}")


def markdown(rows, aggs, matched, fit_rows, notes, reference: str, budget, source: str, window: float) -> str:
    if source == "val":
        basis = (
            "Losses are **validation** losses, read per model size at the matched token count: the largest "
            "one at which every run of that size logged a validation loss."
        )
    else:
        basis = (
            f"⚠ Losses are **training** losses (not held out): per model size, the mean of the train batches "
            f"logged in the last {window:.0%} of tokens before the matched count (the shortest run's length)."
        )
    lines = ["# Run comparison", "", basis, "", "| model size | compared at (tokens) | runs |", "| --- | ---: | ---: |"]
    for key, tokens in matched.items():
        lines.append(f"| {size_name(key)} | {tokens:,} | {sum(1 for r in rows if _key(r) == key)} |")
    lines += [
        "",
        "## Runs",
        "",
        f"| run | variant | model | layers | d | seed | active params | trained tokens | compared at | PF-days | "
        f"loss | Δ vs {reference} (same seed) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        s = r.summary
        loss = _fmt(r.loss, "loss") + ("" if source == "val" else f" (train, {r.batches} batches)")
        lines.append(
            f"| {s.run} | {s.variant} | {s.model} | {s.num_layers} | {s.hidden_size} | {s.seed} | "
            f"{_fmt(s.active_params, 'int')} | {_fmt(s.tokens, 'int')} | {_fmt(r.tokens, 'int')} | "
            f"{r.pflops_days:.3g} | {loss} | {_fmt(r.delta, 'delta')} |"
        )
    lines += [
        "",
        "## Per variant (seeds aggregated)",
        "",
        f"| model size | variant | seeds | loss (mean ± SD) | Δ vs {reference} (paired by seed, mean ± SD) | pairs |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for a in aggs:
        delta = "(reference)" if a.variant == reference else _pm(a.delta_mean, a.delta_sd, "delta") if a.deltas else "—"
        lines.append(
            f"| {size_name(a.size)} | {a.variant} | {', '.join(map(str, a.seeds))} | {_pm(a.mean, a.sd)} | "
            f"{delta} | {len(a.deltas)} |"
        )
    lines += [
        "",
        "SD = sample standard deviation over seeds (— with one seed). Δ = a run's loss minus the "
        f"{reference} run's of the same size and seed; its mean ± SD is over those pairs. PF-days = "
        "PFLOP/s-days of training up to the compared tokens; active params exclude embeddings.",
        "",
        "## Power-law fits L = A·C^(−α) (C in PFLOP/s-days, one point per size: the seed mean)",
        "",
    ]
    fitted = [r for r in fit_rows if r["A"] != ""]
    if fitted:
        lines += [
            f"Compute advantage over `{reference}` at {_fmt(budget)} PF-days.",
            "",
            "| variant | A | α | R² (log) | sizes | loss at budget | compute advantage |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in fitted:
            adv = "—" if r["compute_advantage"] == "" else f"{r['compute_advantage']:.3f}×"
            lines.append(
                f"| {r['variant']} | {_fmt(r['A'])} | {_fmt(r['alpha'])} | {_fmt(r['r2'])} | {r['points']} | "
                f"{_fmt(r['loss_at_budget'], 'loss')} | {adv} |"
            )
        lines += [
            "",
            "compute advantage = compute the reference needs to reach the variant's fitted loss at the "
            "budget, divided by the budget (> 1: the variant is ahead).",
        ]
    else:
        lines.append(
            "Nothing fitted: a fit needs runs at 3 or more model sizes (a block sweep trains one size; "
            "`experiment=scaling` trains three)."
        )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _key(r):
    return size_key(r.summary)


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def compare(args) -> str:
    from ..analysis import plots as P  # matplotlib is optional (the dev extra): needed only to draw

    if args.budget is not None and not args.budget > 0:
        raise UserInputError(f"--budget must be a positive number of PFLOP/s-days, got {args.budget}")
    run_dirs = find_runs(args.runs)
    loaded = [load_run(p) for p in run_dirs]
    summaries = [summarize(r, name=str(p)) for r, p in zip(loaded, run_dirs)]
    order = sorted(
        range(len(summaries)),
        key=lambda i: (
            summaries[i].num_layers,
            summaries[i].hidden_size,
            summaries[i].model,
            summaries[i].seed,
            variant_order(summaries[i].variant),
            summaries[i].run,
        ),
    )
    summaries, loaded = [summaries[i] for i in order], [loaded[i] for i in order]
    known = {s.variant for s in summaries}
    for v in args.variant or []:
        if v not in known:
            raise UserInputError(f"--variant {v!r}: no run has that variant (have: {', '.join(sorted(known))})")
    rows, notes, matched = match(loaded, summaries, args.loss, args.train_window)
    if args.reference not in known:
        notes.append(f"no run has the reference variant {args.reference!r}, so there are no deltas and no advantage")
    notes += pair_deltas(rows, args.reference)
    aggs = aggregate(rows, variant_order)
    points, fits, fit_rows, fit_notes, budget = fit_variants(aggs, args.reference, args.budget, args.variant)
    if len(matched) > 1:  # with one size, "Nothing fitted" in the table says it all
        notes += [f"{v}: {why}" for v, why in sorted(fit_notes.items(), key=lambda kv: _order(kv[0]))]
    if fits and args.reference in known and args.reference not in fits:
        notes.append(f"no fit for the reference variant {args.reference!r}, so no compute advantage")
    out = Path(args.out) if args.out else default_out(args.runs, run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, aggs, matched, fit_rows, notes, args.reference, budget, args.loss, args.train_window)
    (out / "comparison.md").write_text(text, encoding="utf-8")
    _write_csv(
        out / "comparison.csv",
        RUN_COLUMNS,
        [
            dict(
                r.summary.as_row(),
                label=r.label,
                compared_tokens=r.tokens,
                compared_flops=r.flops,
                pflops_days=r.pflops_days,
                loss=r.loss,
                loss_source=r.source,
                loss_batches=r.batches,
                delta_vs_reference=r.delta,
            )
            for r in rows
        ],
    )
    _write_csv(
        out / "aggregate.csv",
        AGG_COLUMNS,
        [
            dict(
                model=a.size[0],
                num_layers=a.size[1],
                hidden_size=a.size[2],
                variant=a.variant,
                compared_tokens=a.tokens,
                seeds=" ".join(map(str, a.seeds)),
                n=len(a.seeds),
                loss_mean=a.mean,
                loss_sd=a.sd,
                delta_mean=a.delta_mean,
                delta_sd=a.delta_sd,
                pairs=len(a.deltas),
            )
            for a in aggs
        ],
    )
    _write_csv(out / "fits.csv", FIT_COLUMNS, fit_rows)
    what = "validation loss" if args.loss == "val" else "TRAINING loss (not held out)"
    P.plot_scaling(
        points,
        fits,
        out / "scaling_fits.png",
        budget=budget,
        title=f"{what} at matched tokens vs compute (seed means, {len(rows)} runs)",
    )
    P.plot_loss_bars(
        [f"{a.variant}\n{size_name(a.size)}" for a in aggs],
        [a.mean for a in aggs],
        [a.sd for a in aggs],
        [a.losses for a in aggs],
        out / "loss_bars.png",
        f"{what} at matched tokens\nbar: mean ± SD over seeds; dots: single seeds",
        ylabel=what,
    )
    curves = {}
    for r, run in zip(rows, loaded):
        pts = loss_curve(run, args.loss)
        curves[r.label] = {args.loss: tuple(map(list, zip(*pts))) if pts else ([], [])}
    marks = {f"compared at {t:,} tokens ({size_name(k)})": t for k, t in matched.items()}
    P.plot_loss_curves(curves, out / "loss_curves.png", f"{what} per run", xlabel="tokens", marks=marks)
    return text + (
        f"\nwrote {out}/comparison.md, comparison.csv, aggregate.csv, fits.csv, scaling_fits.png, "
        "loss_bars.png, loss_curves.png"
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        message = compare(args)
    except (UserInputError, ConfigError, OSError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always exactly one line
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
