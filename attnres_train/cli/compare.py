"""``attnres-compare RUN_DIR...``: one table of final validation loss per run, power-law fits per variant, and
the compute advantage of each variant over a reference (the paper reports 1.25× for Block AttnRes over the
PreNorm baseline at 5.6 PFLOP/s-days).

    attnres-compare runs/block_sweep                           # -> runs/block_sweep/compare/
    attnres-compare runs/scaling --reference baseline --budget 5.6
    attnres-compare runs/a runs/b runs/sweep --out results/ --variant "block N=8"

Writes ``comparison.md`` (also printed), ``comparison.csv`` (one row per run), ``fits.csv`` (one row per
variant), ``scaling_fits.png`` (loss against compute with the fits), ``final_loss.png`` and
``loss_curves.png``. Compute per run = ``train_flops_per_token × tokens_seen`` from the run's config.yaml and
metrics.jsonl; a variant needs runs at ≥ 2 different compute budgets (sizes) to be fitted. Bad input prints
one ``error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..config.errors import ConfigError, UserInputError

RUN_COLUMNS = ("run", "variant", "model", "num_layers", "hidden_size", "active_params", "steps", "tokens", "flops",
               "pflops_days", "final_loss", "loss_source", "seed", "delta_vs_reference")
FIT_COLUMNS = ("variant", "A", "alpha", "r2", "points", "budget_pflops_days", "loss_at_budget", "reference",
               "compute_advantage")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnres-compare", description="Compare runs: final loss table, scaling-law fits, compute advantage.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or sweep directories of runs")
    p.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR/compare, or the runs' common "
                   "parent/compare)")
    p.add_argument("--reference", default="baseline", help="variant the advantage is measured against (default baseline)")
    p.add_argument("--variant", action="append", default=None,
                   help="variant(s) to report an advantage for (default: every fitted variant); repeatable")
    p.add_argument("--budget", type=float, default=None,
                   help="compute budget in PFLOP/s-days for the advantage (default: the largest run's compute)")
    return p


def default_out(args_runs: List[str], runs: List[Path]) -> Path:
    if len(args_runs) == 1 and not (Path(args_runs[0]) / "config.yaml").is_file():
        return Path(args_runs[0]) / "compare"
    parents = [str(p.resolve().parent) for p in runs]
    return Path(os.path.commonpath(parents)) / "compare"


def fit_variants(summaries, reference: str, budget: Optional[float], variants: Optional[List[str]]):
    """Per variant: the fit (or the reason there is none) and the advantage over ``reference`` at ``budget``."""
    from ..analysis.fit import compute_advantage, fit_power_law

    points: Dict[str, list] = {}
    for s in summaries:
        if math.isfinite(s.final_loss) and s.final_loss > 0 and s.flops > 0:
            points.setdefault(s.variant, []).append((s.pflops_days, s.final_loss))
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
        row = {"variant": v, "A": "", "alpha": "", "r2": "", "points": len(points.get(v, [])),
               "budget_pflops_days": budget if budget else "", "loss_at_budget": "", "reference": reference,
               "compute_advantage": ""}
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
    from ..analysis.runs import variant_order

    return variant_order(label)


def _fmt(v, kind: str = "g") -> str:
    if v == "" or v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return "—"
    if kind == "loss":
        return f"{v:.4f}"
    if kind == "int":
        return f"{int(v):,}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _size_key(s) -> tuple:
    return (s.model, s.num_layers, s.hidden_size, s.seed)


def deltas(summaries, reference: str) -> List[Optional[float]]:
    """Final loss minus the ``reference`` run's of the same model size and seed (None without one)."""
    ref = {}
    for s in summaries:
        if s.variant == reference and math.isfinite(s.final_loss):
            ref.setdefault(_size_key(s), s.final_loss)
    out = []
    for s in summaries:
        r = ref.get(_size_key(s))
        out.append(None if r is None or not math.isfinite(s.final_loss) else s.final_loss - r)
    return out


