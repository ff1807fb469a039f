"""``attnres-prepare``: tokenize raw text once, ahead of training, into our token shards.

    attnres-prepare INPUT [INPUT ...] --out DIR [--tokenizer byte|DIR|HUB_NAME] [--workers N]
    attnres-prepare INPUT [INPUT ...] --out DIR --train-bpe VOCAB --tokenizer-out TOKDIR
    attnres-prepare --merge SET [SET ...] --out DIR

Why a separate step: tokenizing inside the first training job wastes accelerator time and races between
ranks; this runs on a CPU box, resumably. Errors print one ``error: ...`` line and exit 2; outputs are moved
into place only on success. Inputs, outputs and resume: docs/data.md "``attnres-prepare``".
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from typing import List, Optional

from tqdm.auto import tqdm

from ..config.data import DATA_KINDS, DataSourceConfig, validate_source
from ..config.errors import ConfigError, UserInputError
from ..data import parallel_prepare as pp
from ..data.shards import DEFAULT_SHARD_TOKENS
from ..data.sources import iter_documents, resolve_source
from ..data.tokenizer import load_tokenizer, train_bpe_tokenizer
from .arg_parser import ErrorLineParser


def build_parser() -> argparse.ArgumentParser:
    p = ErrorLineParser(prog="attnres-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="file, directory, glob, hub dataset name, or 'stdlib'")
    p.add_argument("--out", required=True, help="output directory for the token shards (must be new or empty)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default=None, help="'byte' (default), a tokenizer directory, or a hub name")
    tok.add_argument(
        "--train-bpe", type=int, default=None, metavar="VOCAB", help="train a byte-level BPE of this vocab size"
    )
    p.add_argument("--tokenizer-out", default=None, metavar="DIR", help="where --train-bpe saves the tokenizer")
    p.add_argument("--kind", default="auto", choices=[k for k in DATA_KINDS if k not in ("memmap", "megatron")])
    p.add_argument("--text-field", default="text", help="jsonl/parquet/arrow/hub column with the text")
    p.add_argument("--text-unit", default="file", choices=["file", "paragraph"], help="text files: document unit")
    p.add_argument("--split", default="train", help="hub datasets: split to read")
    p.add_argument("--hf-config", default=None, help="hub datasets: configuration (subset) name")
    p.add_argument("--hf-revision", default=None, help="hub datasets: branch, tag or commit to read")
    p.add_argument("--max-docs", type=int, default=None, help="per input: stop after this many documents")
    p.add_argument("--max-bytes", type=int, default=None, help="per input: stop after this many UTF-8 bytes")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 256M)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (output is the same for any N)")
    p.add_argument("--merge", action="store_true", help="the INPUTs are finished shard sets: combine them, in order")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out / --tokenizer-out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_target(path: str, flag: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"{flag} {path!r} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UserInputError(f"{flag} {path!r} is not empty; refusing to overwrite it (pass --overwrite to replace it)")


def _install(staging: str, dest: str) -> None:
    """Move a finished staging dir onto ``dest``, replacing an existing ``dest`` only at the last moment."""
    old = None
    if os.path.isdir(dest):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old-", dir=os.path.dirname(os.path.abspath(dest)))
        os.rmdir(old)
        os.rename(dest, old)
    shutil.move(staging, dest)  # a rename on one filesystem (the tokenizer may be staged on another)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _staging(dest: str) -> str:
    """The resumable staging directory of ``dest`` (same filesystem, so the final move is a rename)."""
    dest = os.path.abspath(dest)
    return os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.partial")


def run(args) -> str:
    t_start = time.perf_counter()
    for flag, v in (
        ("--max-docs", args.max_docs),
        ("--max-bytes", args.max_bytes),
        ("--shard-tokens", args.shard_tokens),
        ("--workers", args.workers),
    ):
        if v is not None and v <= 0:
            raise UserInputError(f"{flag} must be a positive integer, got {v}")
    if args.train_bpe is not None and args.train_bpe < 258:  # data/tokenizer.py's rule, before reading any input
        raise UserInputError(f"--train-bpe must be at least 258 (256 byte ids + 2 specials), got {args.train_bpe}")
    if args.train_bpe is not None and not args.tokenizer_out:
        raise UserInputError("--train-bpe needs --tokenizer-out DIR (where the trained tokenizer is saved)")
    if args.tokenizer_out and args.train_bpe is None:
        raise UserInputError("--tokenizer-out is only used with --train-bpe")
    _check_target(args.out, "--out", args.overwrite)
    if args.tokenizer_out:
        _check_target(args.tokenizer_out, "--tokenizer-out", args.overwrite)
        if os.path.abspath(args.tokenizer_out) == os.path.abspath(args.out):
            raise UserInputError("--tokenizer-out and --out must be different directories")

    if args.merge:
        return _merge(args)
    resolved = []
    for i, inp in enumerate(args.inputs):
        src = DataSourceConfig(
            path=inp,
            kind=args.kind,
            text_field=args.text_field,
            split=args.split,
            hf_config=args.hf_config,
            text_unit=args.text_unit,
            hf_revision=args.hf_revision,
        )
        try:
            validate_source(src, f"inputs[{i}]")
        except ConfigError as e:
            raise UserInputError(f"input {inp!r}: {e.message}") from None
        rs = resolve_source(src, where=f"input {inp!r}", path_field="input")
        if rs.kind in ("memmap", "megatron"):
            raise UserInputError(f"input {inp!r} is already tokenized ({rs.kind}); train on it directly")
        resolved.append(rs)

    staging = _staging(args.out)
    try:
        units = pp.plan_units(resolved, args.max_docs, args.max_bytes)
        for path, size in pp.unshared_gzip(resolved) if args.workers > 1 else []:
            print(
                f"warning: {path} ({size / 1e6:.0f} MB) is read by one worker: a gzip file cannot be cut into "
                "byte ranges; decompress it, or split it into several files, to share it among --workers",
                file=sys.stderr,
            )
        settings = {
            "tokenizer": args.tokenizer or "byte",
            "train_bpe": args.train_bpe,
            "max_docs": args.max_docs,
            "max_bytes": args.max_bytes,
            "shard_tokens": args.shard_tokens,
            "tokenizer_out": args.tokenizer_out,
        }
        if args.train_bpe is None:
            tokenizer = load_tokenizer(args.tokenizer or "byte")
            settings["tokenizer_fingerprint"] = tokenizer.fingerprint
        done = pp.resume_state(staging, pp.plan_key(resolved, units, settings))
        tok_spec, tok_name = args.tokenizer or "byte", args.tokenizer or "byte"
        if args.train_bpe is not None:
            tok_spec, tok_name = os.path.join(staging, "tokenizer"), os.path.abspath(args.tokenizer_out)
            if not os.path.isdir(tok_spec):  # trained and saved atomically by an earlier run of this plan
                docs = itertools.chain.from_iterable(
                    iter_documents(rs, args.max_docs, args.max_bytes) for rs in resolved
                )
                with tqdm(desc="training BPE (reading)", unit=" doc", disable=args.no_progress) as bar:
                    train_bpe_tokenizer((bar.update(1) or d for d in docs), args.train_bpe, tok_spec)
        label = " + ".join(args.inputs)
        jobs = [
            {
                "unit": u,
                "source": resolved[u.input],
                "tokenizer": tok_spec,
                "tokenizer_name": tok_name,
                "staging": staging,
                "shard_tokens": args.shard_tokens or DEFAULT_SHARD_TOKENS,
                "max_docs": args.max_docs,
                "max_bytes": args.max_bytes,
                "source_label": label,
            }
            for u in units
            if u.index not in done
        ]
        manifests = list(done.values())
        with tqdm(
            desc="tokenizing",
            total=sum(u.nbytes for u in units) or None,
            unit="B",
            unit_scale=True,
            disable=args.no_progress,
            initial=sum(u.nbytes for u in units if u.index in done),
        ) as bar:

            def on_done(m):
                manifests.append(m)
                bar.update(units[m["unit"]].nbytes)

            t_tok = time.perf_counter()
            pp.execute(jobs, args.workers, on_done)
            t_tok = time.perf_counter() - t_tok
        index = pp.finish(staging, manifests, resolved)
        if args.train_bpe is not None:
            _install(tok_spec, args.tokenizer_out)
        _install(staging, args.out)
    except UserInputError:  # bad input: nothing worth resuming
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t_start
    text_bytes = sum(m["bytes"] for m in manifests)
    fresh = sum(m["bytes"] for m in manifests if m["unit"] not in done)
    resumed = f", {len(done)} of {len(units)} units resumed from an earlier run" if done else ""
    return (
        f"wrote {index['num_tokens']:,} tokens ({index['num_docs']:,} documents, {len(index['shards'])} shard(s)) "
        f"to {args.out}; train with data.sources=[{{path: {args.out}, kind: memmap}}] data.tokenizer={tok_name_for(args)}\n"
        f"throughput: tokenized {fresh / 1e6:.1f} MB of text in {t_tok:.1f} s = {fresh / 1e6 / max(t_tok, 1e-9):.2f} MB/s "
        f"with {args.workers} worker(s), {len(units)} unit(s){resumed}; {text_bytes / 1e6:.1f} MB in total, "
        f"{seconds:.1f} s in all"
    )


def _merge(args) -> str:
    defaults = build_parser().parse_args(["x", "--out", "y"])
    for opt in (
        "tokenizer",
        "train_bpe",
        "kind",
        "text_field",
        "text_unit",
        "split",
        "hf_config",
        "hf_revision",
        "max_docs",
        "max_bytes",
        "shard_tokens",
        "workers",
    ):
        if getattr(args, opt) != getattr(defaults, opt):
            raise UserInputError(
                f"--{opt.replace('_', '-')} has no effect with --merge (the sets are already tokenized)"
            )
    staging = _staging(args.out)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        index = pp.merge_sets(list(args.inputs), staging)
        _install(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return (
        f"merged {len(args.inputs)} shard sets into {args.out}: {index['num_tokens']:,} tokens, "
        f"{index['num_docs']:,} documents, {len(index['shards'])} shard(s)"
    )


def tok_name_for(args) -> str:
    return args.tokenizer_out if args.train_bpe is not None else (args.tokenizer or "byte")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        message = run(args)
    except (UserInputError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, disk full, ...: still a one-line answer
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"error: interrupted; finished shards are kept in {_staging(args.out)}: rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
