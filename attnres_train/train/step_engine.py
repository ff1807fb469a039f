"""Step engines: how this rank computes one forward/backward, composed by the one ``TrainModule``.

Why a seam: the optimizer step, clipping, router-bias update, stats reduction and eval averaging are the same
with and without pipeline parallelism; only the forward/backward over the microbatches, the eval forward and
which parameters / MoE layers this rank holds differ. Each engine parallelizes the model it is given and then
answers those questions. docs/training.md, "The train module and its step engines", has the contract.
"""

from __future__ import annotations

from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config.pipeline import PipelineConfig
from ..config.run import TrainerConfig
from ..model.doc_mask import document_ids
from ..parallel.data_parallel import finish_grad_sync, grad_sync
from ..parallel.init import materialize_and_init
from ..parallel.mesh import ParallelContext
from ..parallel.parallelize import parallelize_model
from ..parallel.pipeline.parallelize import parallelize_pipeline
from ..parallel.train_step import loss_weights

#: ``[(x_bt, y_bt), ...]``: one rank's batch cut into microbatches (inputs, next-token labels)
Microbatches = Sequence[Tuple[torch.Tensor, torch.Tensor]]
Autocast = Callable[[], ContextManager]


class StepEngine:
    """The contract (both engines): ``model`` is the module the optimizer and checkpoints see (full model
    parameter names); ``norm_group`` the process group whose ranks hold *disjoint* parameters (gradient norm and
    expert-imbalance metrics are combined over it; None: none); ``diagnostics_supported`` whether this rank can
    run depth statistics / text samples on ``model`` (it holds every layer and its activations are plain)."""

    model: nn.Module
    norm_group = None
    diagnostics_supported: bool = True

    def __init__(self, ctx: ParallelContext, doc_eos_id: Optional[int]):
        self.ctx = ctx
        self.doc_eos_id = doc_eos_id

    def doc_kwargs(self, x_bt: torch.Tensor) -> dict:
        """``{"doc_ids": ...}`` with document masking on (attnres_train.model.doc_mask), else nothing."""
        if self.doc_eos_id is None:
            return {}
        return {"doc_ids": document_ids(x_bt, self.doc_eos_id)}

    def grad_params(self) -> List[torch.Tensor]:
        """The parameters whose gradients enter the norm / clipping (each logical parameter once)."""
        return [p for p in self.model.parameters() if p.grad is not None]

    def moe_layers(self):
        """The MoE layers this rank owns (their router biases are updated by this rank)."""
        return self.model.moe_layers()

    def forward_backward(self, microbatches: Microbatches, autocast: Autocast) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward; gradients left in ``.grad`` (synchronised over dp). Returns this rank's (loss,
        aux loss) fp64 scalars whose dp mean is the step's global mean token loss and aux loss."""
        raise NotImplementedError

    def eval_forward(self, microbatches: Microbatches, autocast: Autocast) -> torch.Tensor:
        """The mean token loss of one eval batch (no gradients)."""
        raise NotImplementedError


