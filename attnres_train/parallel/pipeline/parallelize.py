"""``parallelize_pipeline``: cut the plain model into this rank's pipeline stages and apply EP / TP / AC /
compile / FSDP to them, in the same order as ``parallelize_model`` (see that module for why that order).

What a pipeline rank ends up with (:class:`PipelinedModel`):

* ``stages``: its V :class:`PipelineStageModule` s (stages ``r, r+P, ...``), each sharing the full model's
  modules; ``chunks``: one :class:`PipelineChunks` module registering exactly those modules under the *full
  model's* parameter names, so optimizers, DCP checkpoints and HF export see the same keys as on one process
  and a checkpoint can be resumed under any other layout;
* ``runtime``: the :class:`PipelineRuntime` on the ``pp`` mesh, which keeps FSDP from reducing gradients until
  each stage's last backward of the step (``before_last_backward``).

Construction: the full model is built and initialised on every rank from the same seed (initial weights do
not depend on the layout), EP and TP are applied to all of it (their collectives run inside the tp / ep groups,
which never span pipeline stages), then the decoder layers of other ranks' stages are replaced by empty
placeholders (their memory is freed; indices and ``len(layers)`` stay). The head / embedding of other ranks stay
referenced by the model object but are not registered in ``chunks``: nothing trains or saves them. Building the
whole model first costs time and peak host memory on very large models; a meta-device build of only this rank's
stages is the known next step (docs/pipeline.md, "Limits").

Tensor parallelism: boundary tensors travel as plain local tensors (``Replicate`` DTensors' local values, or the
sequence shard under SP, sent tp rank to tp rank); :class:`TensorParallelActivations` converts them at the stage
edges, differentiably. FSDP: ``fully_shard`` per decoder layer unit and per stage (each stage is its own FSDP
root, as torchtitan does with pipeline stages). Backward split into I/W (``pipeline.split_backward``) is rejected
with FSDP: FSDP's post-backward hooks fire on the input-gradient pass, before the weight gradients exist.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from ...config.errors import ConfigError
from .layout import PipelineLayout
from .runtime import PipelineRuntime, StepResult
from .stage import PipelineStageModule, build_stages


class TensorParallelActivations:
    """Boundary tensors between the wire (plain local tensors) and the TP model (DTensors on the tp mesh)."""

    def __init__(self, tp_mesh, sequence_parallel: bool):
        from torch.distributed.tensor import Replicate, Shard

        self.mesh = tp_mesh
        self.placements = [Shard(1) if sequence_parallel else Replicate()]

    def to_model(self, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(t, self.mesh, self.placements, run_check=False)

    def to_wire(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t


class _DroppedLayer(nn.Module):
    """Stands in for a decoder layer another pipeline rank owns (keeps indices and ``len(layers)``)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.index} lives on another pipeline rank")


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
        return [m for m in self.modules() if hasattr(m, "update_bias") and hasattr(m, "tokens_per_expert")]


class PipelinedModel:
    """This rank's part of a pipeline-parallel model and the runtime that steps it."""

    def __init__(self, model: nn.Module, layout: PipelineLayout, stages: List[PipelineStageModule],
                 runtime: PipelineRuntime, pp_rank: int):
        self.model, self.layout, self.stages, self.runtime, self.pp_rank = model, layout, stages, runtime, pp_rank
        self.chunks = PipelineChunks(stages)
        self._units: Dict[int, list] = {st.stage: _fsdp_units(st) for st in stages}
        runtime.before_last_backward = self._enable_grad_sync

    @property
    def holds_tied_copy(self) -> bool:
        """True on the last rank of a tied-embedding model when it does not also hold stage 0: its head weight
        is a copy of the embedding (same gradient after the step's exchange), counted once in the norm."""
        return self.runtime.tied and self.runtime.P > 1 and 0 not in self.runtime.stages and \
            self.layout.num_stages - 1 in self.runtime.stages

    def _set_grad_sync(self, stages, enabled: bool) -> None:
        for s in stages:
            for u in self._units[s]:
                u.set_requires_gradient_sync(enabled, recurse=False)

    def _enable_grad_sync(self, stage: int) -> None:
        self._set_grad_sync([stage], True)

    def step(self, microbatches, eval_mode: bool = False) -> StepResult:
        """One pipeline step: gradients accumulate locally; each stage's FSDP reduction runs once, in its last
        backward (``before_last_backward``)."""
        if not eval_mode:
            self._set_grad_sync(self._units, False)
        try:
            return self.runtime.step(microbatches, eval_mode=eval_mode)
        finally:
            self._set_grad_sync(self._units, True)


