"""Trainer callbacks: everything that happens after a training step besides the step itself.

Why: the loop stays a loop (batch, step, signals); each concern (the metrics line, the NaN/Inf policy, depth
statistics, validation, text samples, checkpoint cadence) is one small object with its own cadence, and a run,
test or notebook can add its own (``Trainer(..., callbacks=[...])``). docs/training.md, "Callbacks".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import torch

from ..parallel.data_parallel import gathered_parameters
from .faults import TrainingAborted
from .metrics import depth_statistics, generate, peak_memory_gb

if TYPE_CHECKING:  # annotations only: trainer.py imports this module
    from .trainer import Trainer


@dataclass
class StepEnd:
    """What the loop knows after a step; callbacks read it (and may add to ``stats`` / set ``checkpoint``)."""

    step: int  #: steps done (the one just made included)
    stop: int  #: the step this launch ends at
    stats: dict  #: the step's metrics (loss, grad_norm, lr, ...; validation adds val_loss / val_ppl)
    batch_bt1: torch.Tensor  #: this rank's ``[b, seq_len+1]`` token batch of the step
    skipped: bool = False  #: non-finite loss or gradient norm: no update was applied
    consecutive_skips: int = 0
    signal: Optional[str] = None  #: the stop signal every rank agreed on (SIGTERM, SIGUSR1, SIGINT), or None
    checkpoint: Optional[Path] = None  #: where this step's checkpoint was saved (CheckpointCadence), if it was

    @property
    def final(self) -> bool:
        return self.step == self.stop


class TrainerCallback:
    """Hooks the Trainer calls on every rank, in list order. Collectives inside a hook must be entered by every
    rank the same way (every rank runs the same hooks at the same steps)."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """After resume and the header, before the first step of this launch."""

    def on_step_end(self, trainer: "Trainer", info: StepEnd) -> None:
        """After every step (including skipped ones)."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """After the last step of a launch that ended normally (``stop`` reached or a stop signal)."""

    def on_eval(self, trainer: "Trainer", step: int, metrics: dict) -> None:
        """After each validation (``val_loss``, ``val_ppl``), whichever callback asked for it."""

    def on_checkpoint(self, trainer: "Trainer", step: int, path: Path) -> None:
        """After each checkpoint save (with ``checkpoint.async_save``: once it is scheduled, not yet committed)."""


class TrainLog(TrainerCallback):
    """The ``train`` record every ``log_every`` steps (and on the last, skipped or signalled step): the step's
    metrics plus throughput, MFU, peak memory, s/step and ETA, through the run's ``MetricsLogger`` (console,
    train.log, metrics.jsonl, wandb)."""

    def __init__(self, every: int):
        self.every = every

    def on_train_start(self, trainer):
        self.t_loop = self.t_last = time.perf_counter()
        self.step_loop = self.step_last = trainer.step
        self.tok_last = trainer.tokens_seen

    def on_step_end(self, trainer, info):
        if not (info.step % self.every == 0 or info.final or info.skipped or info.signal):
            return
        now = time.perf_counter()
        dt = now - self.t_last
        tps = (trainer.tokens_seen - self.tok_last) / max(dt, 1e-9)
        per_device = tps / trainer.ctx.world_size
        # no peak (unknown GPU): no MFU, rather than a 0.00% that reads like a measurement
        mfu = {"mfu": per_device * trainer.flops_per_token / trainer.peak} if trainer.peak > 0 else {}
        # s/step over the steps since the last line; the ETA from this launch's average (which includes
        # validation, samples and saves)
        s_per_step = dt / max(info.step - self.step_last, 1)
        eta = (info.stop - info.step) * (now - self.t_loop) / max(info.step - self.step_loop, 1)
        trainer.logger.log(
            "train",
            info.step,
            **info.stats,
            **({"skipped": True} if info.skipped else {}),
            tokens_seen=trainer.tokens_seen,
            tokens_per_s=tps,
            **mfu,
            peak_mem_gb=peak_memory_gb(trainer.ctx.device),
            s_per_step=s_per_step,
            elapsed_s=time.time() - trainer.process_start,
            eta_s=eta,
        )
        self.t_last, self.step_last, self.tok_last = time.perf_counter(), info.step, trainer.tokens_seen


class SkippedSteps(TrainerCallback):
    """Counts skipped (NaN/Inf) steps; stops the run (TrainingAborted) past ``max_consecutive`` in a row, or when
    the run's last step is skipped: a run never ends "successfully", with a final checkpoint, inside a NaN/Inf
    streak (that includes a run that never made a good step, e.g. optim.lr=1e30)."""

    def __init__(self, max_consecutive: int):
        self.limit = max_consecutive

    def on_step_end(self, trainer, info):
        if not info.skipped:
            return
        skips, step = info.consecutive_skips, info.step
        trainer.logger.log(
            "event",
            step,
            event="skipped_step",
            consecutive=skips,
            loss=info.stats.get("loss"),
            grad_norm=info.stats.get("grad_norm"),
        )
        if skips <= self.limit and not (info.final and not info.signal):
            return
        trainer.wait_for_saves()
        good = trainer.ckpt.latest(report=False)
        first = step - skips + 1
        where = (
            f"The last good checkpoint is {good}: resume from it (checkpoint.resume=auto) after fixing the cause, "
            "e.g. with a lower optim.lr or different data."
            if good
            else "This run has no checkpoint yet."
        )
        why = (
            f"more than trainer.max_consecutive_skips={self.limit}"
            if skips > self.limit
            else "including the run's last step, so it has no good final state"
        )
        raise TrainingAborted(
            f"step {step}: the loss or gradient norm was NaN/Inf on {skips} consecutive steps ({first}..{step}), "
            f"{why}; stopped without saving. {where}"
        )


COLLAPSE_SHARE = 0.9  # a layer's router has collapsed when one expert receives >= 90% of its tokens ...
COLLAPSE_STEPS = 5  # ... on this many steps in a row (a start-up blip is not a collapse)


class ConsoleWarnings(TrainerCallback):
    """Warnings a number in the metrics line would hide (rank 0, console and train.log, once each per launch).

    * start-up: ``model.vocab_size`` larger than the tokenizer's vocabulary (ids the data never contains; the
      sampler never picks them, see ``metrics.generate``).
    * collapsed routing: ``expert_imbalance_max`` (max/mean tokens per expert, worst MoE layer) at least
      ``COLLAPSE_SHARE * num_experts / top_k`` on ``COLLAPSE_STEPS`` consecutive steps. ``num_experts / top_k``
      is the ratio when one expert receives every token (max N, mean top_k * N / num_experts).
    docs/training.md, "What the console shows".
    """

    def __init__(self, num_experts: int, top_k: int):
        self.threshold = COLLAPSE_SHARE * num_experts / top_k
        self.ratio = num_experts / top_k
        self.streak = 0
        self.warned = False

    def on_train_start(self, trainer):
        self.streak, self.warned = 0, False
        tok, model_vocab = trainer.data.tokenizer, trainer.cfg.model.vocab_size
        if model_vocab > tok.vocab_size:
            self._warn(
                trainer,
                None,
                "vocab_mismatch",
                f"model.vocab_size={model_vocab} is larger than the vocabulary of tokenizer {tok.name!r} "
                f"({tok.vocab_size}): ids {tok.vocab_size}..{model_vocab - 1} never occur in the data (unused "
                "embedding and output rows) and samples never show them; "
                f"set model.vocab_size={tok.vocab_size} (or the next multiple your kernels want) to drop them",
            )

    def on_step_end(self, trainer, info):
        value = info.stats.get("expert_imbalance_max")
        if self.warned or info.skipped or value is None:
            return
        self.streak = self.streak + 1 if value >= self.threshold else 0
        if self.streak >= COLLAPSE_STEPS:
            self.warned = True
            self._warn(
                trainer,
                info.step,
                "routing_collapse",
                f"routing collapsed: expert imbalance (max/mean tokens per expert) {value:.2f} on {self.streak} "
                f"steps in a row, >= {self.threshold:.2f} ({COLLAPSE_SHARE:.0%} of the top-k ratio "
                f"num_experts/top_k = {self.ratio:.2f}, the value when one expert receives every token); check "
                "optim.lr and model.moe.bias_update_speed",
            )

    @staticmethod
    def _warn(trainer, step: Optional[int], event: str, message: str) -> None:
        """``step`` None: a start-up warning (no step label)."""
        if trainer.ctx.is_main:
            label = "" if step is None else trainer.logger.step_label(step, trainer.logger.total_steps) + " "
            trainer.logger.info(f"{label}warning: {message}")
            trainer.logger.log(
                "event", trainer.step if step is None else step, echo=False, event=event, message=message
            )


def _diagnostics_here(trainer) -> bool:
    """Whether this rank takes part in a depth-statistics / sampling forward. With any sharding every rank must
    (collectives); TP's DTensor activations and pipeline stages cannot (``module.diagnostics_supported``)."""
    return trainer.module.diagnostics_supported and (trainer.ctx.is_distributed or trainer.ctx.is_main)


