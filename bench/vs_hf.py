"""Training throughput of our model against transformers' ``KimiLinearForCausalLM``: same config, same weights.

Why: the reference model is only useful for CPU experiments if it is not much slower than the obvious
alternative. Both models get the same PreNorm configuration (``attnres_train.interop.config_to_hf``), the same
weights (our state dict converted with ``state_dict_to_hf(..., layout="transformers")``; a logits check
guards the conversion), the same batch and the same optimizer (AdamW, fused where this torch supports it).
transformers runs with its defaults: SDPA attention, ``grouped_mm`` experts, and the pure-torch
``chunk_kimi_delta_attention`` fallback (flash-linear-attention is not installed and cannot run on CPU).

A training step = forward, mean next-token cross entropy (computed the same way for both), backward, optimizer
step, zero_grad (ours also runs its aux-loss-free router-bias update, part of its training step). The two
models alternate step by step (the order flips every round) and we report medians of wall time (process CPU
time is printed too: on a shared machine it is less disturbed by other jobs).

Peak memory: ``VmHWM - VmRSS`` from ``/proc/self/status`` around one step after ``malloc_trim(0)`` (freed heap
pages go back to the OS) and resetting the high-water mark (``/proc/self/clear_refs``). That is the resident
memory a training step adds on top of what is already live (weights and optimizer state, identical for both):
activations saved for backward, gradients and temporaries. It is measured in an untimed step per model after
each repeat's timed rounds: the timed steps keep freed host memory as the trainer does, and a trim before them
would charge every step the page faults of its working set (``run_rounds``). Without ``/proc`` (not Linux) it
is not reported.

The headline ratio is the median over rounds of (transformers step time / our step time) within a round. MFU:
our training FLOPs per step over our step time and the 1024^3 matmul probe timed at the start of the same round,
median over rounds. The rounds run ``--repeats`` times (default 3); each ``RESULT`` is the median over repeats
with its min..max.

Usage: python bench/vs_hf.py [--preset f1] [--vocab N] [--batch 1] [--seq 512] [--rounds 5] [--repeats 3]
       [--threads 0]
Ends with ``RESULT`` lines; the headline is ``RESULT ours_over_hf_tokens_per_s <x> x``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from attnres_overhead import add_host_memory_flag, apply_host_memory_flag, matmul_probe  # bench/ sibling
from omegaconf import OmegaConf

from attnres_train.config.model import as_model_config
from attnres_train.model import build_model
from attnres_train.model.flops import train_flops_per_token
from attnres_train.model.kda import torch_default_chunk

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


# ----------------------------------------------------------------------------------------------- memory
def _status_kb(field: str):
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


class PeakRSS:
    """Resident memory a block of code adds at its peak (KiB), or None where /proc is not available."""

    def __init__(self):
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None
        self.enabled = _status_kb("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK)

    def __enter__(self):
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        if self.enabled:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.delta_kb = (_status_kb("VmHWM") - self.start) if self.enabled else None
        return False


# ------------------------------------------------------------------------------------------------ models
def build_pair(cfg):
    """Our PreNorm model and a transformers KimiLinearForCausalLM holding the same weights."""
    from transformers import KimiLinearForCausalLM

    from attnres_train.interop import config_to_hf, state_dict_to_hf

    torch.manual_seed(0)
    ours = build_model(cfg).train()
    hf = KimiLinearForCausalLM(config_to_hf(cfg)).train()
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg, layout="transformers"), strict=True)
    return ours, hf


def make_optimizer(model):
    try:  # the fused CPU AdamW is ~9x faster than foreach on CPU; same for both models
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4)


def lm_loss(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def step_ours(model, opt, x, y):
    loss, aux = model.loss(x, y)
    (loss if aux is None else loss + aux).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.update_router_biases()
    return loss.detach()


def step_hf(model, opt, x, y):
    loss = lm_loss(model(input_ids=x, use_cache=False).logits, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def kda_layer_time(layer, x_btd) -> float:
    """Wall seconds of one KDA token mixer forward + backward (for the Amdahl breakdown)."""
    x = x_btd.clone().requires_grad_(True)
    t0 = time.perf_counter()
    y = layer(x)
    (y[0] if isinstance(y, tuple) else y).sum().backward()
    dt = time.perf_counter() - t0
    layer.zero_grad(set_to_none=True)
    return dt


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="f1")
    ap.add_argument("--vocab", type=int, default=0, help="override the preset's vocab size (0: keep)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds before the first repeat")
    ap.add_argument("--repeats", type=int, default=3, help="RESULT = median over this many repeats of the rounds")
    ap.add_argument("--threads", type=int, default=0)
    add_host_memory_flag(ap)
    args = ap.parse_args(argv)
    apply_host_memory_flag(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    cfg = as_model_config(OmegaConf.load(CONFIGS / f"{args.preset}.yaml"))
    cfg.residual.mode, cfg.residual.num_blocks, cfg.residual.block_size = "prenorm", None, None
    if args.vocab:
        cfg.vocab_size = args.vocab
    ours, hf = build_pair(cfg)
    opts = {"ours": make_optimizer(ours), "hf": make_optimizer(hf)}
    models = {"ours": ours, "hf": hf}
    steps = {"ours": step_ours, "hf": step_hf}

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        diff = (ours(x) - hf(input_ids=x, use_cache=False).logits).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"converted weights do not reproduce our logits (max |diff| {diff:.2e}); not comparable")

    kda_idx = [i for i in range(cfg.num_layers) if i not in set(cfg.mla_layers)]
    kda_layers = {"ours": ours.model.layers[kda_idx[0]].self_attn, "hf": hf.model.layers[kda_idx[0]].self_attn}
    h = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=g)
    tokens = args.batch * args.seq
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"device: {cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()} | "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"preset={args.preset} d={cfg.hidden_size} layers={cfg.num_layers} experts={cfg.moe.num_experts} "
        f"top{cfg.moe.top_k} vocab={cfg.vocab_size} params={n_params / 1e6:.1f}M batch={args.batch} "
        f"seq={args.seq} rounds={args.rounds} repeats={args.repeats} fp32 "
        f"AdamW(fused={opts['ours'].defaults.get('fused')})"
    )
    ours_chunk = cfg.kda.chunk_size or torch_default_chunk(cfg.kda.head_dim)  # null: the torch core's own
    print(
        f"transformers: attn={hf.config._attn_implementation} experts={hf.config._experts_implementation} "
        f"KDA=torch fallback (chunk 64); ours: KDA torch chunked (chunk {ours_chunk})"
    )
    print(f"weights check: max |logits ours - transformers| = {diff:.2e}")
    flops = train_flops_per_token(cfg, args.seq) * tokens
    reps = []
    for rep in range(args.repeats):
        data = run_rounds(args, models, opts, steps, kda_layers, x, y, h, args.warmup if rep == 0 else 0)
        print(f"repeat {rep + 1}/{args.repeats}")
        reps.append(report(data, tokens, flops, len(kda_idx)))
    headline(reps)


def run_rounds(args, models, opts, steps, kda_layers, x, y, h, warmup):
    """Alternating steps (order flips every round), the matmul probe at the start of each round; the
    measured rounds' lists are aligned by round.

    The timed steps run as the trainer's do: freed host memory stays in the process (``keep_freed_host_memory``),
    so a step reuses the heap of the step before. Peak memory needs the opposite (``malloc_trim`` before the
    step, or the kept heap hides what the step adds), so it is measured in steps of its own, untimed, after the
    timed rounds, followed by one untimed step per model that grows the heap back before the next timed round.
    Trimming before every timed step charged each step the page faults of its whole working set again (f1:
    ~1 s of a ~2.5 s step on this box), a cost the trainer does not pay."""
    times = {k: [] for k in models}
    cpu = {k: [] for k in models}
    kda_times = {k: [] for k in models}
    mem = {k: [] for k in models}
    peak = PeakRSS()
    probe = []
    for r in range(warmup + args.rounds):
        flops = matmul_probe(1024, torch.device("cpu"), torch.float32)
        for k in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
            t0, c0 = time.perf_counter(), time.process_time()
            steps[k](models[k], opts[k], x, y)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:  # the first step also allocates the optimizer state: not a step cost
                times[k].append(dt)
                cpu[k].append(dc)
        for k in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
            t = kda_layer_time(kda_layers[k], h)
            if r >= warmup:
                kda_times[k].append(t)
        if r >= warmup:
            probe.append(flops)
    for k in models:  # peak step memory: a trimmed heap, so the step's own allocations show in VmHWM
        with peak:
            steps[k](models[k], opts[k], x, y)
        mem[k].append(peak.delta_kb)
    for k in models:  # untimed: the heap grows back to what the timed steps of the next repeat reuse
        steps[k](models[k], opts[k], x, y)
    return {"times": times, "cpu": cpu, "kda": kda_times, "mem": mem, "probe": probe}


def report(data, tokens, flops, n_kda):
    """Print one repeat's figures; return its headline numbers."""
    times, cpu, kda_times, mem, probe = (data[k] for k in ("times", "cpu", "kda", "mem", "probe"))
    models = list(times)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in med.items()}
    pair_ratios = [h / o for o, h in zip(times["ours"], times["hf"])]
    for k in models:
        m = [v for v in mem[k] if v is not None]
        mem_s = f"peak step memory {max(m) / 1024:8.1f} MiB" if m else "peak step memory n/a"
        print(
            f"  {k:5s} median step {med[k]:8.3f} s  (min {min(times[k]):.3f}, "
            f"cpu {statistics.median(cpu[k]):.3f})  {tps[k]:9.1f} tokens/s  {mem_s}"
        )
    print(
        f"  per-round hf/ours step-time ratios: {', '.join(f'{r:.1f}' for r in pair_ratios)} -> median "
        f"{statistics.median(pair_ratios):.2f} x (ratio of the medians: {tps['ours'] / tps['hf']:.2f} x; of the "
        f"cpu-time medians: {statistics.median(cpu['hf']) / statistics.median(cpu['ours']):.2f} x)"
    )
    # Amdahl: both models run the same kind of code outside KDA (grouped_mm experts, SDPA MLA, LM head, AdamW),
    # so the step time left after the KDA mixers bounds the ratio any KDA speed-up can reach.
    kda_med = {k: statistics.median(v) for k, v in kda_times.items()}
    rest = {k: med[k] - n_kda * kda_med[k] for k in models}
    share = {k: n_kda * kda_med[k] / med[k] for k in models}
    print(
        f"  KDA mixer fwd+bwd per layer: ours {kda_med['ours'] * 1e3:.0f} ms, hf {kda_med['hf'] * 1e3:.0f} ms "
        f"({kda_med['hf'] / kda_med['ours']:.1f} x); x{n_kda} layers = {share['ours']:.0%} of our step, "
        f"{share['hf']:.0%} of hf's"
    )
    print(
        f"  step time outside the KDA mixers: ours {rest['ours']:.2f} s, hf {rest['hf']:.2f} s -> ratio ceiling "
        f"with a zero-cost KDA: {med['hf'] / max(rest['ours'], 1e-9):.1f} x"
    )
    # Roofline: our model's training FLOPs per step at 100% of the matmul throughput measured in this round. No
    # implementation of this configuration can step faster, so hf's step over this bounds any ratio. MFU per
    # round (the round's probe: a slow phase of the shared machine slows both), median over rounds.
    mfu_rounds = [flops / p / t for t, p in zip(times["ours"], probe)]
    ceil_rounds = [t * p / flops for t, p in zip(times["hf"], probe)]
    probe_med = statistics.median(probe)
    print(
        f"  roofline: {flops / 1e9:.1f} GFLOP per training step, matmul probe 1024^3 median "
        f"{probe_med / 1e9:.1f} GFLOP/s (min {min(probe) / 1e9:.1f}, max {max(probe) / 1e9:.1f}) -> no step below "
        f"{flops / probe_med:.3f} s; ours MFU per round {', '.join(f'{100 * m:.0f}' for m in mfu_rounds)} % -> "
        f"median {100 * statistics.median(mfu_rounds):.1f} %; ratio ceiling at 100% MFU: "
        f"{statistics.median(ceil_rounds):.1f} x"
    )
    out = {
        "ours_mfu": 100 * statistics.median(mfu_rounds),
        "ratio_ceiling_at_full_mfu": statistics.median(ceil_rounds),
        "ours_tokens_per_s": tps["ours"],
        "hf_tokens_per_s": tps["hf"],
        "ours_over_hf_tokens_per_s": statistics.median(pair_ratios),
        "ours_over_hf_cpu_time": statistics.median(cpu["hf"]) / statistics.median(cpu["ours"]),
        "ours_over_hf_kda_layer": kda_med["hf"] / kda_med["ours"],
    }
    if all(v is not None for k in mem for v in mem[k]):
        for k in models:
            out[f"{k}_peak_step_memory"] = max(mem[k]) / 1024
    return out


UNITS = {"ours_mfu": "%", "ours_tokens_per_s": "tokens/s", "hf_tokens_per_s": "tokens/s"}


def headline(reps):
    """RESULT lines: the median over repeats with the spread (peak memory: the largest over repeats).

    The headline ratio is the median of per-round ratios (each round times both models back to back, so a slow
    phase of the shared machine hits both); the ratio of the medians is printed above for comparison."""
    for key in reps[0]:
        vals = [r[key] for r in reps]
        if key.endswith("peak_step_memory"):
            print(f"RESULT {key} {max(vals):.1f} MiB (min {min(vals):.1f} .. max {max(vals):.1f}, n={len(vals)})")
            continue
        unit = UNITS.get(key, "x")
        print(
            f"RESULT {key} {statistics.median(vals):.2f} {unit} "
            f"(min {min(vals):.2f} .. max {max(vals):.2f}, n={len(vals)})"
        )


if __name__ == "__main__":
    main()
