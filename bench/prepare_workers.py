"""``attnres-prepare --workers 2`` against ``--workers 1`` on a 50-100 MB corpus (issue 21.3 acceptance: >= 1.6x).

Why interleaved and with CPU seconds: on a shared box the wall-clock speed-up says as much about the other
jobs as about ours. The two variants alternate (1,2 / 2,1 / 1,2 ...) so drifting load hits both alike, and
the CPU seconds of each run (user + sys of the command and its workers, ``getrusage(RUSAGE_CHILDREN)``)
show the parallel overhead independently of the load: with no overhead the 2-worker run costs as many CPU
seconds as the 1-worker run, half per worker.

The corpus is the local Python standard library's ``.py`` files as jsonl (``{"text": ...}`` per file, files of
~4 MB, repeated until ``--mb``) in a temp dir; the tokenizer a byte-level BPE trained here on ~4 MB of it
(``--tokenizer byte`` or a path instead). Each run is a fresh ``attnres-prepare`` process with
``TOKENIZERS_PARALLELISM=false`` (one thread per process, for both variants). The throughput is the
command's own ``throughput:`` line (tokenizing phase, MB/s of text); outputs of the two variants must be
byte-identical, every round.

    OMP_NUM_THREADS=1 python bench/prepare_workers.py [--mb 64] [--rounds 3] [--tokenizer bpe]

Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stdlib_texts():
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in sorted(files):
            if f.endswith(".py"):
                try:
                    yield Path(dirpath, f).read_bytes().decode("utf-8")
                except (UnicodeDecodeError, OSError):
                    continue


def make_corpus(out: Path, mb: float, file_mb: float = 4.0) -> int:
    """jsonl files of ~``file_mb`` MB holding the stdlib sources, cycled until ``mb`` MB; returns bytes."""
    out.mkdir(parents=True)
    texts = list(stdlib_texts())
    total, k, f, size = 0, 0, None, 0
    copy = 0
    while total < mb * 1e6:
        for t in texts:
            if f is None or size >= file_mb * 1e6:
                if f is not None:
                    f.close()
                f, size, k = open(out / f"part_{k:04d}.jsonl", "w"), 0, k + 1
            line = json.dumps({"text": f"# copy {copy}\n" + t}) + "\n"
            f.write(line)
            size += len(line)
            total += len(line)
            if total >= mb * 1e6:
                break
        copy += 1
    f.close()
    return total


def train_bpe(corpus: Path, out: Path, vocab: int, mb: float = 4.0) -> str:
    from attnres_train.data.tokenizer import train_bpe_tokenizer

    def sample():
        n = 0
        for p in sorted(corpus.glob("*.jsonl")):
            for line in open(p):
                text = json.loads(line)["text"]
                yield text
                n += len(text)
                if n >= mb * 1e6:
                    return

    train_bpe_tokenizer(sample(), vocab, str(out))
    return str(out)


def run_prepare(corpus: Path, out: Path, workers: int, tokenizer: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "attnres_train.cli.prepare", str(corpus), "--out", str(out)]
    cmd += ["--workers", str(workers), "--tokenizer", tokenizer, "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"attnres-prepare failed ({proc.returncode}):\n{proc.stderr}")
    m = re.search(r"throughput: tokenized ([\d.]+) MB of text in ([\d.]+) s = ([\d.]+) MB/s", proc.stdout)
    if m is None:
        raise SystemExit(f"no throughput line in:\n{proc.stdout}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"workers": workers, "mb": float(m.group(1)), "mbps": float(m.group(3)), "wall": wall, "cpu": cpu}


def digest(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64.0, help="corpus size in MB (acceptance: 50-100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokenizer", default="bpe", help="'bpe' (trained here), 'byte', or a tokenizer path")
    ap.add_argument("--bpe-vocab", type=int, default=8192)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="prepare_workers-"))
    try:
        t0 = time.perf_counter()
        nbytes = make_corpus(tmp / "corpus", args.mb)
        tok = args.tokenizer
        if tok == "bpe":
            tok = train_bpe(tmp / "corpus", tmp / "bpe", args.bpe_vocab)
        print(f"corpus: {nbytes / 1e6:.1f} MB of stdlib sources as jsonl in {tmp} ({time.perf_counter() - t0:.1f} s)")
        print(f"tokenizer: {args.tokenizer}; cores: {os.cpu_count()}; python {sys.version.split()[0]}")
        print(f"{'round':>5} {'workers':>7} {'MB/s':>7} {'wall_s':>7} {'cpu_s':>7} {'cpu_s/worker':>12} {'load1':>6}")
        ratios, cpu_ratios, rates = [], [], {1: [], 2: []}
        for r in range(args.rounds):
            res = {}
            for w in (1, 2) if r % 2 == 0 else (2, 1):
                out = tmp / f"out{w}"
                shutil.rmtree(out, ignore_errors=True)
                load = os.getloadavg()[0]
                res[w] = run_prepare(tmp / "corpus", out, w, tok)
                x = res[w]
                rates[w].append(x["mbps"])
                print(
                    f"{r:>5} {w:>7} {x['mbps']:>7.2f} {x['wall']:>7.1f} {x['cpu']:>7.1f} {x['cpu'] / w:>12.1f} {load:>6.1f}"
                )
            if digest(tmp / "out1") != digest(tmp / "out2"):
                raise SystemExit(f"round {r}: the 1- and 2-worker outputs differ")
            ratios.append(res[2]["mbps"] / res[1]["mbps"])
            cpu_ratios.append(res[2]["cpu"] / res[1]["cpu"])
            print(f"round {r}: speed-up {ratios[-1]:.2f}x, CPU seconds 2w/1w {cpu_ratios[-1]:.2f}, outputs identical")
        med = statistics.median(ratios)
        print(f"per-round speed-ups: {', '.join(f'{x:.2f}' for x in ratios)}; median {med:.2f}x")
        print(f"RESULT prepare_workers1_throughput {statistics.median(rates[1]):.2f} MB/s")
        print(f"RESULT prepare_workers2_throughput {statistics.median(rates[2]):.2f} MB/s")
        print(f"RESULT prepare_workers2_cpu_ratio {statistics.median(cpu_ratios):.3f} x")
        print(f"RESULT prepare_workers2_speedup {med:.2f} x")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
