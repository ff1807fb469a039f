"""One pipeline stage's chunk of the full model, sharing (never copying) the model's modules.

Why: parameter names (``model.layers.<i>.*``) and numerics must stay those of the single-process model, so
checkpoints are layout independent and hooks on the layers (FSDP, activation checkpointing) still fire.
:class:`PipelineStageModule` registers by reference the modules stage ``s`` runs and calls the plain model's
cuttable API (``embed`` → ``forward_layers`` → ``head``). docs/pipeline.md, "Layout" (stage modules).
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from ...model.depth import DepthState
from ...model.doc_mask import document_ids
from ...model.init import resolve_seed
from ...model.moe import moe_layers
from ..init import materialize_and_init
from .layout import PipelineLayout


class StageOutput(NamedTuple):
    state: Optional[DepthState]  # normalised boundary state (None on the last stage)
    loss: Optional[torch.Tensor]  # mean token cross entropy of the microbatch (last stage only, fp32)
    aux_loss: Optional[torch.Tensor]  # this stage's MoE auxiliary losses (summed over its layers) or None


class PipelineStageModule(nn.Module):
    """Stage ``stage`` of ``layout`` cut from ``model`` (an :class:`~attnres_train.model.AttnResForCausalLM`)."""

    def __init__(self, model: nn.Module, layout: PipelineLayout, stage: int):
        super().__init__()
        if layout.num_layers != model.config.num_layers:
            raise ValueError(f"layout has {layout.num_layers} layers, the model {model.config.num_layers}")
        object.__setattr__(self, "_full", model)  # not a submodule: parameters() stays this stage's
        self.stage = stage
        self.layout = layout
        self.start, self.end = layout.layer_range(stage)
        self.is_first = stage == 0
        self.is_last = stage == layout.num_stages - 1
        self.partial_out = bool(layout.partial(stage)) if not self.is_last else False
        inner = model.model
        shell = nn.Module()
        shell.layers = nn.ModuleDict({str(i): inner.layers[i] for i in range(self.start, self.end)})
        if self.is_first:
            shell.embed_tokens = inner.embed_tokens
        if self.is_last:
            shell.norm = inner.norm
            if hasattr(inner, "output_attn_res_proj"):
                shell.output_attn_res_norm = inner.output_attn_res_norm
                shell.output_attn_res_proj = inner.output_attn_res_proj
        self.model = shell
        if self.is_last:
            self.lm_head = model.lm_head
        # Converts boundary tensors between the wire (plain local tensors) and the model's activation type
        # (e.g. tensor-parallel DTensors); set by ``parallelize_pipeline``. None = plain tensors throughout.
        self.activation_adapter = None
        # Document masking (``data.document_masking``): the EOS id documents end at, set by the train module.
        # Every stage derives the document ids from the microbatch's tokens (the runtime hands them to all).
        self.doc_eos_id = None

    @property
    def full_model(self) -> nn.Module:
        return self._full

    @property
    def config(self):
        return self._full.config

    def forward(
        self,
        state: Optional[DepthState] = None,
        input_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> StageOutput:
        m, ad = self._full, self.activation_adapter
        if self.is_first:
            state = m.embed(input_ids)
        elif state is None:
            raise ValueError(f"stage {self.stage} needs the depth state received from stage {self.stage - 1}")
        elif ad is not None:
            state = _map_state(state, ad.to_model)
        received = set() if self.is_first else {id(t) for t in state.sources()}
        doc_ids = None
        if self.doc_eos_id is not None:
            if input_ids is None:
                raise ValueError(f"stage {self.stage}: document masking needs the microbatch's input_ids")
            doc_ids = document_ids(input_ids, self.doc_eos_id)
        state = m.forward_layers(replace(state, aux_loss=None), self.start, self.end, doc_ids=doc_ids)
        if self.is_last:
            return StageOutput(None, self._loss(state, labels), state.aux_loss)
        state = close_completed_block(state, self.partial_out)
        # Blocks passed through unchanged leave as aliases, not as the inputs themselves: FSDP2 hands a unit its
        # inputs as views and warns when a unit returns a view (an in-place op on it would drop FSDP's hook).
        state = _map_state(state, lambda t: _PassThrough.apply(t) if id(t) in received else t)
        return StageOutput(state, None, state.aux_loss)

    def wire_state(self, state: DepthState) -> DepthState:
        """An output state as the wire carries it (plain local tensors). Called by the runtime after ``forward``:
        the stage's outputs (an FSDP2 unit's) stay the model's own tensors, not ``to_local()`` views."""
        ad = self.activation_adapter
        return _map_state(state, ad.to_wire) if ad is not None else state

    def _loss(self, state: DepthState, labels: torch.Tensor) -> torch.Tensor:
        """The model's LM loss through its ``lm_loss`` seam (fused and chunked when
        ``model.lm_loss_chunk_tokens > 0``, as its ``forward``); tensor parallelism substitutes that seam."""
        m = self._full
        chunk = m.config.lm_loss_chunk_tokens
        if chunk:
            return m.fused_lm_loss(m.final_hidden(state), self.lm_head.weight, labels, chunk)
        return m.lm_loss(m.head(state), labels)

    def moe_layers(self) -> list:
        """This stage's MoE modules (their router-bias load counters are per-stage buffers)."""
        return moe_layers(self)

    def extra_repr(self) -> str:
        parts = [f"stage={self.stage}", f"layers=[{self.start},{self.end})"]
        if self.is_first:
            parts.append("embed")
        if self.is_last:
            parts.append("head")
        return ", ".join(parts)


class _PassThrough(torch.autograd.Function):
    """Identity whose output aliases the input's storage without being a view of it (no copy)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.detach()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g


def _map_state(state: DepthState, fn) -> DepthState:
    return replace(
        state, blocks=[fn(b) for b in state.blocks], partial=None if state.partial is None else fn(state.partial)
    )


def close_completed_block(state: DepthState, partial_open: bool) -> DepthState:
    """Boundary normal form: if no block is open across the hop, the partial sum *is* the just-completed block.

    The model closes a block lazily (when the next block's first sublayer runs); at a stage boundary we close
    it eagerly so that ``blocks`` is exactly ``D(s)`` and ``partial`` is present iff ``π(s) = 1``. The next
    sublayer then sees ``partial=None`` and does not close anything again, so the math is unchanged.
    """
    if partial_open or not state.blocks or state.partial is None:
        return state  # prenorm (no blocks) keeps its hidden state as the partial
    return replace(state, blocks=state.blocks + [state.partial], partial=None)


def build_stages(model: nn.Module, layout: PipelineLayout, rank: int) -> List[PipelineStageModule]:
    """The V stage modules of pipeline rank ``rank`` (stages ``rank, rank+P, ...``)."""
    return [PipelineStageModule(model, layout, s) for s in layout.stages_of(rank)]


def materialize_stages(model: nn.Module, stages: List[PipelineStageModule], device, seed=None) -> None:
    """Allocate this rank's stage modules on ``device`` (from ``meta``) and give them the values one process
    would have from ``seed`` (None: drawn from torch's global RNG); other stages' modules stay on ``meta``."""
    seed = resolve_seed(seed)
    for st in stages:
        materialize_and_init(st, device, model.config, seed)