def markdown(summaries, fit_rows, notes, reference: str, budget) -> str:
    seeds = len({s.seed for s in summaries}) > 1
    seed_head, seed_rule = (" seed |", " ---: |") if seeds else ("", "")
    lines = ["# Run comparison", "",
             f"| run | variant | model | layers | d | active params |{seed_head} steps | tokens | FLOPs | PF-days | "
             f"final loss | Δ vs {reference} |",
             f"| --- | --- | --- | ---: | ---: | ---: |{seed_rule} ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s, d in zip(summaries, deltas(summaries, reference)):
        loss = _fmt(s.final_loss, "loss") + (" (train)" if s.loss_source == "train" else "")
        delta = "—" if d is None else f"{d:+.4f}"
        seed = f" {s.seed} |" if seeds else ""
        lines.append(f"| {s.run} | {s.variant} | {s.model} | {s.num_layers} | {s.hidden_size} | "
                     f"{_fmt(s.active_params, 'int')} |{seed} {s.steps} | {_fmt(s.tokens, 'int')} | {s.flops:.3e} | "
                     f"{s.pflops_days:.3g} | {loss} | {delta} |")
    lines += ["", "final loss = last validation loss ((train) = the run never validated: last train loss); "
              f"Δ = final loss minus the {reference} run's of the same model and seed; "
              "FLOPs = train_flops_per_token × tokens; PF-days = PFLOP/s-days; active params exclude embeddings.",
              "", "## Power-law fits L = A·C^(−α) (C in PFLOP/s-days)", ""]
    fitted = [r for r in fit_rows if r["A"] != ""]
    if not fitted:
        lines.append("No variant has runs at two or more compute budgets, so there is nothing to fit "
                     "(a block sweep trains one size; `experiment=scaling` trains several).")
        return "\n".join(lines) + "\n"
    lines += [f"Compute advantage over `{reference}` at {_fmt(budget)} PF-days.", "",
              "| variant | A | α | R² (log) | points | loss at budget | compute advantage |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in fit_rows:
        adv = "—" if r["compute_advantage"] == "" else f"{r['compute_advantage']:.3f}×"
        lines.append(f"| {r['variant']} | {_fmt(r['A'])} | {_fmt(r['alpha'])} | {_fmt(r['r2'])} | {r['points']} | "
                     f"{_fmt(r['loss_at_budget'], 'loss') if r['loss_at_budget'] != '' else '—'} | {adv} |")
    if notes:
        lines += [""] + [f"- {v}: {why}" for v, why in sorted(notes.items())]
    lines += ["", "compute advantage = compute the reference needs to reach the variant's fitted loss at the budget, "
              "divided by the budget (> 1: the variant is ahead)."]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})


def compare(args) -> str:
    from ..analysis import plots as P
    from ..analysis.runs import find_runs, load_run, summarize, variant_order

    if args.budget is not None and not args.budget > 0:
        raise UserInputError(f"--budget must be a positive number of PFLOP/s-days, got {args.budget}")
    run_dirs = find_runs(args.runs)
    loaded = [load_run(p) for p in run_dirs]
    summaries = [summarize(r, name=str(p)) for r, p in zip(loaded, run_dirs)]
    order = sorted(range(len(summaries)), key=lambda i: (summaries[i].num_layers, summaries[i].hidden_size,
                                                         summaries[i].model, summaries[i].seed,
                                                         variant_order(summaries[i].variant), summaries[i].run))
    summaries, loaded = [summaries[i] for i in order], [loaded[i] for i in order]
    known = {s.variant for s in summaries}
    for v in args.variant or []:
        if v not in known:
            raise UserInputError(f"--variant {v!r}: no run has that variant (have: {', '.join(sorted(known))})")
    points, fits, fit_rows, notes, budget = fit_variants(summaries, args.reference, args.budget, args.variant)
    if args.reference not in fits:
        notes.setdefault(args.reference, "no fit for the reference variant, so no compute advantage" if
                         args.reference in known else f"no run has the reference variant {args.reference!r}")
    out = Path(args.out) if args.out else default_out(args.runs, run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(summaries, fit_rows, notes, args.reference, budget)
    (out / "comparison.md").write_text(text, encoding="utf-8")
    rows = [dict(s.as_row(), delta_vs_reference="" if d is None else d)
            for s, d in zip(summaries, deltas(summaries, args.reference))]
    _write_csv(out / "comparison.csv", RUN_COLUMNS, rows)
    _write_csv(out / "fits.csv", FIT_COLUMNS, fit_rows)
    P.plot_scaling(points, fits, out / "scaling_fits.png", budget=budget,
                   title=f"final loss vs compute ({len(summaries)} runs)")
    many_models = len({_size_key(x)[:3] for x in summaries}) > 1
    many_seeds = len({x.seed for x in summaries}) > 1
    labels = [s.variant + (f"\n{s.model} {s.num_layers}L d{s.hidden_size}" if many_models else "")
              + (f" seed {s.seed}" if many_seeds else "") for s in summaries]
    P.plot_final_loss(labels, [s.final_loss for s in summaries], out / "final_loss.png", "final loss per run")
    curves = {}
    for s, run in zip(summaries, loaded):
        val = [(r["step"], r["val_loss"]) for r in run.kind("val") if isinstance(r.get("val_loss"), (int, float))]
        train = [(r["step"], r["loss"]) for r in run.kind("train") if isinstance(r.get("loss"), (int, float))]
        pts = {"val": tuple(map(list, zip(*val)))} if val else {"train": tuple(map(list, zip(*train))) if train else ([], [])}
        curves[f"{s.variant} ({Path(s.run).name})"] = pts
    P.plot_loss_curves(curves, out / "loss_curves.png", "validation loss per run (train loss if never validated)")
    return text + f"\nwrote {out}/comparison.md, comparison.csv, fits.csv, scaling_fits.png, final_loss.png, loss_curves.png"


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
