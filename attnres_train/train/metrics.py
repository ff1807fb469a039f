"""Metrics: throughput/MFU bookkeeping, AttnRes depth statistics, and the console / jsonl / W&B sinks.

Only rank 0 writes. Every record is one flat-ish JSON object with a ``step`` and a ``kind`` (train, val,
sample, depth, event), so ``RUN_DIR/metrics.jsonl`` can be loaded line by line by the analysis tools.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

GPU_PEAK_BF16 = {  # dense bf16 tensor-core peak per device, FLOP/s
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def measure_cpu_matmul_flops(n: int = 1024, trials: int = 5, seconds: float = 0.1) -> float:
    """Best fp32 matmul throughput of this process over a few short trials (the denominator of CPU MFU).

    The best trial, not the mean: other processes only ever slow a trial down, and an underestimated peak
    would report an MFU above 1.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, configured: float) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in GPU_PEAK_BF16.items():
            if key in name:
                return val
        return 0.0
    return measure_cpu_matmul_flops()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss_kb / 2 ** 20


@torch.no_grad()
def depth_statistics(model, input_ids: torch.Tensor) -> Optional[Dict[str, list]]:
    """Per-sublayer entropy (nats) and mean weight per source of the AttnRes depth attention."""
    weights = model.depth_attention(input_ids)
    if not weights:
        return None
    entropy, mean_w = [], []
    for w in weights:  # [n, B, T]
        p = w.float().clamp_min(1e-30)
        entropy.append(round(float(-(p * p.log()).sum(0).mean()), 5))
        mean_w.append([round(float(x), 5) for x in w.float().mean(dim=(1, 2))])
    return {"depth_entropy": entropy, "depth_mean_weights": mean_w}


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, device, seed: int = 0) -> str:
    """Tiny sampler for log samples (no KV cache: short generations on small models only)."""
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    x = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = model(x)[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        if nxt == tokenizer.eos_id:
            break
        x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return tokenizer.decode(x[0, len(ids):].tolist())


class MetricsLogger:
    """Fan-out of records to the console, RUN_DIR/metrics.jsonl and Weights & Biases (rank 0 only)."""

    def __init__(self, run_dir: Path, logging_cfg, enabled: bool, config_dict: Optional[dict] = None):
        self.enabled = enabled
        self.console = logging_cfg.console
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        if logging_cfg.jsonl:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        wb = logging_cfg.wandb
        if wb.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            self._wandb = wandb.init(project=wb.project, entity=wb.entity, name=wb.name, tags=list(wb.tags),
                                     mode=wb.mode, config=config_dict, dir=str(run_dir), resume="allow")

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()
        if self.console:
            print(self._format(rec), file=sys.stdout, flush=True)
        if self._wandb is not None:
            flat = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            if kind == "depth":
                for j, e in enumerate(values.get("depth_entropy", [])):
                    flat[f"depth/entropy_sub{j}"] = e
            if kind == "sample":
                flat["sample/text"] = values.get("text", "")
            self._wandb.log(flat, step=step)

    @staticmethod
    def _format(rec: dict) -> str:
        kind, step = rec["kind"], rec["step"]
        if kind == "train":
            keys = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb", "expert_imbalance_max")
            parts = [f"{k}={rec[k]:.4g}" for k in keys if k in rec]
            return f"[step {step:>6}] " + " ".join(parts)
        if kind == "depth":
            ent: List[float] = rec.get("depth_entropy", [])
            return f"[step {step:>6}] depth entropy per sublayer: " + " ".join(f"{e:.2f}" for e in ent)
        if kind == "sample":
            return f"[step {step:>6}] sample: {rec.get('text', '')!r}"
        body = " ".join(f"{k}={v}" for k, v in rec.items() if k not in ("kind", "step", "time"))
        return f"[step {step:>6}] {kind}: {body}"

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
