"""Metrics: throughput/MFU bookkeeping, AttnRes depth statistics, and the sinks (console, train.log, jsonl, W&B,
TensorBoard).

MFU needs a peak that does not move with the machine's load: configured, a known-GPU table, or a CPU probe
measured once per machine and cached (:func:`resolve_peak`; docs/training.md, "Metrics").

Only rank 0 writes. Every record is one flat-ish JSON object with a ``step`` and a ``kind`` (train, val,
sample, depth, event), so ``RUN_DIR/metrics.jsonl`` can be loaded line by line by the analysis tools.

The console gets one readable line per record (fixed formats, never a raw 16-digit float) and the trainer's
messages; the same lines, time-stamped, go to ``RUN_DIR/train.log`` through :mod:`logging`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

GPU_PEAK_BF16 = {  # dense bf16 tensor-core peak per device, FLOP/s
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}
PEAK_CACHE_FILE = "peak_flops.json"  # under peak_cache_dir(): {machine key: FLOP/s}


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
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def peak_cache_dir() -> Path:
    """``$ATTNRES_TRAIN_CACHE``, else ``$XDG_CACHE_HOME/attnres-train``, else ``~/.cache/attnres-train``."""
    if os.environ.get("ATTNRES_TRAIN_CACHE"):
        return Path(os.environ["ATTNRES_TRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnres-train"


def cpu_machine_key() -> str:
    """What a CPU peak depends on: the CPU model, this process's torch threads and the torch version."""
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:  # pragma: no cover - not Linux
        pass
    return f"{model} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cached_cpu_peak(cache_dir: Path, measure=measure_cpu_matmul_flops) -> Tuple[float, str]:
    """(FLOP/s, label): the peak stored for this machine key, or one probe stored for every later run.

    Why a cache: a probe at start-up under whatever load the machine has gave the same model an MFU of 0.0013
    in one run and 0.79 in another; one stored value makes runs on one machine comparable.
    """
    path = Path(cache_dir) / PEAK_CACHE_FILE
    key = cpu_machine_key()
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        table = {}
    if not isinstance(table, dict):
        table = {}
    value = table.get(key)
    if isinstance(value, (int, float)) and value > 0:
        return float(value), f"probe (cached {path})"
    value = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**table, key: value}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # atomic: ranks probing at once each write a whole file
    except OSError as exc:
        return value, f"probe (not cached: {exc.strerror or exc})"
    return value, f"probe (cached {path}, new)"


def resolve_peak(
    device: torch.device, configured: float, cache_dir: Optional[Path] = None, probe: bool = True
) -> Tuple[float, str]:
    """(peak FLOP/s of one device, where it came from) for MFU; 0.0 when unknown (MFU is then not reported).

    Sources in order: ``trainer.peak_flops`` ("configured"), :data:`GPU_PEAK_BF16` ("table:<name>"), on CPU the
    cached probe (:func:`cached_cpu_peak`). ``probe=False`` (ranks other than 0, which log no MFU): no CPU probe,
    so ranks probing at once do not slow each other's measurement down. docs/training.md, "Metrics".
    """
    if configured > 0:
        return float(configured), "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in GPU_PEAK_BF16.items():
            if key in name:
                return val, f"table:{key}"
        return 0.0, f"unknown: {name!r} is not in the table, set trainer.peak_flops"
    if device.type != "cpu":
        return 0.0, f"unknown: no peak for {device.type}, set trainer.peak_flops"
    if not probe:
        return 0.0, "not probed on this rank (rank 0 reports MFU)"
    return cached_cpu_peak(peak_cache_dir() if cache_dir is None else cache_dir)


def describe_peak(flops: float, source: str) -> str:
    """The header's words for the MFU peak: ``MFU peak 1.2 TFLOP/s (probe (cached ...))``."""
    return f"MFU peak {flops / 1e12:.4g} TFLOP/s ({source})" if flops > 0 else f"MFU not reported ({source})"


def peak_flops(device: torch.device, configured: float) -> float:
    """The peak alone (bench/gpu_check.py); see :func:`resolve_peak`."""
    return resolve_peak(device, configured)[0]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss_kb / 2**20


@torch.no_grad()
def depth_statistics(model, input_ids: torch.Tensor, **doc_kwargs) -> Optional[Dict[str, list]]:
    """Per-sublayer entropy (nats) and mean weight per source of the AttnRes depth attention.

    ``doc_kwargs``: ``doc_ids=...`` when training with document masking (the same forward as training)."""
    weights = model.depth_attention(input_ids, **doc_kwargs)
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
    """Tiny sampler for log samples (no KV cache: short generations on small models only); picks only ids below
    ``tokenizer.vocab_size``."""
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    x = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(max_new_tokens):
        # only ids the tokenizer can decode (model.vocab_size may be larger: ConsoleWarnings says so at start-up)
        logits = model(x)[0, -1, : tokenizer.vocab_size].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        if nxt == tokenizer.eos_id:
            break
        x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return tokenizer.decode(x[0, len(ids) :].tolist())