def _fsdp_units(module: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _apply_fsdp(model: nn.Module, stages: List[PipelineStageModule], pctx) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..data_parallel import _expert_placement_fn, _needs_sum_reduction, layer_unit

    dims = pctx.dims
    mesh = pctx.fsdp_mesh if dims.dp_replicate > 1 else pctx.dp_shard_mesh
    kw = dict(mesh=mesh, reshard_after_forward=False if dims.dp_shard == 1 else None,
              mp_policy=MixedPrecisionPolicy())
    if kw["reshard_after_forward"] is None:
        kw.pop("reshard_after_forward")
    expert_fn = _expert_placement_fn(model, pctx) if dims.ep > 1 else None
    for st in stages:
        for layer in st.model.layers.values():
            fully_shard(layer_unit(layer), shard_placement_fn=expert_fn, **kw)
        fully_shard(st, **kw)  # the stage's root unit: embedding / head / norms / pseudo-queries
        if _needs_sum_reduction(pctx.dp_mesh):
            for unit in _fsdp_units(st):
                unit.set_force_sum_reduction_for_comms(True)


class _Layers:
    """``model.model.layers`` view over the owned layers only (for the per-layer AC / compile wrappers)."""

    def __init__(self, layers):
        self.model = type("_Inner", (), {"layers": layers})()


def parallelize_pipeline(model: nn.Module, pctx, train_cfg=None, pipeline_cfg=None) -> PipelinedModel:
    """Cut ``model`` (identical on every rank) into this rank's stages and parallelize them (module docstring)."""
    from ...config.pipeline import PipelineConfig, validate_pipeline_config

    dims = pctx.dims
    pcfg = pipeline_cfg or PipelineConfig()
    validate_pipeline_config(pcfg, dims.pp, dims.vpp, model.config.num_layers)
    if pcfg.split_backward and dims.dp > 1:
        raise ConfigError("pipeline.split_backward", "the I/W backward split does not compose with data "
                          f"parallelism (FSDP reduces in the input-gradient pass); parallel dp={dims.dp}")
    if getattr(model, "_attnres_parallelized", False):
        raise RuntimeError("parallelize_pipeline was already applied to this model")
    layout = PipelineLayout.from_model_config(model.config, dims.pp, dims.vpp, layers_per_stage=pcfg.layers_per_stage,
                                              block_cache=pcfg.block_cache, embed_cost=pcfg.embed_cost,
                                              head_cost=pcfg.head_cost)
    if dims.ep > 1:
        from ..expert import apply_expert_parallel

        apply_expert_parallel(model, pctx.ep_mesh)
    if dims.tp > 1:
        from ..tensor import apply_tensor_parallel

        apply_tensor_parallel(model, pctx.tp_mesh, sequence_parallel=dims.sp)
    pp_mesh = pctx.mesh("pp")
    pp_rank = pp_mesh.get_local_rank()
    stages = build_stages(model, layout, pp_rank)
    owned = sorted(int(i) for st in stages for i in st.model.layers)
    layers = model.model.layers
    for i in range(len(layers)):
        if i not in owned:
            layers[i] = _DroppedLayer(i)
    if dims.tp > 1:
        adapter = TensorParallelActivations(pctx.tp_mesh, dims.sp)
        for st in stages:
            st.activation_adapter = adapter
    view = _Layers([layers[i] for i in owned])
    if train_cfg is not None and getattr(train_cfg, "activation_checkpointing", False):
        from ..wrap import apply_activation_checkpointing

        apply_activation_checkpointing(view)
    if train_cfg is not None and getattr(train_cfg, "compile", False):
        from ..wrap import apply_compile

        apply_compile(view, getattr(train_cfg, "compile_backend", "inductor"))
    if dims.dp > 1:
        _apply_fsdp(model, stages, pctx)
    comm_dtype = getattr(torch, pcfg.comm_dtype) if pcfg.comm_dtype else None
    runtime = PipelineRuntime(stages, layout, pcfg.schedule, pp_mesh, comm_dtype=comm_dtype,
                              group_size=pcfg.microbatch_group_size, split_iw=pcfg.split_backward,
                              w_delay=pcfg.w_delay, seq_shards=dims.tp if dims.sp else 1)
    runtime.sync_tied_weights()
    model._attnres_parallelized = True
    return PipelinedModel(model, layout, stages, runtime, pp_rank)
