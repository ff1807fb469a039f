"""``attnres-eval RUN_DIR``: loss, perplexity and bits per byte of a checkpoint on held-out sources.

    attnres-eval runs/x                              # the run's data.val_sources (or its held-out slice)
    attnres-eval runs/x --checkpoint step_300 --source valid.jsonl --source other/ --batches 8

Prints a table and writes it as JSON (default RUN_DIR/eval/<checkpoint>.json). The loss equals the trainer's
validation loss on the same samples. docs/analysis.md, "attnres-eval". Bad input prints one ``error: ...``
line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ..analysis.evaluate import eval_data, evaluate, total
from ..analysis.loading import load_run_model
from ..analysis.runs import load_run
from ..config.errors import ConfigError, UserInputError
from .arg_parser import ErrorLineParser


def build_parser() -> argparse.ArgumentParser:
    p = ErrorLineParser(
        prog="attnres-eval", description="Evaluate a checkpoint on held-out sources (loss, ppl, bits/byte)."
    )
    p.add_argument("run", metavar="RUN_DIR", help="the run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default=None, help="step_N, a step dir or a dir of them (default: the newest)")
    p.add_argument(
        "--source",
        action="append",
        default=None,
        metavar="PATH",
        help="a source to evaluate (any data.sources path: text dir/file, jsonl, shard dir, Megatron prefix, hub "
        "name); repeatable. Default: the run's data.val_sources, else its held-out slice",
    )
    p.add_argument("--batches", type=int, default=None, help="at most K batches per source (default: all samples)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="samples per batch (default: the run's trainer.micro_batch_size)"
    )
    p.add_argument("--out", default=None, help="JSON file to write (default RUN_DIR/eval/<checkpoint>.json)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows) -> str:
    lines = [f"{'source':24s} {'tokens':>12s} {'loss':>8s} {'ppl':>10s} {'bits/byte':>9s}"]
    for r in rows:
        lines.append(
            f"{r.name[:24]:24s} {r.tokens:>12,d} {r.loss:>8.4f} {_fmt(r.ppl, '>10.3f')} "
            f"{_fmt(r.bits_per_byte, '>9.4f')}"
        )
    return "\n".join(lines)


def run_eval(args) -> dict:
    for flag in ("batches", "batch_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UserInputError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    run = load_run(args.run)
    loaded = load_run_model(run, args.checkpoint, device=args.device)
    val, tokenizer, data_cfg = eval_data(run, args.source)
    trainer = run.config.get("trainer") or {}
    batch_size = args.batch_size or int(trainer.get("micro_batch_size", 8))
    eos = tokenizer.eos_id if data_cfg.document_masking else None
    results = evaluate(loaded.model, val, tokenizer, batch_size, args.batches, doc_eos_id=eos, device=args.device)
    rows = results + ([total(results)] if len(results) > 1 else [])
    print(table(rows))
    doc = {
        "run": str(run.path),
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.meta.get("step"),
        "tokenizer": tokenizer.name,
        "seq_len": val.seq_len,
        "batch_size": batch_size,
        "max_batches": args.batches,
        "sources": [r.as_dict() for r in results],
        "all": total(results).as_dict(),
    }
    out = Path(args.out) if args.out else run.path / "eval" / f"{loaded.checkpoint.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    print(f"wrote {out}")
    return doc


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_eval(args)
    except (UserInputError, ConfigError, OSError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always exactly one line
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