class LocalStepEngine(StepEngine):
    """No pipeline: the whole (parallelized) model on this rank; microbatches run one after the other, each loss
    weighted so the summed gradient is that of the global mean token loss, gradient sync on the last one."""

    def __init__(
        self,
        model: nn.Module,
        ctx: ParallelContext,
        trainer_cfg: TrainerConfig,
        seed: Optional[int] = None,
        doc_eos_id: Optional[int] = None,
    ):
        super().__init__(ctx, doc_eos_id)
        on_meta = all(p.is_meta for p in model.parameters())
        if getattr(model, "parallel_plan", None) is None:
            parallelize_model(model, ctx, trainer_cfg)
        if on_meta:
            materialize_and_init(model, ctx.device, model.config, seed)
        self.model = model
        # TP's activations / logits are DTensors: depth statistics and sampling are skipped
        self.diagnostics_supported = ctx.dims.tp == 1

    def forward_backward(self, microbatches, autocast):
        n = len(microbatches)
        weights = loss_weights([y for _, y in microbatches], self.ctx)
        # Accumulated on the device: no host sync per microbatch (one, in the train module, per step).
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for i, ((x, y), w) in enumerate(zip(microbatches, weights)):
            with grad_sync(self.model, enabled=(i == n - 1)):
                with autocast():
                    out = self.model(x, labels=y, **self.doc_kwargs(x))
                total = out.loss * w
                if out.aux_loss is not None:
                    total = total + out.aux_loss / n
                    aux_sum += _local_scalar(out.aux_loss).double() / n
                total.backward()
            loss_sum += _local_scalar(out.loss).double() * w
        finish_grad_sync(self.model, self.ctx)
        # the weights include the dp factor: the dp mean of loss_sum is the global token mean
        return loss_sum, aux_sum

    def eval_forward(self, microbatches, autocast):
        """The whole eval batch in one forward (it is at most ``micro_batch_size`` rows)."""
        x = torch.cat([x for x, _ in microbatches])
        y = torch.cat([y for _, y in microbatches])
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast():
                return self.model(x, labels=y, **self.doc_kwargs(x)).loss
        finally:
            self.model.train(was_training)


class PipelineStepEngine(StepEngine):
    """``parallel.pp > 1``: this rank's stages (``parallelize_pipeline``); all microbatches of the batch go to
    the pipeline runtime at once (the schedule interleaves them). Loss and aux loss come back summed over the pp
    group; each microbatch's mean token loss has weight ``1/M`` (the global token mean whenever microbatches
    have equal supervised-token counts: always for packed pretraining data)."""

    diagnostics_supported = False  # no rank holds the whole model

    def __init__(
        self,
        model: nn.Module,
        ctx: ParallelContext,
        trainer_cfg: TrainerConfig,
        pipeline_cfg: PipelineConfig,
        seed: Optional[int] = None,
        doc_eos_id: Optional[int] = None,
    ):
        super().__init__(ctx, doc_eos_id)
        self.pipe = parallelize_pipeline(model, ctx, trainer_cfg, pipeline_cfg, seed=seed)
        for st in self.pipe.stages:  # document masking: every stage derives the ids itself
            st.doc_eos_id = doc_eos_id
        self.model = self.pipe.chunks  # this rank's stages under the full model's parameter names
        self.norm_group = ctx.mesh("pp").get_group()

    def grad_params(self):
        params = super().grad_params()
        if self.pipe.holds_tied_copy:  # a tied embedding's head copy: counted once, on the embedding's stage
            head = self.model.lm_head.weight
            params = [p for p in params if p is not head]
        return params

    def forward_backward(self, microbatches, autocast):
        with autocast():
            res = self.pipe.step(list(microbatches))
        finish_grad_sync(self.model, self.ctx)
        aux = res.aux_loss if res.aux_loss is not None else torch.zeros((), dtype=torch.float64, device=res.loss.device)
        return res.loss.double(), aux.double()

    def eval_forward(self, microbatches, autocast):
        with autocast():
            return self.pipe.step(list(microbatches), eval_mode=True).loss


def build_step_engine(
    model: nn.Module,
    ctx: ParallelContext,
    trainer_cfg: TrainerConfig,
    pipeline_cfg: Optional[PipelineConfig] = None,
    seed: Optional[int] = None,
    doc_eos_id: Optional[int] = None,
) -> StepEngine:
    """The pipeline engine when ``ctx.dims.pp > 1`` (then ``pipeline_cfg`` is required), else the local one."""
    if ctx.dims.pp > 1:
        if pipeline_cfg is None:
            raise TypeError("parallel.pp > 1 needs the run's PipelineConfig (pipeline_cfg)")
        return PipelineStepEngine(model, ctx, trainer_cfg, pipeline_cfg, seed=seed, doc_eos_id=doc_eos_id)
    return LocalStepEngine(model, ctx, trainer_cfg, seed=seed, doc_eos_id=doc_eos_id)


def _local_scalar(t: torch.Tensor) -> torch.Tensor:
    """A detached loss as a plain tensor (a tensor-parallel loss may be a replicated DTensor)."""
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t
