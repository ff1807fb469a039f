"""The train module under pipeline parallelism (``parallel.pp > 1``): same step contract as ``TrainModule``.

Only three things differ from the non-pipelined module, so only they are overridden:

* the model is this rank's stages (``parallel.pipeline.parallelize_pipeline``), exposed as ``self.model`` under
  the full model's parameter names (the optimizer and checkpoints never see the other stages);
* :meth:`forward_backward` hands all microbatches of the rank's batch to the pipeline runtime at once (the
  schedule interleaves them) instead of looping over them; loss and MoE aux loss come back summed over the pp
  group, then averaged over data-parallel ranks as usual. Each microbatch's mean token loss gets weight ``1/M``,
  which is the global mean token loss whenever every microbatch has the same number of supervised tokens (always
  for packed pretraining data: no label is ignored);
* the gradient norm is summed over the pp group (``norm_group``; the head copy of a tied embedding counted once),
  and the MoE router-bias update covers this rank's MoE layers (loads summed over dp as usual).

Optimizer step, clipping, LR schedule and router-bias update are inherited unchanged.
"""

from __future__ import annotations

from typing import Dict

import torch

from ..config.pipeline import PipelineConfig
from ..config.run import TrainerConfig
from ..config.train import OptimConfig
from ..parallel.data_parallel import finish_grad_sync
from ..parallel.pipeline.parallelize import parallelize_pipeline
from .train_module import TrainModule


class PipelineTrainModule(TrainModule):
    def __init__(self, model, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, ctx, max_steps: int,
                 pipeline_cfg: PipelineConfig, seed=None, doc_eos_id=None):
        self.pipeline_cfg = pipeline_cfg
        super().__init__(model, optim_cfg, trainer_cfg, ctx, max_steps, seed=seed, doc_eos_id=doc_eos_id)
        for st in self.pipe.stages:  # document masking: every stage derives the ids itself
            st.doc_eos_id = doc_eos_id

    def _parallelize(self, model):
        self.pipe = parallelize_pipeline(model, self.ctx, self.trainer_cfg, self.pipeline_cfg, seed=self.seed)
        self.norm_group = self.ctx.mesh("pp").get_group()
        return self.pipe.chunks

    def grad_params(self):
        params = super().grad_params()
        if self.pipe.holds_tied_copy:
            head = self.model.lm_head.weight
            params = [p for p in params if p is not head]
        return params

    def _microbatches(self, batch_bt1: torch.Tensor):
        batch_bt1 = batch_bt1.to(self.ctx.device)
        x_bt, y_bt = batch_bt1[:, :-1], batch_bt1[:, 1:]
        return list(zip(x_bt.split(self.micro), y_bt.split(self.micro)))

    def forward_backward(self, batch_bt1: torch.Tensor) -> Dict[str, float]:
        with self._autocast():
            res = self.pipe.step(self._microbatches(batch_bt1))
        finish_grad_sync(self.model, self.ctx)
        aux = res.aux_loss if res.aux_loss is not None else torch.zeros((), dtype=torch.float64)
        stats = torch.stack([res.loss.double(), aux.double()]).to(self.ctx.device)
        self.ctx.all_reduce_dp_mean_(stats)
        stats = stats.cpu()
        return {"loss": float(stats[0]), "aux_loss": float(stats[1])}

    def optimizer_step(self, step: int) -> Dict[str, float]:
        out = super().optimizer_step(step)
        # Expert-imbalance metrics over the MoE layers of *all* stages (each rank computed its own layers').
        n = len(self.moe_owner.moe_layers())
        mean, mx = out.get("expert_imbalance_mean", 0.0), out.get("expert_imbalance_max", 0.0)
        t = torch.tensor([mean * n, float(n), mx], dtype=torch.float64)
        summed, maxed = t[:2].clone().to(self.ctx.device), t[2:].clone().to(self.ctx.device)
        torch.distributed.all_reduce(summed, group=self.norm_group)
        torch.distributed.all_reduce(maxed, op=torch.distributed.ReduceOp.MAX, group=self.norm_group)
        if summed[1] > 0:
            out["expert_imbalance_mean"] = float(summed[0] / summed[1])
            out["expert_imbalance_max"] = float(maxed[0])
        return out

    @torch.no_grad()
    def eval_loss(self, batches) -> Dict[str, float]:
        """Mean token loss over ``[b, seq_len+1]`` batches (one forward-only pipeline pass each), dp-averaged."""
        tot = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            with self._autocast():
                res = self.pipe.step(self._microbatches(batch), eval_mode=True)
            n = float((batch[:, 1:] != -100).sum())
            tot += torch.tensor([float(res.loss) * n, n], dtype=torch.float64)
        tot = self.ctx.all_reduce_dp_sum_(tot.to(self.ctx.device)).cpu()
        if tot[1] == 0:
            return {}
        loss = float(tot[0] / tot[1])
        return {"val_loss": loss, "val_ppl": float(torch.tensor(loss).exp())}
