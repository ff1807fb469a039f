"""``parallelize_pipeline``: cut the plain model into this rank's pipeline stages and apply EP / TP / AC /
compile / FSDP to each with the same ``parallelize_model`` as without a pipeline (one SPMD path).

Why these pieces: :class:`PipelineChunks` registers this rank's modules under the *full model's* names (optimizer,
DCP and export see one process's keys); :class:`TensorParallelActivations` converts boundary tensors between the
wire (plain local tensors) and the TP model (DTensors); :class:`PipelinedModel` keeps FSDP from reducing until
each stage's last backward. Only this rank's stages are materialised, with one process's values. The full
model records ``parallel_plan`` (``pipeline_parallel`` first). Construction step by step: docs/pipeline.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ...config.pipeline import PipelineConfig, check_pipeline_dp, validate_pipeline_config
from ...model.moe import moe_layers
from ..data_parallel import fsdp_param_dtype, set_grad_sync
from ..init import materialize_and_init
from ..parallelize import ParallelPlan, parallelize_model, record_plan
from .layout import PipelineLayout
from .runtime import PipelineRuntime, StepResult
from .schedules import schedule_placement
from .stage import PipelineStageModule, build_stages


class TensorParallelActivations:
    """Boundary tensors between the wire (plain local tensors) and the TP model (DTensors on the tp mesh)."""

    def __init__(self, tp_mesh, sequence_parallel: bool):
        self.mesh = tp_mesh
        self.placements = [Shard(1) if sequence_parallel else Replicate()]

    def to_model(self, t: torch.Tensor) -> torch.Tensor:
        return DTensor.from_local(t, self.mesh, self.placements, run_check=False)

    def to_wire(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t


class PipelineChunks(nn.Module):
    """This rank's stages' modules under the full model's names (``model.layers.<i>``, ``model.embed_tokens``,
    ``model.norm``, ``lm_head`` ...): the module the optimizer, checkpoints and exports use."""

    def __init__(self, stages: Sequence[PipelineStageModule]):
        super().__init__()
        shell = nn.Module()
        shell.layers = nn.ModuleDict()
        for st in stages:
            for name, mod in st.model.named_children():
                if name == "layers":
                    for idx, layer in mod.items():
                        shell.layers[idx] = layer
                else:
                    setattr(shell, name, mod)
            if st.is_last:
                self.lm_head = st.lm_head
        self.model = shell

    def moe_layers(self) -> list:
        return moe_layers(self)


class PipelinedModel:
    """This rank's part of a pipeline-parallel model and the runtime that steps it."""

    def __init__(
        self,
        model: nn.Module,
        layout: PipelineLayout,
        stages: List[PipelineStageModule],
        runtime: PipelineRuntime,
        pp_rank: int,
    ):
        self.model, self.layout, self.stages, self.runtime, self.pp_rank = model, layout, stages, runtime, pp_rank
        self.chunks = PipelineChunks(stages)
        runtime.before_last_backward = self._enable_grad_sync

    @property
    def holds_tied_copy(self) -> bool:
        """True on the last rank of a tied-embedding model when it does not also hold stage 0: its head weight
        is a copy of the embedding (same gradient after the step's exchange), counted once in the norm."""
        return (
            self.runtime.tied
            and self.runtime.P > 1
            and 0 not in self.runtime.stages
            and self.layout.num_stages - 1 in self.runtime.stages
        )

    def _set_grad_sync(self, stages, enabled: bool) -> None:
        by_stage = {st.stage: st for st in self.stages}
        for s in stages:
            set_grad_sync(by_stage[s], enabled)

    def _enable_grad_sync(self, stage: int) -> None:
        self._set_grad_sync([stage], True)

    def step(self, microbatches, eval_mode: bool = False) -> StepResult:
        """One pipeline step: sharded FSDP groups reduce-scatter every microbatch (gradients stay sharded);
        the HSDP replica all-reduce and replicated groups wait for each stage's last backward
        (``before_last_backward``), as ``data_parallel.no_grad_sync``."""
        if not eval_mode:
            self._set_grad_sync([st.stage for st in self.stages], False)
        try:
            return self.runtime.step(microbatches, eval_mode=eval_mode)
        finally:
            self._set_grad_sync([st.stage for st in self.stages], True)


def pipeline_comm_dtype(pcfg: PipelineConfig, train_cfg, device: torch.device):
    """The dtype of stage-to-stage messages: ``pipeline.comm_dtype``, else the run's compute dtype (bf16 under
    bf16 autocast); None (fp32 / fp64 training): the stages' parameter dtype, so fp64 runs stay exact."""
    if pcfg.comm_dtype:
        return getattr(torch, pcfg.comm_dtype)
    return fsdp_param_dtype(train_cfg, device)


def parallelize_pipeline(model: nn.Module, pctx, train_cfg=None, pipeline_cfg=None, seed=None) -> PipelinedModel:
    """Cut ``model`` (meta, or materialised identically on every rank) into this rank's stages, parallelise
    them and materialise them from ``seed`` (None: drawn from torch's global RNG) — module docstring."""
    dims = pctx.dims
    pcfg = pipeline_cfg or PipelineConfig()
    validate_pipeline_config(pcfg, dims.pp, dims.vpp, model.config.num_layers)
    check_pipeline_dp(pcfg, dims.dp)
    record_plan(model, ParallelPlan(), "parallelize_pipeline")  # claimed first: a failure midway is not retried
    on_meta = all(p.is_meta for p in model.parameters())
    layout = PipelineLayout.from_pipeline_config(
        model.config, pcfg, dims.pp, dims.vpp, schedule_placement(pcfg.schedule)
    )
    pp_mesh = pctx.mesh("pp")
    pp_rank = pp_mesh.get_local_rank()
    stages = build_stages(model, layout, pp_rank)
    for st in stages:  # the one SPMD path (EP -> TP/SP -> AC -> compile -> FSDP), per stage: each its FSDP root
        parallelize_model(st, pctx, train_cfg)
    if dims.tp > 1:
        adapter = TensorParallelActivations(pctx.tp_mesh, dims.sp)
        for st in stages:
            st.activation_adapter = adapter
    if on_meta:  # only this rank's stages ever get storage, filled with the single-process values
        materialize_and_init(PipelineChunks(stages), pctx.device, model.config, seed)
    else:  # a materialised model (tests, notebooks): free the layers of other ranks' stages
        owned = {id(m) for st in stages for m in st.model.layers.values()}
        for layer in model.model.layers:
            if id(layer) not in owned:
                layer.to_empty(device="meta")
    comm_dtype = pipeline_comm_dtype(pcfg, train_cfg, pctx.device)
    runtime = PipelineRuntime(
        stages,
        layout,
        pcfg.schedule,
        pp_mesh,
        comm_dtype=comm_dtype,
        group_size=pcfg.microbatch_group_size,
        split_iw=pcfg.split_backward,
        w_delay=pcfg.w_delay,
        seq_shards=dims.tp if dims.sp else 1,
    )
    applied = stages[0].parallel_plan
    model.parallel_plan = replace(applied, steps=("pipeline_parallel",) + applied.steps)
    return PipelinedModel(model, layout, stages, runtime, pp_rank)