class DepthStatistics(TrainerCallback):
    """Every ``every`` steps: AttnRes depth-mixing statistics on the step's first row, as a ``depth`` record."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer, info):
        if not self.every or info.step % self.every or not trainer.module.diagnostics_supported:
            return
        x_bt = info.batch_bt1[:1, :-1]
        doc = trainer.module.doc_kwargs(x_bt)  # document masking: the same forward as training
        if trainer.ctx.is_distributed:
            with gathered_parameters(trainer.model):  # queries are read outside forward: unshard FSDP units
                stats = depth_statistics(trainer.model, x_bt, **doc)
        else:
            stats = depth_statistics(trainer.model, x_bt, **doc)
        if stats and trainer.ctx.is_main:
            trainer.logger.log("depth", info.step, **stats)


class Validation(TrainerCallback):
    """Every ``every`` steps and on the last one: the validation loss (``val`` record; added to the step's stats)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer, info):
        if self.every and (info.step % self.every == 0 or info.final):
            info.stats.update(trainer.validate())


class Sampling(TrainerCallback):
    """Every ``every`` steps: a greedy / seeded continuation of ``prompt`` (``sample`` record). Every rank runs
    the same generation (same prompt, parameters and seed), so the FSDP / EP collectives of each forward match."""

    def __init__(self, every: int, prompt: str, tokens: int, temperature: float):
        self.every, self.prompt, self.tokens, self.temperature = every, prompt, tokens, temperature

    def on_step_end(self, trainer, info):
        if not self.every or info.step % self.every or not _diagnostics_here(trainer):
            return
        text = generate(
            trainer.model,
            trainer.data.tokenizer,
            self.prompt,
            self.tokens,
            self.temperature,
            trainer.ctx.device,
            seed=info.step,
        )
        if text is not None and trainer.ctx.is_main:
            trainer.logger.log("sample", info.step, prompt=self.prompt, text=text)


class CheckpointCadence(TrainerCallback):
    """Saves every ``interval`` steps (never after a skipped step: the newest checkpoint always follows a good
    one), after the last step and on a stop signal (then blocking, even with ``async_save``)."""

    def __init__(self, interval: int, async_save: bool):
        self.interval, self.async_save = interval, async_save

    def on_step_end(self, trainer, info):
        periodic = self.interval and info.step % self.interval == 0 and not info.skipped
        if periodic or info.final or info.signal:
            trainer.activity = f"the checkpoint save after step {info.step}"
            info.checkpoint = trainer.save(blocking=not self.async_save or bool(info.signal))


def default_callbacks(cfg) -> List[TrainerCallback]:
    """The built-ins for a root ``Config``, in the order they run after each step."""
    tc = cfg.trainer
    return [
        TrainLog(tc.log_every),
        ConsoleWarnings(cfg.model.moe.num_experts, cfg.model.moe.top_k),
        SkippedSteps(tc.max_consecutive_skips),
        DepthStatistics(tc.depth_stats_every),
        Validation(tc.val_every),
        Sampling(tc.sample_every, tc.sample_prompt, tc.sample_tokens, tc.sample_temperature),
        CheckpointCadence(cfg.checkpoint.interval, cfg.checkpoint.async_save),
    ]
