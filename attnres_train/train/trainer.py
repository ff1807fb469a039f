"""The Trainer owns the loop: data, resume, the step, stop signals, and the callbacks that run after a step.

Why this split: how a step is computed (and over which ranks) is the TrainModule's and its step engine's job;
what happens around it (metrics line, NaN/Inf policy, depth statistics, validation, samples, checkpoint
cadence) is one callback each (``callbacks.py``). The Trainer reads only the ParallelContext's ranks and data
slice. docs/training.md ("The training loop", "Callbacks", "Faults") has the details.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from ..checkpoint import CheckpointManager, CheckpointSaveError, check_fresh_start, verify_checkpoint
from ..config.errors import ConfigError, UserInputError
from ..data.loader import build_datasets
from ..model import build_model
from ..model.flops import count_params, train_flops_per_token
from ..parallel.mesh import ParallelContext
from ..parallel.state_dict import load_training_state_dict, training_state_dict
from .callbacks import StepEnd, TrainerCallback, default_callbacks
from .faults import (
    SIGINT_EXIT_CODE,
    StopSignals,
    TrainingAborted,
    comm_failure_message,
    is_comm_failure,
    write_rank_log,
)
from .host_memory import keep_freed_host_memory
from .metrics import MetricsLogger, describe_peak, process_start_time, resolve_peak
from .run_dir import check_run_dir
from .threads import apply_num_threads
from .train_module import build_train_module, document_masking_eos
from .validation import validation_metrics

# Config sections that must not change when resuming (the checkpoint's tensors depend on them).
RESUME_LOCKED = ("model",)


def _diff(a, b, prefix=""):
    """Dotted paths where two plain nested dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        p = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], p)
        elif a.get(k) != b.get(k):
            out.append(f"{p}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}")
    return out


