"""``attnres-analyze RUN_DIR...``: the pictures of one run — what AttnRes learned and how training went.

    attnres-analyze runs/x                       # -> runs/x/analysis/*.png + summary.json
    attnres-analyze runs/x --metrics-only        # logs only: no checkpoint or data needed

From the newest complete checkpoint on a held-out batch: depth-attention weights (the paper's Fig. 8), output
magnitude and gradient norm per layer (Fig. 5b/c), expert load; from ``metrics.jsonl``: loss curves, expert
imbalance and depth entropy. Files and definitions: docs/analysis.md. Bad input prints one ``error: ...``
line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ..analysis import depth as D
from ..analysis.depth import reader_labels
from ..analysis.loading import load_run_model
from ..analysis.runs import find_runs, load_run, summarize
from ..config.errors import ConfigError, UserInputError
from .arg_parser import ErrorLineParser


def build_parser() -> argparse.ArgumentParser:
    p = ErrorLineParser(
        prog="attnres-analyze", description="Plot AttnRes diagnostics, loss curves and expert load of runs."
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or sweep directories of runs")
    p.add_argument("--out", default=None, help="output directory (one run only; default RUN_DIR/analysis)")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir to analyse (default: the newest complete one)")
    p.add_argument("--batch-size", type=int, default=4, help="held-out sequences to analyse (default 4)")
    p.add_argument("--metrics-only", action="store_true", help="only the plots from metrics.jsonl")
    return p


def _curves(run) -> dict:
    train = [(r["step"], r["loss"]) for r in run.kind("train") if isinstance(r.get("loss"), (int, float))]
    val = [(r["step"], r["val_loss"]) for r in run.kind("val") if isinstance(r.get("val_loss"), (int, float))]
    return {
        "train": tuple(map(list, zip(*train))) if train else ([], []),
        "val": tuple(map(list, zip(*val))) if val else ([], []),
    }


def _imbalance(run) -> dict:
    out = {}
    for key in ("expert_imbalance_mean", "expert_imbalance_max"):
        pts = [(r["step"], r[key]) for r in run.kind("train") if isinstance(r.get(key), (int, float))]
        if pts:
            out[key.replace("expert_imbalance_", "") + " over MoE layers (logged)"] = tuple(map(list, zip(*pts)))
    return out


def analyze_run(
    run_dir: Path, out: Optional[Path], checkpoint: Optional[str], batch_size: int, metrics_only: bool
) -> List[Path]:
    from ..analysis import plots as P  # matplotlib is optional (the dev extra): needed only to draw

    run = load_run(run_dir)
    if metrics_only and not run.records:  # nothing to plot: an empty page would look like a result
        metrics = run.path / "metrics.jsonl"
        state = "has no JSON record" if metrics.is_file() else "does not exist"
        raise UserInputError(f"{metrics}: {state}; --metrics-only has nothing to plot (train the run first)")
    summary = summarize(run, name=str(run_dir))
    out = Path(out) if out is not None else run.path / "analysis"
    result, ckpt, what = {}, None, ""
    if not metrics_only:  # everything that can fail on input is done before the first file is written
        model, ckpt, meta = load_run_model(run, checkpoint)
        batch, where = D.heldout_batch(run, batch_size)
        result = D.analyze_checkpoint(model, run.config["model"], batch)
        what = f"step {meta.get('step')} on {batch.shape[0]}x{batch.shape[1] - 1} tokens of the {where}"
    short = "/".join(Path(run_dir).resolve().parts[-2:])  # e.g. block_sweep/3: titles stay readable
    title = f"{short}: {summary.variant} ({summary.model}, {summary.num_layers} layers)"
    files = [P.plot_loss_curves({summary.variant: _curves(run)}, out / "loss_curves.png", title + ": loss")]
    if result.get("depth_weights"):
        files.append(
            P.plot_depth_weights(
                result["depth_weights"],
                result["readers"],
                result["sources"],
                out / "depth_weights.png",
                f"{title}\ndepth attention, {what}",
            )
        )
    if result:
        files.append(
            P.plot_layer_profile(
                result["output_rms"],
                result["grad_norm"],
                result["block_starts"],
                out / "layer_profile.png",
                f"{title}\n{what}",
            )
        )
    imbalance = _imbalance(run)
    if result.get("expert_load") or imbalance:
        files.append(
            P.plot_expert_load(
                result.get("expert_load"),
                result.get("moe_layers", []),
                imbalance,
                out / "expert_load.png",
                title + ": expert load",
            )
        )
    depth_recs = [r for r in run.kind("depth") if r.get("depth_entropy")]
    if depth_recs:
        width = min(len(r["depth_entropy"]) for r in depth_recs)
        files.append(
            P.plot_depth_entropy(
                [r["step"] for r in depth_recs],
                [r["depth_entropy"][:width] for r in depth_recs],
                reader_labels(run.config["model"]),
                out / "depth_entropy.png",
                title + ": logged depth-attention entropy",
            )
        )
    doc = {"run": summary.as_row(), "checkpoint": str(ckpt) if ckpt else None, **result}
    (out / "summary.json").write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    files.append(out / "summary.json")
    return files


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
        runs = find_runs(args.runs)
        for flag in ("out", "checkpoint"):
            if getattr(args, flag) is not None and len(runs) > 1:
                raise UserInputError(f"--{flag} needs exactly one run, got {len(runs)}")
        for run_dir in runs:
            files = analyze_run(run_dir, args.out, args.checkpoint, args.batch_size, args.metrics_only)
            print(f"{run_dir}: wrote " + ", ".join(str(f) for f in files), flush=True)
    except (UserInputError, ConfigError, OSError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always exactly one line
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
