"""Loader start-up at 10^6 and 10^7 documents: time and peak RSS must grow sub-linearly (issue 21.2).

Why: at pretraining scale (~10^8 documents) every rank opens the data at every start. Per-document Python
work or per-document arrays in RAM turn that into minutes and gigabytes per rank. This bench synthesises
token shard sets (tokens only, no text: random byte ids, documents of 2..32 tokens ending in EOS, 2^20
documents per shard) in a temp dir, then in a *fresh* single-threaded process per size measures:

* ``build_s``: ``build_datasets`` on the shard set (memmap source, val_fraction 0.01, seq_len 2048), i.e. open
  the set, split by document, set up the blend and shuffle; ``rebuild_s``: the same again in that process
  (without the one-time lazy imports, so it is the part that can grow with the corpus);
* ``first_batch_ms`` and ``far_batch_ms``: the first batch (8 samples) and a batch 10 epochs in (resume far
  away; crosses no permutation build);
* ``peak_rss``: ``ru_maxrss`` of the process, and ``rss_growth``: peak minus the RSS after the imports.

and the cost of an epoch boundary for a 2x10^7-sample source (old full permutation vs Feistel), and prints
growth exponents ``log(x_1e7 / x_1e6) / log(10)`` (1 = linear). ``--compare-rev REV`` runs the same
on a git worktree of REV (format-1 shards with offsets in the JSON headers) for a before/after.

    OMP_NUM_THREADS=1 python bench/data_scale.py [--sizes 1000000 10000000] [--compare-rev e28ac40]

Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS_PER_SHARD = 1 << 20
EOS, VOCAB = 256, 258  # the byte tokenizer's


def synthesise(out: str, num_docs: int, fmt: int, seed: int = 0) -> int:
    """Write a shard set of ``num_docs`` documents in format ``fmt`` (1: offsets in headers, 2: .idx + index)."""
    os.makedirs(out)
    rng = np.random.default_rng(seed)
    shards, total = [], 0
    nshards = -(-num_docs // DOCS_PER_SHARD)
    for b in range(nshards):
        d = min(DOCS_PER_SHARD, num_docs - b * DOCS_PER_SHARD)
        lens = rng.integers(2, 33, d)
        off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        toks = rng.integers(0, 256, int(off[-1]), dtype=np.uint16)
        toks[off[1:] - 1] = EOS
        name = f"shard_{b:05d}"
        toks.tofile(os.path.join(out, name + ".bin"))
        h = {
            "format": "attnres-tokens",
            "version": fmt,
            "dtype": "uint16",
            "num_tokens": int(off[-1]),
            "num_docs": d,
            "tokenizer": "byte",
            "vocab_size": VOCAB,
            "eos_id": EOS,
            "max_token_id": EOS,
            "source": "synthetic",
        }
        if fmt == 1:
            h.update(doc_offsets=off.tolist(), shard_index=b, num_shards=nshards)
        else:
            off.astype("<i8").tofile(os.path.join(out, name + ".idx"))
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(h, f)
        shards.append({"name": name, **{k: h[k] for k in ("dtype", "num_tokens", "num_docs", "max_token_id")}})
        total += int(off[-1])
    if fmt == 2:
        with open(os.path.join(out, "index.json"), "w") as f:
            json.dump(
                {
                    "format": "attnres-token-set",
                    "version": 2,
                    "tokenizer": "byte",
                    "vocab_size": VOCAB,
                    "eos_id": EOS,
                    "num_tokens": total,
                    "num_docs": num_docs,
                    "shards": shards,
                },
                f,
            )
    return total


def child(shards: str, cache: str) -> None:
    import torch  # noqa: F401  (the trainer imports it anyway: part of the baseline, not of start-up)

    from attnres_train.data.loader import build_datasets

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = {
        "sources": [{"path": shards, "kind": "memmap"}],
        "seq_len": 2048,
        "val_fraction": 0.01,
        "seed": 1,
        "cache_dir": cache,
        "num_workers": 0,
    }
    t0 = time.perf_counter()
    bundle = build_datasets(cfg, progress=False)
    t1 = time.perf_counter()
    sampler = bundle.train_sampler(8)
    sampler.next_batch()
    t2 = time.perf_counter()
    far = 10 * bundle.train.epoch_samples
    sampler.batch_at(far)
    t3 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    samples = {"train_samples": int(bundle.train.epoch_samples), "val_samples": bundle.val.num_samples}
    del bundle, sampler
    t4 = time.perf_counter()
    build_datasets(cfg, progress=False)  # again: without the one-time lazy imports (omegaconf schema, tokenizer)
    rebuild = time.perf_counter() - t4
    print(
        json.dumps(
            {
                "build_s": t1 - t0,
                "rebuild_s": rebuild,
                "first_batch_ms": (t2 - t1) * 1e3,
                "far_batch_ms": (t3 - t2) * 1e3,
                "peak_rss_mib": rss / 1024,
                "rss_growth_mib": (rss - rss0) / 1024,
                **samples,
            }
        )
    )


def measure(code_root: Path, shards: str, cache: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(code_root))
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "data_scale.py"), "--child", shards, cache],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(code_root),
    )
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def epoch_boundary(n: int) -> None:
    """What an epoch boundary costs for a source of ``n`` samples: the old full permutation vs the Feistel
    bijection (build + one 4096-sample batch of lookups)."""
    from attnres_train.data.shuffle import FeistelPermutation

    t = time.perf_counter()
    perm = np.random.default_rng([1, 2, 3, 4]).permutation(n)
    t_perm, nbytes = time.perf_counter() - t, perm.nbytes
    del perm
    t = time.perf_counter()
    FeistelPermutation(n, [1, 2, 3, 4])(np.arange(4096))
    t_feistel = time.perf_counter() - t
    print(
        f"epoch boundary, {n:,} samples: full permutation {t_perm:.2f} s and {nbytes / 2**20:.0f} MiB; "
        f"Feistel build + 4096 lookups {t_feistel * 1e3:.1f} ms and a few bytes of keys"
    )
    print(f"RESULT epoch_boundary_permutation_{n:.0e} {t_perm:.3f} s")
    print(f"RESULT epoch_boundary_permutation_bytes_{n:.0e} {nbytes / 2**20:.0f} MiB")
    print(f"RESULT epoch_boundary_feistel_{n:.0e} {t_feistel * 1e3:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[1_000_000, 10_000_000])
    p.add_argument("--compare-rev", default=None, help="also measure this git revision (format-1 shards)")
    p.add_argument("--child", nargs=2, metavar=("SHARDS", "CACHE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    tmp = tempfile.mkdtemp(prefix="data_scale-")
    runs = [("now", ROOT, 2)]
    try:
        if a.compare_rev:
            wt = Path(tmp) / "worktree"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), a.compare_rev],
                check=True,
                capture_output=True,
            )
            runs.append((a.compare_rev, wt, 1))
        results = {}
        for label, code, fmt in runs:
            for n in a.sizes:
                d = os.path.join(tmp, f"shards-v{fmt}-{n}")
                if not os.path.exists(d):
                    t = time.perf_counter()
                    tokens = synthesise(d, n, fmt)
                    print(
                        f"synthesised {n:,} documents, {tokens:,} tokens (format {fmt}) in {time.perf_counter() - t:.1f} s",
                        flush=True,
                    )
                r = results[label, n] = measure(code, d, os.path.join(tmp, "cache"))
                print(
                    f"[{label}] {n:>11,} docs: build {r['build_s']:.3f} s (again: {r['rebuild_s']:.3f} s), first batch {r['first_batch_ms']:.1f} ms, "
                    f"batch 10 epochs in {r['far_batch_ms']:.1f} ms, peak RSS {r['peak_rss_mib']:.0f} MiB "
                    f"(+{r['rss_growth_mib']:.0f} MiB over the imports); {r['train_samples']:,} train / "
                    f"{r['val_samples']:,} val samples",
                    flush=True,
                )
        epoch_boundary(20_000_000)
        lo, hi = a.sizes
        decades = math.log10(hi / lo)
        for label, _, _ in runs:
            tag = "" if label == "now" else f"_{label}"
            r0, r1 = results[label, lo], results[label, hi]
            for key, unit in (
                ("build_s", "s"),
                ("rebuild_s", "s"),
                ("peak_rss_mib", "MiB"),
                ("rss_growth_mib", "MiB"),
                ("first_batch_ms", "ms"),
                ("far_batch_ms", "ms"),
            ):
                print(f"RESULT {key}{tag}_{lo:.0e} {r0[key]:.4g} {unit}")
                print(f"RESULT {key}{tag}_{hi:.0e} {r1[key]:.4g} {unit}")
            for key in ("build_s", "rebuild_s", "peak_rss_mib", "rss_growth_mib"):
                e = math.log(max(r1[key], 1e-9) / max(r0[key], 1e-9)) / math.log(10) / decades
                print(f"RESULT {key}{tag}_growth_exponent {e:.3f} (1 = linear)")
    finally:
        if a.compare_rev:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "worktree")],
                capture_output=True,
            )
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