class Trainer:
    def __init__(self, cfg, run_dir: Path, ctx: ParallelContext, callbacks: Optional[Sequence[TrainerCallback]] = None):
        """``ctx``: the run's ParallelContext, built from ``cfg.parallel`` by the command line
        (``cli.train.parallel_context``), or ``parallel.mesh.single_process_context()``. ``callbacks``: run after
        the built-ins (``callbacks.default_callbacks``) after every step. A failure while building (not bad
        input) leaves this rank's traceback in RUN_DIR/logs/rank<k>.log when run_dir exists, as one in ``fit``."""
        try:
            self._build(cfg, run_dir, ctx, callbacks)
        except Exception as exc:
            if not isinstance(exc, (ConfigError, UserInputError)) and Path(run_dir).is_dir():
                write_rank_log(Path(run_dir), getattr(ctx, "rank", 0), exc)
            raise

    def _build(self, cfg, run_dir: Path, ctx: ParallelContext, callbacks: Optional[Sequence[TrainerCallback]]) -> None:
        t_init = time.perf_counter()
        self.cfg = cfg  # the typed Config object (attnres_train.config.schema.Config)
        self.run_dir = Path(run_dir)
        if not isinstance(ctx, ParallelContext):
            raise TypeError(f"Trainer needs a ParallelContext (attnres_train.parallel.mesh), got {type(ctx)}")
        self.ctx = ctx
        tc = cfg.trainer
        if ctx.device.type == "cpu" and tc.keep_host_memory:
            keep_freed_host_memory()
        self.num_threads, self._threads_from = apply_num_threads(tc.num_threads)
        self.max_steps = tc.max_steps
        self.step = 0
        self.tokens_seen = 0

        check_run_dir(self.run_dir)
        # before anything is written: never start over checkpoints that might be the only copy (checkpoint.overwrite)
        check_fresh_start(self.run_dir / "checkpoints", cfg.checkpoint.resume, cfg.checkpoint.overwrite)
        # the checkpoint to resume: found, verified and its config compared now, before anything is written
        self._resume_from = self._check_resume()
        self.config_text = OmegaConf.to_yaml(OmegaConf.structured(cfg))

        t_data = time.perf_counter()
        self.data = build_datasets(cfg.data, model_vocab_size=cfg.model.vocab_size, progress=ctx.is_main)
        t_model = time.perf_counter()
        torch.manual_seed(cfg.seed)
        # Built on ``meta`` (no rank ever holds the whole model): the TrainModule parallelizes it (EP -> TP ->
        # AC -> compile -> FSDP, per pipeline stage with pp) and materialises only this rank's shards, initialised
        # from ``seed`` to exactly the values one process would have (attnres_train.model.init).
        self.model = build_model(cfg.model, device="meta")
        self.module = build_train_module(
            self.model, cfg, ctx, self.max_steps, doc_eos_id=document_masking_eos(cfg.data, self.data.tokenizer)
        )
        # With pipeline parallelism: this rank's stages under the full model's parameter names (checkpoints
        # stay layout independent); otherwise the parallelized model itself.
        self.model = self.module.model
        # wall-clock start of the process (imports, Hydra) and the trainer's phases, for the header
        self.process_start = process_start_time()
        self._startup = {
            "process": self.process_start,
            "before": t_init,
            "data": t_model - t_data,
            "model": time.perf_counter() - t_model,
        }
        self.sampler = self.data.train_sampler(tc.global_batch_size, ctx.dp_rank, ctx.dp_size)
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints",
            cfg.checkpoint.keep_last,
            rank=ctx.rank,
            world_size=ctx.world_size,
            barrier=ctx.barrier if ctx.is_distributed else None,
            async_save=cfg.checkpoint.async_save,
            timeout_s=tc.dist_timeout_s,
        )
        self.logger = MetricsLogger(
            self.run_dir,
            cfg.logging,
            enabled=ctx.is_main,
            config_dict=OmegaConf.to_container(OmegaConf.structured(cfg)),
        )
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        # MFU's denominator and where it came from (only rank 0 logs MFU, so only rank 0 runs a CPU probe)
        self.peak, self.peak_source = resolve_peak(ctx.device, tc.peak_flops, probe=ctx.is_main)
        self.activity = "start-up"  # what the ranks are doing, for the message if a collective fails
        self.stop_signal: Optional[str] = None  # the signal that stopped fit() early (SIGTERM, SIGUSR1, SIGINT)
        self.callbacks: List[TrainerCallback] = default_callbacks(cfg) + list(callbacks or ())

    # -- checkpoint state ------------------------------------------------------------------------
    def _state(self):
        model_sd, optim_sd = training_state_dict(self.model, self.module.optimizers)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, blocking: bool = True) -> Path:
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": self.sampler.state_dict(),
            "world_size": self.ctx.world_size,
            "parallel": self.ctx.dims.describe(),
            "layout": dataclasses.asdict(self.ctx.dims),
        }
        try:
            path = self.ckpt.save(self.step, self._state(), config_text=self.config_text, meta=meta, blocking=blocking)
        except CheckpointSaveError as exc:  # disk full, I/O error: partial dir removed, older checkpoints intact
            raise TrainingAborted(f"step {self.step}: {exc}") from None
        self.logger.log("event", self.step, event="checkpoint", path=str(path), **({} if blocking else {"async": True}))
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.step, path)
        return path

    def _check_resume(self):
        """(checkpoint dir, its verified meta) to resume from, or None; bad input raises before any write."""
        path = CheckpointManager(self.run_dir / "checkpoints", 1).resolve(self.cfg.checkpoint.resume, report=False)
        if path is None:
            return None
        meta = verify_checkpoint(path)  # every file against the manifest before anything is read from it
        old = OmegaConf.to_container(OmegaConf.create(CheckpointManager.read_config_text(path)))
        new = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        for section in RESUME_LOCKED:
            diffs = _diff(old.get(section, {}), new.get(section, {}), section)
            if diffs:
                raise ConfigError(
                    diffs[0].split(":")[0],
                    f"incompatible with the checkpoint {path}: "
                    + "; ".join(diffs[:3])
                    + " (start a new run_dir or restore the setting)",
                )
        return path, meta

    def maybe_resume(self) -> Optional[Path]:
        stale = self.ckpt.stale()
        if stale and self.ctx.is_main:
            names = ", ".join(p.name for p in stale)
            self.logger.info(
                f"ignoring {len(stale)} incomplete checkpoint dir(s) left by interrupted saves: {names} "
                "(never loaded; removed by the next save)"
            )
            self.logger.log("event", self.step, event="ignored_incomplete_checkpoints", dirs=[p.name for p in stale])
        if self._resume_from is None:
            return None
        path, meta = self._resume_from
        base_lrs = [[g["base_lr"] for g in opt.param_groups] for opt in self.module.optimizers]
        state = self._state()
        meta = self.ckpt.load(path, state, meta=meta)
        load_training_state_dict(self.model, self.module.optimizers, state["model"], state["optim"])
        for opt, lrs in zip(self.module.optimizers, base_lrs):  # the config's LR wins over the saved one
            for g, lr in zip(opt.param_groups, lrs):
                g["base_lr"] = lr
        self.sampler.load_state_dict(meta["data"])
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        saved_layout = meta.get("parallel", "?")
        if self.ctx.is_main and saved_layout != self.ctx.dims.describe():
            self.logger.info(
                f"resuming {path.name} saved with {meta.get('world_size')} rank(s) [{saved_layout}] under "
                f"{self.ctx.world_size} rank(s) [{self.ctx.dims.describe()}]: model and optimizer state resharded; "
                f"data continues at global sample {meta['data'].get('consumed_samples')} ({self.tokens_seen:,} tokens)"
            )
        self.logger.log(
            "event", self.step, event="resumed", path=str(path), tokens_seen=self.tokens_seen, from_layout=saved_layout
        )
        return path

    def _header(self, resume_s: float) -> None:
        """The run's first lines (rank 0): where, what, how many threads, how long start-up took."""
        counts = count_params(self.cfg.model)
        up = self._startup
        total = time.time() - up["process"]
        imports = max(0.0, total - (time.perf_counter() - up["before"]))
        self.logger.info(
            f"run_dir {self.run_dir} | {self.ctx.describe()} | params total {counts.total:,} active "
            f"{counts.active:,} | {self.data.describe()}"
        )
        self.logger.info(
            f"threads {torch.get_num_threads()} per process ({self._threads_from}) | start-up "
            f"{total:.1f} s (imports and config {imports:.1f} s, data {up['data']:.1f} s, model "
            f"{up['model']:.1f} s, resume {resume_s:.1f} s) | {describe_peak(self.peak, self.peak_source)}"
        )
        self.logger.log(
            "event",
            self.step,
            echo=False,
            event="start",
            num_threads=torch.get_num_threads(),
            threads_from=self._threads_from,
            startup_s=round(total, 3),
            peak_flops=self.peak,
            peak_source=self.peak_source,
        )

    def wait_for_saves(self) -> None:
        try:
            self.ckpt.wait()
        except CheckpointSaveError as exc:  # a background save failed
            raise TrainingAborted(f"step {self.step}: {exc}") from None

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``trainer.max_steps`` (or ``stop_at``, or a stop signal); returns the last step's metrics."""
        with StopSignals(self.ctx.rank) as signals:
            try:
                return self._loop(signals)
            except BaseException as exc:
                # each rank's traceback in RUN_DIR/logs/rank<k>.log; not for bad input (one line, nothing written)
                # nor a second Ctrl-C
                if isinstance(exc, Exception) and not isinstance(exc, (ConfigError, UserInputError)):
                    write_rank_log(self.run_dir, self.ctx.rank, exc)
                if self.ctx.is_distributed and is_comm_failure(exc):
                    newest = self.ckpt.latest(report=False)
                    exc = TrainingAborted(
                        comm_failure_message(exc, self.ctx.rank, self.activity, self.cfg.trainer.dist_timeout_s, newest)
                    )
                    self._log_end(exc)
                    raise exc from None
                self._log_end(exc)
                raise
            finally:
                self.sampler.close()
                self.logger.close()

    def _log_end(self, exc: BaseException) -> None:
        """train.log gets the line the command line prints on stderr for a run that ends in an error."""
        if isinstance(exc, (TrainingAborted, UserInputError, ConfigError)):
            self.logger.to_file(f"error: {exc}")
        elif isinstance(exc, KeyboardInterrupt):
            self.logger.to_file("error: interrupted (Ctrl-C): stopped at once without saving")

    def _loop(self, signals: StopSignals) -> dict:
        cfg, tc = self.cfg, self.cfg.trainer
        self.activity = "the resume"  # what the ranks were doing, for the message if a collective fails
        t_resume = time.perf_counter()
        self.maybe_resume()
        stop = min(self.max_steps, tc.stop_at or self.max_steps)
        self.logger.total_steps = stop
        if self.ctx.is_main:  # written only once the config is known to be compatible with the checkpoint
            (self.run_dir / "config.yaml").write_text(self.config_text)
            self._header(time.perf_counter() - t_resume)
        self.model.train()
        for cb in self.callbacks:
            cb.on_train_start(self)
        last = {}
        tokens_per_step = tc.global_batch_size * cfg.data.seq_len
        skips = 0  # consecutive skipped (non-finite) steps
        while self.step < stop:
            self.activity = f"step {self.step + 1}"
            batch = self.sampler.next_batch().to(self.ctx.device)
            last = self.module.train_batch(batch, self.step)
            self.step += 1
            self.tokens_seen += tokens_per_step
            skipped = bool(last.pop("skipped", False))
            skips = skips + 1 if skipped else 0
            signal_name = signals.agreed(self.ctx)  # every rank, every step: the same answer everywhere
            info = StepEnd(
                step=self.step,
                stop=stop,
                stats=last,
                batch_bt1=batch,
                skipped=skipped,
                consecutive_skips=skips,
                signal=signal_name,
            )
            for cb in self.callbacks:
                cb.on_step_end(self, info)
            if signal_name:
                self.stop_signal = signal_name
                code = SIGINT_EXIT_CODE if signal_name == "SIGINT" else 0
                self.logger.info(
                    f"{self.logger.step_label(self.step, stop)} stopping on {signal_name}: checkpoint "
                    f"{info.checkpoint} saved; exiting with status {code} (resume from it with "
                    "checkpoint.resume=auto)"
                )
                self.logger.log("event", self.step, event="stopped", signal=signal_name, path=str(info.checkpoint))
                break
        self.activity = "the wait for the last checkpoint save"
        self.wait_for_saves()  # the last background save is committed before the run reports success
        for cb in self.callbacks:
            cb.on_train_end(self)
        return last

    def validate(self) -> dict:
        tc = self.cfg.trainer
        local = max(1, tc.global_batch_size // self.ctx.dp_size)
        val = validation_metrics(
            self.module,
            self.data.val,
            min(local, tc.micro_batch_size),
            self.ctx.dp_rank,
            self.ctx.dp_size,
            tc.val_batches,
        )
        if val:
            self.logger.log("val", self.step, **val)
            for cb in self.callbacks:
                cb.on_eval(self, self.step, val)
        return val
