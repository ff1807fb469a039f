"""The train module: owns the model, its optimizers and one optimizer step over microbatches.

Why separate from the Trainer (OLMo-core's split): the loop, cadence and callbacks never need to know how a
step is computed. This class is where data parallelism (DDP here; FSDP/TP/EP/PP in the parallel-engine
issues) plugs in. One step = split the local batch into microbatches, forward/backward each (gradient sync
only on the last one), clip, set the LR, optimizer step, then the MoE router-bias update with expert loads
summed over every data-parallel rank so all replicas apply the same update.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config.run import TrainerConfig
from ..config.train import OptimConfig
from .dist import DistContext
from .optim import build_optimizers, clip_grad_norm_, set_lr


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast on CUDA devices that support it (auto), always when 'bf16'; fp32 (None) otherwise."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class TrainModule:
    def __init__(self, model, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, ctx: DistContext, max_steps: int):
        self.model = model
        self.ctx = ctx
        self.optim_cfg = optim_cfg
        self.trainer_cfg = trainer_cfg
        self.max_steps = max_steps
        self.micro = trainer_cfg.micro_batch_size
        self.amp_dtype = autocast_dtype(trainer_cfg.precision, ctx.device)
        # Buffers (router bias, load counters) are kept identical by construction, never broadcast by DDP.
        self.wrapped = DDP(model, broadcast_buffers=False) if ctx.is_distributed else model
        self.optimizers = build_optimizers(model, optim_cfg)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def train_batch(self, batch_bt1: torch.Tensor, step: int) -> Dict[str, float]:
        """One optimizer step on this rank's ``[local_batch, seq_len+1]`` token batch."""
        x_bt, y_bt = batch_bt1[:, :-1], batch_bt1[:, 1:]
        chunks = list(zip(x_bt.split(self.micro), y_bt.split(self.micro)))
        n = len(chunks)
        lr = set_lr(self.optimizers, step, self.optim_cfg, self.max_steps)
        loss_sum = torch.zeros((), dtype=torch.float64)
        aux_sum = torch.zeros((), dtype=torch.float64)
        for i, (x, y) in enumerate(chunks):
            sync = contextlib.nullcontext() if (i == n - 1 or not isinstance(self.wrapped, DDP)) else self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    out = self.wrapped(x, labels=y)
                total = out.loss / n
                if out.aux_loss is not None:
                    total = total + out.aux_loss / n
                    aux_sum += out.aux_loss.detach().double() / n
                total.backward()
            loss_sum += out.loss.detach().double() / n
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = clip_grad_norm_(params, self.optim_cfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        imbalance = self._update_router_biases()
        stats = torch.stack([loss_sum, aux_sum]).to(self.ctx.device)
        self.ctx.all_reduce_sum_(stats)
        stats = (stats / self.ctx.world_size).cpu()
        return {"loss": float(stats[0]), "aux_loss": float(stats[1]), "grad_norm": float(grad_norm), "lr": lr,
                **imbalance}

    @torch.no_grad()
    def _update_router_biases(self) -> Dict[str, float]:
        moes = self.model.moe_layers()
        if not moes:
            return {}
        counts = torch.stack([m.tokens_per_expert for m in moes])
        self.ctx.all_reduce_sum_(counts)
        ratios: List[float] = []
        for m, c in zip(moes, counts):
            m.tokens_per_expert.copy_(c)
            ratios.append(float(c.max() / c.mean().clamp_min(1e-9)) if c.sum() > 0 else 0.0)
            m.update_bias()
        return {"expert_imbalance_mean": sum(ratios) / len(ratios), "expert_imbalance_max": max(ratios)}

    @torch.no_grad()
    def eval_loss(self, batches) -> Dict[str, float]:
        """Mean token loss over an iterable of ``[b, seq_len+1]`` batches, averaged over ranks."""
        was_training = self.model.training
        self.model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            batch = batch.to(self.ctx.device)
            with self._autocast():
                out = self.model(batch[:, :-1], labels=batch[:, 1:])
            n = batch[:, 1:].numel()
            tot += torch.tensor([float(out.loss) * n, n], dtype=torch.float64)
        self.model.train(was_training)
        tot = self.ctx.all_reduce_sum_(tot.to(self.ctx.device)).cpu()
        if tot[1] == 0:
            return {}
        loss = float(tot[0] / tot[1])
        return {"val_loss": loss, "val_ppl": float(torch.tensor(loss).exp())}