RUN_LOGGER = "attnres_train.run"  # the console + RUN_DIR/train.log logger (rank 0; does not propagate)


class _NotRecords(logging.Filter):
    """With ``logging.console=false`` the console keeps the trainer's messages but not the per-record lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "metrics_record", False)


def process_start_time() -> float:
    """Wall-clock time this process started (Linux /proc); now, where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):  # pragma: no cover - not Linux
        return time.time()


def _duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _value(v) -> str:
    """Compact text for a logged value: floats with 4 significant digits (scientific when tiny or huge)."""
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.3e}"
    return f"{v:.4g}"


# (key, label, format) of the train line, in order; a key absent from the record is left out
_TRAIN_FIELDS = (
    ("loss", "loss", lambda v: f"{v:.4f}"),
    ("lr", "lr", lambda v: f"{v:.2e}"),
    ("grad_norm", "grad", _value),
    ("s_per_step", None, lambda v: f"{v:.3g} s/step"),
    ("tokens_per_s", None, lambda v: f"{v:,.0f} tok/s"),
    ("tokens_seen", "tokens", _count),
    ("elapsed_s", "elapsed", _duration),
    ("eta_s", "ETA", _duration),
    ("mfu", "mfu", lambda v: f"{100 * v:.2f}%"),
    ("peak_mem_gb", "mem", lambda v: f"{v:.2f} GB"),
    ("expert_imbalance_max", "imbalance", lambda v: f"{v:.2f}"),
)


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of ``run_dir``: read from RUN_DIR/wandb_run_id, or made and stored there on the first start.

    Why: without an id every launch (each resume after a preemption) created a new W&B run. With it, a resumed
    run logs into the same W&B run (``resume="allow"``), online or offline (``wandb sync`` then merges).
    """
    import secrets

    f = Path(run_dir) / WANDB_ID_FILE
    if f.is_file():
        run_id = f.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], like wandb's own ids
    tmp = f.with_name(f"{f.name}.tmp-{os.getpid()}")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, f)
    return run_id


class TextSink:
    """Console (stdout) and RUN_DIR/train.log through one ``logging`` logger; ``console=False`` keeps only the
    trainer's messages on the console (records still go to train.log)."""

    def __init__(self, run_dir: Path, console: bool):
        self._log = logging.getLogger(RUN_LOGGER)
        self._drop_handlers()
        self._log.setLevel(logging.INFO)
        self._log.propagate = False  # Hydra's root handler would print every line twice
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(logging.Formatter("%(message)s"))
        if not console:
            out.addFilter(_NotRecords())
        to_file = logging.FileHandler(run_dir / "train.log", mode="a", encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self._log.addHandler(out)
        self._log.addHandler(to_file)

    def _drop_handlers(self) -> None:
        for h in list(self._log.handlers):
            self._log.removeHandler(h)
            h.close()

    def info(self, message: str) -> None:
        self._log.info(message)

    def to_file(self, message: str) -> None:
        for h in self._log.handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(self._log.makeRecord(self._log.name, logging.ERROR, "", 0, message, None, None))

    def write(self, rec: dict, line: Optional[str]) -> None:
        if line is not None:
            self._log.info(line, extra={"metrics_record": True})

    def close(self) -> None:
        self._drop_handlers()


class JsonlSink:
    """RUN_DIR/metrics.jsonl: one JSON object per record, flushed at once."""

    def __init__(self, run_dir: Path):
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, rec: dict, line: Optional[str]) -> None:
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """Weights & Biases: the numeric values as ``kind/name`` (plus depth entropies and sample text), one W&B run
    per run_dir across resumes (:func:`wandb_run_id`)."""

    def __init__(self, run_dir: Path, wb, config_dict: Optional[dict]):
        import wandb  # optional dependency: only with logging.wandb.mode != disabled

        os.environ.setdefault("WANDB_DIR", str(run_dir))
        self.run_id = wandb_run_id(run_dir)
        self._run = wandb.init(
            project=wb.project,
            entity=wb.entity,
            name=wb.name,
            tags=list(wb.tags),
            mode=wb.mode,
            config=config_dict,
            dir=str(run_dir),
            id=self.run_id,
            resume="allow",
        )

    def write(self, rec: dict, line: Optional[str]) -> None:
        flat: Dict[str, object] = dict(scalars(rec))
        if rec["kind"] == "sample":
            flat["sample/text"] = rec.get("text", "")
        self._run.log(flat, step=rec["step"])

    def close(self) -> None:
        self._run.finish()


def scalars(rec: dict) -> Dict[str, float]:
    """A record's finite numbers as ``kind/name`` (depth entropies as ``depth/entropy_sub<j>``): what W&B and
    TensorBoard plot."""
    kind = rec["kind"]
    values = {k: v for k, v in rec.items() if k not in ("kind", "step", "time")}
    flat = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if kind == "depth":
        for j, e in enumerate(values.get("depth_entropy", [])):
            flat[f"depth/entropy_sub{j}"] = e
    return flat


