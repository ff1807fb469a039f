"""Peak memory and step time of the LM head + cross entropy, fused and chunked vs unfused (issue 17 item 1).

Why: the unfused head materialises the ``[tokens, vocab]`` fp32 logits, keeps a log-softmax of that size for
backward and builds a gradient of that size again; ``model.lm_loss_chunk_tokens`` (default on) never holds more
than one chunk of logits. This measures what that buys on the f1 head (d=448, vocab 32768).

Two parts, each variant in fresh processes (one thread each):

1. ``head``: one step (forward + backward) of the head alone, from hidden states ``[tokens, d]`` (a leaf that
   requires grad) and the fp32 head weight to the loss and both gradients. Memory: ``VmHWM - VmRSS`` around the
   step after a warm-up step, ``malloc_trim(0)`` and a high-water-mark reset (``/proc/self/clear_refs``), with
   glibc serving every block over 64 KiB by ``mmap`` (``M_MMAP_THRESHOLD``) so freed memory leaves the RSS at
   once: the resident bytes the step adds, i.e. saved activations, gradients and temporaries. Time: the
   variants alternate step by step in one process (freed host memory kept, as the trainer does), median wall
   and CPU time per variant.
2. ``model`` (``--skip-model`` to skip): the same peak-memory measurement around one training step
   (forward + backward, no optimizer) of the whole f1 model (PreNorm, fp32) at ``--model-tokens`` tokens.

Every measurement is repeated ``--repeats`` times, the variants interleaved; the RESULT lines give the median
and the spread (min..max). Logits size: ``tokens * vocab * 4`` bytes (fp32).

Usage: python bench/lm_head_memory.py [--tokens 2048] [--chunk 1024] [--vocab 32768] [--hidden 448]
       [--model-tokens 1024] [--steps 5] [--repeats 3] [--skip-model]
Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
MIB = 1 << 20


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def _peak_of(fn) -> int:
    """Bytes by which the resident set grows at most while ``fn()`` runs (see the module docstring)."""
    gc.collect()
    _libc().malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - start) * 1024


# ------------------------------------------------------------------------------------------- workers
def _head_inputs(a):
    import torch

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(a.tokens, a.hidden, generator=g)).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, a.vocab, (a.tokens,), generator=g)
    return h, w, y


def _head_step(variant: str, chunk: int, h, w, y) -> float:
    import torch.nn.functional as F

    from attnres_train.model.lm_loss import fused_linear_cross_entropy

    h.grad = w.grad = None
    if variant == "fused":
        loss = fused_linear_cross_entropy(h, w, y, chunk)
    else:  # what the model's unfused path does: F.linear, fp32 logits, F.cross_entropy
        loss = F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)
    loss.backward()
    return float(loss.detach())


def worker_head_memory(a) -> dict:
    libc = _libc()
    libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD: every block > 64 KiB is its own mmap, unmapped on free
    libc.mallopt(-1, 64 << 10)  # M_TRIM_THRESHOLD
    h, w, y = _head_inputs(a)
    loss = _head_step(a.variant, a.chunk, h, w, y)  # warm-up: lazy library state, thread pools
    h.grad = w.grad = None  # freed before the measurement, not inside it
    peak = _peak_of(lambda: _head_step(a.variant, a.chunk, h, w, y))
    return {"peak_bytes": peak, "loss": loss}


def worker_head_time(a) -> dict:
    import torch

    from attnres_train.train.host_memory import keep_freed_host_memory

    keep_freed_host_memory()
    torch.set_num_threads(1)
    h, w, y = _head_inputs(a)
    order = ["fused", "unfused"]
    wall, cpu = {v: [] for v in order}, {v: [] for v in order}
    for v in order:  # warm-up
        _head_step(v, a.chunk, h, w, y)
    for i in range(a.steps):
        for v in order if i % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            _head_step(v, a.chunk, h, w, y)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return {v: {"wall": statistics.median(wall[v]), "cpu": statistics.median(cpu[v])} for v in order}


def worker_model_memory(a) -> dict:
    import torch
    from omegaconf import OmegaConf

    from attnres_train.config.model import as_model_config
    from attnres_train.model import build_model

    libc = _libc()
    libc.mallopt(-3, 64 << 10)
    libc.mallopt(-1, 64 << 10)
    cfg = as_model_config(OmegaConf.load(ROOT / "configs" / "model" / "f1.yaml"))
    cfg.vocab_size = a.vocab
    cfg.lm_loss_chunk_tokens = a.chunk if a.variant == "fused" else 0
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (1, a.model_tokens + 1), generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        loss, aux = model.loss(ids[:, :-1], ids[:, 1:])
        (loss + aux if aux is not None else loss).backward()
        return float(loss.detach())

    loss = step()
    model.zero_grad(set_to_none=True)  # freed before the measurement, not inside it
    return {"peak_bytes": _peak_of(step), "loss": loss}


WORKERS = {"head_memory": worker_head_memory, "head_time": worker_head_time, "model_memory": worker_model_memory}


def _run(a, kind: str, variant: str = "") -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--variant",
        variant,
        "--tokens",
        str(a.tokens),
        "--chunk",
        str(a.chunk),
        "--vocab",
        str(a.vocab),
        "--hidden",
        str(a.hidden),
        "--steps",
        str(a.steps),
        "--model-tokens",
        str(a.model_tokens),
    ]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"worker {kind} {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spread(xs) -> str:
    return f"(min {min(xs):.3g} .. max {max(xs):.3g}, n={len(xs)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=448)
    p.add_argument("--model-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return

    import torch

    logits_mib = a.tokens * a.vocab * 4 / MIB
    print(
        f"# torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread per process; head d={a.hidden} "
        f"V={a.vocab}, {a.tokens} tokens (fp32 logits {logits_mib:.0f} MiB), chunk {a.chunk}; "
        f"model f1 at {a.model_tokens} tokens"
    )
    variants = ["fused", "unfused"]
    mem = {v: [] for v in variants}
    times = {v: {"wall": [], "cpu": []} for v in variants}
    model_mem = {v: [] for v in variants}
    for r in range(a.repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            res = _run(a, "head_memory", v)
            mem[v].append(res["peak_bytes"] / MIB)
            print(f"head memory  repeat {r} {v:8s} peak +{mem[v][-1]:7.1f} MiB  loss {res['loss']:.6f}", flush=True)
        t = _run(a, "head_time")
        for v in variants:
            times[v]["wall"].append(t[v]["wall"])
            times[v]["cpu"].append(t[v]["cpu"])
            print(
                f"head time    repeat {r} {v:8s} wall {t[v]['wall'] * 1e3:7.1f} ms  cpu {t[v]['cpu'] * 1e3:7.1f} ms",
                flush=True,
            )
        if not a.skip_model:
            for v in variants if r % 2 == 0 else variants[::-1]:
                res = _run(a, "model_memory", v)
                model_mem[v].append(res["peak_bytes"] / MIB)
                print(
                    f"f1 step mem  repeat {r} {v:8s} peak +{model_mem[v][-1]:7.1f} MiB  loss {res['loss']:.6f}",
                    flush=True,
                )

    med = statistics.median
    print(f"RESULT fp32_logits_size {logits_mib:.1f} MiB")
    for v in variants:
        print(f"RESULT head_peak_{v} {med(mem[v]):.1f} MiB {_spread(mem[v])}")
    saved = [u - f for u, f in zip(mem["unfused"], mem["fused"])]
    print(
        f"RESULT head_peak_saved {med(saved):.1f} MiB = {med(saved) / logits_mib:.2f}x the fp32 logits {_spread(saved)}"
    )
    for v in variants:
        ms = [x * 1e3 for x in times[v]["wall"]]
        cs = [x * 1e3 for x in times[v]["cpu"]]
        print(f"RESULT head_step_{v} {med(ms):.1f} ms wall {_spread(ms)}, cpu {med(cs):.1f} ms")
    ratio = [u / f for u, f in zip(times["unfused"]["wall"], times["fused"]["wall"])]
    print(f"RESULT head_speedup_fused {med(ratio):.2f} x wall {_spread(ratio)}")
    ratio = [u / f for u, f in zip(times["unfused"]["cpu"], times["fused"]["cpu"])]
    print(f"RESULT head_speedup_fused_cpu {med(ratio):.2f} x cpu time {_spread(ratio)}")
    if not a.skip_model:
        model_logits = a.model_tokens * a.vocab * 4 / MIB
        for v in variants:
            print(f"RESULT f1_step_peak_{v} {med(model_mem[v]):.1f} MiB {_spread(model_mem[v])}")
        saved = [u - f for u, f in zip(model_mem["unfused"], model_mem["fused"])]
        print(
            f"RESULT f1_step_peak_saved {med(saved):.1f} MiB = {med(saved) / model_logits:.2f}x the fp32 logits "
            f"({model_logits:.0f} MiB) {_spread(saved)}"
        )


if __name__ == "__main__":
    main()
