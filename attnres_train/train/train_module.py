"""The train module: the (parallelized) model, its optimizers and one optimizer step over microbatches.

Why separate from the Trainer (OLMo-core's split): the loop never needs to know how a step is computed. One
class for every layout: it composes a step engine (``step_engine.py``: the local microbatch loop, or the
pipeline runtime) for the forward/backward, and writes everything else once: the dp mean of the step's stats,
clipping over every shard, LR, optimizer step, the MoE router-bias update, skipping non-finite steps, eval
averaging. docs/training.md, "The train module and its step engines", has the details.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch

from ..config.errors import ConfigError
from ..config.pipeline import PipelineConfig
from ..config.run import TrainerConfig
from ..config.train import OptimConfig
from ..model.lm_loss import IGNORE_INDEX
from ..parallel.mesh import ParallelContext, autocast_dtype
from ..parallel.train_step import clip_grad_norm_, update_router_biases
from .optim import build_optimizers, set_lr
from .step_engine import build_step_engine


class TrainModule:
    def __init__(
        self,
        model,
        optim_cfg: OptimConfig,
        trainer_cfg: TrainerConfig,
        ctx: ParallelContext,
        max_steps: int,
        seed: Optional[int] = None,
        doc_eos_id: Optional[int] = None,
        pipeline_cfg: Optional[PipelineConfig] = None,
    ):
        """``model``: the plain model, on ``meta`` (then this rank's shards are materialised and initialised
        from ``seed`` after parallelising: the values one process would have) or materialised identically on
        every rank; parallelized in place by the step engine (``pipeline_cfg`` needed when ``pp > 1``).
        ``doc_eos_id``: document masking on (``data.document_masking``), documents end at this token id."""
        if not isinstance(ctx, ParallelContext):
            raise TypeError(f"TrainModule needs a ParallelContext (attnres_train.parallel.mesh), got {type(ctx)}")
        self.ctx = ctx
        self.optim_cfg = optim_cfg
        self.max_steps = max_steps
        self.micro = trainer_cfg.micro_batch_size
        self.amp_dtype = autocast_dtype(trainer_cfg.precision, ctx.device)
        self.engine = build_step_engine(model, ctx, trainer_cfg, pipeline_cfg, seed=seed, doc_eos_id=doc_eos_id)
        # the module the optimizer and checkpoints see (with pp: this rank's stages under the full model's names)
        self.model = self.engine.model
        # Buffers (router bias, load counters) are kept identical by construction (same updates), never broadcast.
        self.optimizers = build_optimizers(self.model, optim_cfg)
        # The loss of the step in progress, set by train_batch for optimizer_step's non-finite check.
        self._step_loss: Optional[float] = None

    @property
    def diagnostics_supported(self) -> bool:
        """Whether depth statistics and text samples can run on :attr:`model` (see ``step_engine``)."""
        return self.engine.diagnostics_supported

    def doc_kwargs(self, x_bt: torch.Tensor) -> dict:
        """The document-masking keyword arguments of a forward on ``x_bt`` (nothing with masking off)."""
        return self.engine.doc_kwargs(x_bt)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def _microbatches(self, batch_bt1: torch.Tensor):
        batch_bt1 = batch_bt1.to(self.ctx.device)
        x_bt, y_bt = batch_bt1[:, :-1], batch_bt1[:, 1:]
        return list(zip(x_bt.split(self.micro), y_bt.split(self.micro)))

    def forward_backward(self, batch_bt1: torch.Tensor) -> Dict[str, float]:
        """Forward + backward over this rank's ``[local_batch, seq_len+1]`` batch; gradients left in ``.grad``
        (synchronised over data-parallel ranks). Returns the global mean loss and aux loss."""
        loss, aux = self.engine.forward_backward(self._microbatches(batch_bt1), self._autocast)
        stats = torch.stack([loss, aux]).to(self.ctx.device)
        self.ctx.all_reduce_dp_mean_(stats)
        stats = stats.cpu()
        return {"loss": float(stats[0]), "aux_loss": float(stats[1])}

    def optimizer_step(self, step: int) -> Dict[str, float]:
        """Clip (total norm over all shards), set the LR, step, zero grads, then update the router biases.

        Skips the update when the loss given by :meth:`train_batch` or the gradient norm is not finite on some
        rank (no optimizer step, no router-bias update, routing counts cleared); the result has ``skipped: True``.
        """
        loss, self._step_loss = self._step_loss, None
        lr = set_lr(self.optimizers, step, self.optim_cfg, self.max_steps) * self.optim_cfg.lr  # logged: actual LR
        grad_norm = clip_grad_norm_(
            self.engine.grad_params(), self.optim_cfg.grad_clip, reduce_group=self.engine.norm_group
        )
        if self._non_finite(float(grad_norm), loss):
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            for m in self.engine.moe_layers():  # this step's routing counts must not steer the next update
                m.tokens_per_expert.zero_()
            return {"grad_norm": float(grad_norm), "lr": lr, "skipped": True}
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        imbalance = update_router_biases(self.engine, self.ctx)
        return {"grad_norm": float(grad_norm), "lr": lr, **self._imbalance_over_all_layers(imbalance)}

    def _imbalance_over_all_layers(self, out: Dict[str, float]) -> Dict[str, float]:
        """Expert-imbalance metrics over the MoE layers of every rank of ``engine.norm_group`` (pipeline stages:
        each rank computed its own layers'); unchanged without such a group."""
        group = self.engine.norm_group
        if group is None:
            return out
        n = len(self.engine.moe_layers())
        mean, mx = out.get("expert_imbalance_mean", 0.0), out.get("expert_imbalance_max", 0.0)
        t = torch.tensor([mean * n, float(n), mx], dtype=torch.float64)
        summed, maxed = t[:2].clone().to(self.ctx.device), t[2:].clone().to(self.ctx.device)
        torch.distributed.all_reduce(summed, group=group)
        torch.distributed.all_reduce(maxed, op=torch.distributed.ReduceOp.MAX, group=group)
        if summed[1] > 0:
            out["expert_imbalance_mean"] = float(summed[0] / summed[1])
            out["expert_imbalance_max"] = float(maxed[0])
        return out

    def _non_finite(self, grad_norm: float, loss: Optional[float]) -> bool:
        """Whether any rank saw a NaN/Inf loss or gradient norm (one scalar MAX all-reduce over the world, so
        every rank decides the same even where ranks see different values, e.g. pipeline stages)."""
        bad = not math.isfinite(grad_norm) or (loss is not None and not math.isfinite(loss))
        if not self.ctx.is_distributed:
            return bad
        flag = torch.tensor([1.0 if bad else 0.0], device=self.ctx.device)
        self.ctx.all_reduce_max_(flag)
        return bool(flag.item() > 0)

    def train_batch(self, batch_bt1: torch.Tensor, step: int) -> Dict[str, float]:
        """One optimizer step on this rank's ``[local_batch, seq_len+1]`` token batch (or a skipped one)."""
        stats = self.forward_backward(batch_bt1)
        self._step_loss = stats.get("loss")
        return {**stats, **self.optimizer_step(step)}

    @torch.no_grad()
    def eval_loss(self, batches) -> Dict[str, float]:
        """Mean token loss over an iterable of ``[b, seq_len+1]`` batches, averaged over data-parallel ranks."""
        tot = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            loss = self.engine.eval_forward(self._microbatches(batch), self._autocast)
            n = float((batch[:, 1:] != IGNORE_INDEX).sum())
            tot += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        tot = self.ctx.all_reduce_dp_sum_(tot.to(self.ctx.device)).cpu()
        if tot[1] == 0:
            return {}
        loss = float(tot[0] / tot[1])
        return {"val_loss": loss, "val_ppl": float(torch.tensor(loss).exp())}


def build_train_module(
    model, cfg, ctx: ParallelContext, max_steps: int, doc_eos_id: Optional[int] = None
) -> TrainModule:
    """The train module for ``cfg`` (a validated root ``Config``). ``doc_eos_id``: the tokenizer's EOS id when
    ``data.document_masking`` is on (None: off)."""
    return TrainModule(
        model, cfg.optim, cfg.trainer, ctx, max_steps, seed=cfg.seed, doc_eos_id=doc_eos_id, pipeline_cfg=cfg.pipeline
    )


def document_masking_eos(data_cfg, tokenizer) -> Optional[int]:
    """The EOS id documents end at when ``data.document_masking`` is on, else None."""
    if not data_cfg.document_masking:
        return None
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ConfigError(
            "data.document_masking",
            f"needs a tokenizer with an EOS token (documents end at "
            f"their EOS); {getattr(tokenizer, 'name', tokenizer)!r} has none",
        )
    return int(eos)