class TensorBoardSink:
    """TensorBoard event files in RUN_DIR/tensorboard/ (``logging.tensorboard``): :func:`scalars` of every record
    at its step, sample text as text.

    A resumed run purges the steps after its checkpoint from the earlier event files (``purge_step``), so steps
    that ran before a crash and run again after the resume are shown once. The writer opens at the first value.
    """

    def __init__(self, run_dir: Path):
        self._dir = str(run_dir / "tensorboard")
        self._writer = None
        self._purge_step: Optional[int] = None

    def write(self, rec: dict, line: Optional[str]) -> None:
        if rec["kind"] == "event" and rec.get("event") == "resumed" and self._writer is None:
            self._purge_step = rec["step"] + 1
        values = scalars(rec)
        text = rec.get("text") if rec["kind"] == "sample" else None
        if not values and text is None:
            return
        if self._writer is None:
            # optional dependency (the tensorboard package): checked by the config (logging.tensorboard)
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self._dir, purge_step=self._purge_step)
        for tag, v in values.items():
            self._writer.add_scalar(tag, v, global_step=rec["step"], walltime=rec["time"])
        if text is not None:
            self._writer.add_text("sample/text", text, global_step=rec["step"], walltime=rec["time"])
        self._writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MetricsLogger:
    """Fan-out of records to the sinks (rank 0 only): :class:`TextSink` (console, train.log), :class:`JsonlSink`
    (``logging.jsonl``), :class:`WandbSink` (``logging.wandb``) and :class:`TensorBoardSink`
    (``logging.tensorboard``).

    ``total_steps``: the N of ``step k/N`` (the trainer sets it to the step the run stops at).
    """

    def __init__(self, run_dir: Path, logging_cfg, enabled: bool, config_dict: Optional[dict] = None):
        self.enabled = enabled
        self.total_steps: Optional[int] = None
        self.wandb_run_id: Optional[str] = None
        self._text: Optional[TextSink] = None
        self.sinks: list = []
        if not enabled:
            return
        self._text = TextSink(run_dir, logging_cfg.console)
        self.sinks.append(self._text)
        if logging_cfg.jsonl:  # first: a record reaches metrics.jsonl even if printing it fails
            self.sinks.insert(0, JsonlSink(run_dir))
        if logging_cfg.wandb.mode != "disabled":
            wb = WandbSink(run_dir, logging_cfg.wandb, config_dict)
            self.wandb_run_id = wb.run_id
            self.sinks.append(wb)
        if logging_cfg.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir))

    def info(self, message: str) -> None:
        """A trainer message (header, resume, stop): console and train.log, whatever ``logging.console`` says."""
        if self._text is not None:
            self._text.info(message)

    def to_file(self, message: str) -> None:
        """A line for train.log only (the command line prints it on stderr itself)."""
        if self._text is not None:
            self._text.to_file(message)

    def log(self, kind: str, step: int, echo: bool = True, **values) -> None:
        """One record to every sink; ``echo=False``: not to the console / train.log (jsonl and W&B only)."""
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        line = self._format(rec, self.total_steps) if echo else None
        for sink in self.sinks:
            sink.write(rec, line)

    @staticmethod
    def step_label(step: int, total: Optional[int] = None) -> str:
        return f"[step {step:>{len(str(total))}}/{total}]" if total else f"[step {step:>6}]"

    @staticmethod
    def _format(rec: dict, total: Optional[int] = None) -> str:
        kind, step = rec["kind"], rec["step"]
        head = MetricsLogger.step_label(step, total)
        if kind == "train":
            parts = [
                (f"{label} " if label else "") + fmt(rec[key])
                for key, label, fmt in _TRAIN_FIELDS
                if isinstance(rec.get(key), (int, float))
            ]
            return f"{head} " + " | ".join(parts) + (" | skipped (non-finite)" if rec.get("skipped") else "")
        if kind == "val":
            return f"{head} " + " | ".join(
                f"{k} {_value(float(v))}" for k, v in rec.items() if k not in ("kind", "step", "time")
            )
        if kind == "depth":
            ent: List[float] = rec.get("depth_entropy", [])
            return f"{head} depth entropy per sublayer: " + " ".join(f"{e:.2f}" for e in ent)
        if kind == "sample":
            return f"{head} sample: {rec.get('text', '')!r}"
        body = " ".join(f"{k}={_value(v)}" for k, v in rec.items() if k not in ("kind", "step", "time", "event"))
        name = f"{kind} {rec['event']}" if kind == "event" and "event" in rec else kind
        return f"{head} {name}" + (f": {body}" if body else "")

    def close(self) -> None:
        # the text sink last: a failing W&B finish is still reported in train.log
        for sink in sorted(self.sinks, key=lambda s: s is self._text):
            sink.close()
        self.sinks, self._text = [], None
