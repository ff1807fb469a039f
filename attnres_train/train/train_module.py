"""The train module: owns the (parallelized) model, its optimizers and one optimizer step over microbatches.

Why separate from the Trainer (OLMo-core's split): the loop, cadence and callbacks never need to know how a
step is computed. This class is where the parallel engine plugs in: it calls
``attnres_train.parallel.parallelize_model`` (TP/SP -> EP -> AC -> compile -> FSDP2/HSDP/replicate, from the
``ParallelContext``) before building the optimizers, so the optimizer sees the final (DTensor) parameters.

One step (:meth:`train_batch`) = :meth:`forward_backward` (split this rank's batch into microbatches; each
microbatch loss is weighted so the summed gradient is that of the global mean token loss; gradient sync only
on the last microbatch) then :meth:`optimizer_step` (DTensor-aware clipping over every shard, LR, optimizer
step, then the MoE router-bias update with expert loads summed over every data-parallel rank so all replicas
apply the same update).

Non-finite steps: when the step's loss or global gradient norm is NaN/Inf on any rank (one MAX all-reduce of a
flag over the world, so every rank decides the same even where ranks see different values, e.g. pipeline
stages), :meth:`optimizer_step` skips the step: no optimizer step, no router-bias update (the expert-load
counters are cleared), gradients zeroed, and ``skipped: True`` in the returned stats. The trainer counts
consecutive skips (``trainer.max_consecutive_skips``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch

from ..config.errors import ConfigError
from ..config.run import TrainerConfig
from ..config.train import OptimConfig
from ..model.doc_mask import document_ids
from ..parallel.data_parallel import finish_grad_sync, grad_sync
from ..parallel.init import materialize_and_init
from ..parallel.mesh import ParallelContext, autocast_dtype, single_process_context
from ..parallel.parallelize import parallelize_model
from ..parallel.train_step import clip_grad_norm_, loss_weights, update_router_biases
from .optim import build_optimizers, set_lr


def as_parallel_context(ctx) -> ParallelContext:
    """A ParallelContext from a ParallelContext, or a single-process DistContext (tests, notebooks)."""
    if isinstance(ctx, ParallelContext):
        return ctx
    if getattr(ctx, "world_size", 1) != 1:
        raise TypeError("multi-process runs need a ParallelContext (attnres_train.parallel.build_parallel_context)")
    return single_process_context(getattr(ctx, "device", torch.device("cpu")))


class TrainModule:
    def __init__(self, model, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, ctx, max_steps: int,
                 seed: Optional[int] = None, doc_eos_id: Optional[int] = None):
        """``model``: the plain model, on ``meta`` (then this rank's shards are materialised and initialised
        from ``seed`` after parallelising: the values one process would have) or materialised identically on
        every rank; parallelized here in place. ``doc_eos_id``: document masking on (``data.document_masking``),
        documents end at this token id; None: off."""
        self.ctx = as_parallel_context(ctx)
        self.doc_eos_id = doc_eos_id
        self.seed = seed
        self.optim_cfg = optim_cfg
        self.trainer_cfg = trainer_cfg
        self.max_steps = max_steps
        self.micro = trainer_cfg.micro_batch_size
        self.amp_dtype = autocast_dtype(trainer_cfg.precision, self.ctx.device)
        # Seams the pipeline module (``pipeline_module.PipelineTrainModule``) sets in its ``_parallelize``: the
        # module the optimizer and checkpoints see, the one whose ``moe_layers()`` this rank updates, and the
        # extra group the gradient norm is summed over (pp).
        self.norm_group = None
        self.model = self._parallelize(model)
        self.moe_owner = self.model
        # Buffers (router bias, load counters) are kept identical by construction (same updates), never broadcast.
        self.optimizers = build_optimizers(self.model, optim_cfg)
        # The loss of the step in progress, set by train_batch for optimizer_step's non-finite check.
        self._step_loss: Optional[float] = None

    def _parallelize(self, model):
        """Apply the parallel layout to ``model`` in place; returns the module that trains on this rank."""
        on_meta = all(p.is_meta for p in model.parameters())
        if not getattr(model, "_attnres_parallelized", False):
            parallelize_model(model, self.ctx, self.trainer_cfg)
        if on_meta:
            materialize_and_init(model, self.ctx.device, model.config, self.seed)
        return model

    def _doc_kwargs(self, x_bt: torch.Tensor) -> dict:
        """``{"doc_ids": ...}`` with document masking on (attnres_train.model.doc_mask), else nothing."""
        if self.doc_eos_id is None:
            return {}
        return {"doc_ids": document_ids(x_bt, self.doc_eos_id)}

    def grad_params(self):
        """The parameters whose gradients enter the norm / clipping (each logical parameter once)."""
        return [p for p in self.model.parameters() if p.grad is not None]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def forward_backward(self, batch_bt1: torch.Tensor) -> Dict[str, float]:
        """Forward + backward over this rank's ``[local_batch, seq_len+1]`` batch; gradients left in ``.grad``
        (synchronised over data-parallel ranks). Returns the global mean loss and aux loss."""
        x_bt, y_bt = batch_bt1[:, :-1], batch_bt1[:, 1:]
        chunks = list(zip(x_bt.split(self.micro), y_bt.split(self.micro)))
        n = len(chunks)
        weights = loss_weights([y for _, y in chunks], self.ctx)
        # Accumulated on the device: no host sync per microbatch (one, below, per optimizer step).
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for i, ((x, y), w) in enumerate(zip(chunks, weights)):
            with grad_sync(self.model, enabled=(i == n - 1)):
                with self._autocast():
                    out = self.model(x, labels=y, **self._doc_kwargs(x))
                total = out.loss * w
                if out.aux_loss is not None:
                    total = total + out.aux_loss / n
                    aux_sum += _local_scalar(out.aux_loss).double() / n
                total.backward()
            loss_sum += _local_scalar(out.loss).double() * w
        finish_grad_sync(self.model, self.ctx)
        # loss_sum * ... : the weights already include the dp factor, so the dp mean is the global token mean
        stats = torch.stack([loss_sum, aux_sum])
        self.ctx.all_reduce_dp_mean_(stats)
        stats = stats.cpu()
        return {"loss": float(stats[0]), "aux_loss": float(stats[1])}

    def optimizer_step(self, step: int) -> Dict[str, float]:
        """Clip (total norm over all shards), set the LR, step, zero grads, then update the router biases.

        Skips the update (see the module docstring) when the loss given by :meth:`train_batch` or the gradient
        norm is not finite on some rank; the result then has ``skipped: True``.
        """
        loss, self._step_loss = self._step_loss, None
        lr = set_lr(self.optimizers, step, self.optim_cfg, self.max_steps) * self.optim_cfg.lr  # logged: actual LR
        grad_norm = clip_grad_norm_(self.grad_params(), self.optim_cfg.grad_clip, reduce_group=self.norm_group)
        if self._non_finite(float(grad_norm), loss):
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            for m in self.moe_owner.moe_layers():  # this step's routing counts must not steer the next update
                m.tokens_per_expert.zero_()
            return {"grad_norm": float(grad_norm), "lr": lr, "skipped": True}
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        imbalance = update_router_biases(self.moe_owner, self.ctx)
        return {"grad_norm": float(grad_norm), "lr": lr, **imbalance}

    def _non_finite(self, grad_norm: float, loss: Optional[float]) -> bool:
        """Whether any rank saw a NaN/Inf loss or gradient norm (one scalar MAX all-reduce over the world)."""
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
        was_training = self.model.training
        self.model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            batch = batch.to(self.ctx.device)
            with self._autocast():
                out = self.model(batch[:, :-1], labels=batch[:, 1:], **self._doc_kwargs(batch[:, :-1]))
            n = float((batch[:, 1:] != -100).sum())
            tot += torch.tensor([float(out.loss) * n, n], dtype=torch.float64)
        self.model.train(was_training)
        tot = self.ctx.all_reduce_dp_sum_(tot.to(self.ctx.device)).cpu()
        if tot[1] == 0:
            return {}
        loss = float(tot[0] / tot[1])
        return {"val_loss": loss, "val_ppl": float(torch.tensor(loss).exp())}


def _local_scalar(t: torch.Tensor) -> torch.Tensor:
    """A detached loss as a plain tensor (a tensor-parallel loss may be a replicated DTensor)."""
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t


def build_train_module(model, cfg, ctx, max_steps: int, doc_eos_id: Optional[int] = None) -> TrainModule:
    """The train module for ``cfg`` (a validated root ``Config``): the pipelined one when ``parallel.pp > 1``.

    ``doc_eos_id``: the tokenizer's EOS id when ``data.document_masking`` is on (None: off).
    """
    pctx = as_parallel_context(ctx)
    if pctx.dims.pp > 1:
        from .pipeline_module import PipelineTrainModule

        return PipelineTrainModule(model, cfg.optim, cfg.trainer, pctx, max_steps, cfg.pipeline, seed=cfg.seed,
                                   doc_eos_id=doc_eos_id)
    return TrainModule(model, cfg.optim, cfg.trainer, pctx, max_steps, seed=cfg.seed, doc_eos_id=doc_eos_id)


def document_masking_eos(data_cfg, tokenizer) -> Optional[int]:
    """The EOS id documents end at when ``data.document_masking`` is on, else None."""
    if not data_cfg.document_masking:
        return None
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ConfigError("data.document_masking", f"needs a tokenizer with an EOS token (documents end at "
                          f"their EOS); {getattr(tokenizer, 'name', tokenizer)!r} has none")
    return int(eos)
