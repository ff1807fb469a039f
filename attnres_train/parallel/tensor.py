"""Tensor parallelism (TP) and sequence parallelism (SP), applied to the plain model from outside.

Why here: ``apply_tensor_parallel`` is the TP plan as data (:func:`tensor_parallel_plan`, torchtitan style)
and the few model-wide steps around it. Parameters become DTensors under their own names; regions are forward
hooks (``tensor_regions.py``), the loss is a substituted child module (``tensor_loss.py``). Sharding table,
data flow and gradients: docs/tensor_parallel.md; the mechanism: docs/parallel.md, "How parallelism is applied".
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, parallelize_module

from ..config.parallel import check_tp_divisible
from ..model.kda import KimiDeltaAttention
from ..model.mla import MultiLatentAttention
from .parts import embedding, lm_head, named_decoder_layers
from .tensor_depth import substitute_depth_views
from .tensor_loss import VocabParallelLMLoss
from .tensor_regions import (
    SEQ_DIM,
    HeadParallel,
    RegionInput,
    SequenceParallelStats,
    TokenParallelMoE,
    VocabParallelEmbedding,
    distribute_param,
    reduce_partial_grad,
    swiglu_plan,
)

__all__ = [
    "apply_tensor_parallel",
    "tensor_parallel_plan",
    "tensor_parallel_sharding",
    "HeadParallel",
    "TokenParallelMoE",
    "VocabParallelEmbedding",
    "RegionInput",
    "SequenceParallelStats",
    "VocabParallelLMLoss",
    "KDA_PLACEMENTS",
    "MLA_PLACEMENTS",
]

#: KDA parameters (relative names) -> placement. Sharded by head: every per-head / per-channel tensor is split
#: on its head-major dim so rank r holds heads [r*H/tp, (r+1)*H/tp) of all of them consistently.
KDA_PLACEMENTS: Dict[str, Placement] = {
    "q_proj.weight": Shard(0),  # [H*K, d]
    "k_proj.weight": Shard(0),  # [H*K, d]
    "v_proj.weight": Shard(0),  # [H*V, d]
    "q_conv1d.weight": Shard(0),  # [H*K, 1, W] depthwise: channel c belongs to head c // K
    "k_conv1d.weight": Shard(0),
    "v_conv1d.weight": Shard(0),
    "f_a_proj.weight": Replicate(),  # [K, d] low-rank down-projection shared by all heads
    "f_b_proj.weight": Shard(0),  # [H*K, K]
    "A_log": Shard(0),  # [H]
    "dt_bias": Shard(0),  # [H*K]
    "b_proj.weight": Shard(0),  # [H, d]
    "g_a_proj.weight": Replicate(),  # [K, d] shared by all heads
    "g_b_proj.weight": Shard(0),  # [H*V, K]
    "o_norm.weight": Replicate(),  # [V] one gain shared by all heads
    "o_proj.weight": Shard(1),  # [d, H*V] row-parallel
}

#: MLA parameters -> placement. The latent (kv_a) path is computed redundantly on every tp rank: it is a small
#: d -> (r + p) projection, and sharding it would need a gather before kv_b_proj (which needs all r dims).
MLA_PLACEMENTS: Dict[str, Placement] = {
    "q_proj.weight": Shard(0),  # [H*(n+p), d]
    "kv_a_proj_with_mqa.weight": Replicate(),  # [r+p, d]
    "kv_a_layernorm.weight": Replicate(),  # [r]
    "kv_b_proj.weight": Shard(0),  # [H*(n+v), r]
    "o_proj.weight": Shard(1),  # [d, H*v]
}


# ------------------------------------------------------------------------------------------------ the plan
def tensor_parallel_plan(
    model: nn.Module, sequence_parallel: bool, src_data_rank: Optional[int] = 0
) -> Dict[str, ParallelStyle]:
    """FQN -> ParallelStyle for ``parallelize_module`` (the whole TP layout as data, torchtitan style).

    Parameters not named here (norm gains, AttnRes pseudo-queries and their gains) become replicated DTensors
    in :func:`apply_tensor_parallel`.
    """
    act = Shard(SEQ_DIM) if sequence_parallel else Replicate()
    plan: Dict[str, ParallelStyle] = {}
    if embedding(model) is not None:
        plan["model.embed_tokens"] = VocabParallelEmbedding(act)
    if lm_head(model) is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=act, output_layouts=Shard(-1), use_local_output=False)
        plan["lm_head.__input__"] = RegionInput(act)  # applied separately (a module can take one plan entry)
    for i, layer in named_decoder_layers(model):
        pre = f"model.layers.{i}"
        mixer = layer.self_attn
        if isinstance(mixer, KimiDeltaAttention):
            plan[f"{pre}.self_attn"] = HeadParallel(
                KDA_PLACEMENTS, sequence_parallel, src_data_rank, "model.kda.num_heads"
            )
        elif isinstance(mixer, MultiLatentAttention):
            plan[f"{pre}.self_attn"] = HeadParallel(
                MLA_PLACEMENTS, sequence_parallel, src_data_rank, "model.mla.num_heads"
            )
        else:
            raise TypeError(f"{pre}.self_attn: no tensor-parallel plan for {type(mixer).__name__}")
        if layer.is_moe:
            plan[f"{pre}.block_sparse_moe"] = TokenParallelMoE(sequence_parallel, src_data_rank)
        else:
            for k, style in swiglu_plan(act, use_local_output=False).items():
                plan[f"{pre}.mlp.{k}" if k else f"{pre}.mlp"] = style
    for style in plan.values():
        style.src_data_rank = src_data_rank
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Tensor-parallelise ``model`` (an ``AttnResForCausalLM``) over the 1-D ``tp_mesh``, in place.

    Every parameter becomes a DTensor on ``tp_mesh`` (placements: :func:`tensor_parallel_sharding`); the
    residual stream / DepthState between sublayers becomes a DTensor (``Shard(1)`` with
    ``sequence_parallel``, else ``Replicate()``); ``forward(ids)`` returns vocab-sharded DTensor logits and
    ``forward(ids, labels).loss`` the vocab-parallel cross entropy as a plain scalar (the same on every tp rank).
    Call before building the optimizer (parameters are replaced), after expert parallelism (EP-sharded experts
    are left alone) and before FSDP. Works on a meta-device model.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be 1-D (slice it, e.g. world_mesh['tp']), got {tp_mesh.ndim}-D")
    if any(isinstance(p, DTensor) and p.device_mesh == tp_mesh for p in model.parameters()):
        raise RuntimeError("apply_tensor_parallel was already applied to this model")
    check_tp_divisible(model.config, tp_mesh.size())  # a stage exposes its full model's config
    act = Shard(SEQ_DIM) if sequence_parallel else Replicate()
    embed, head = embedding(model), lm_head(model)
    tied = embed is not None and head is not None and head.weight is embed.weight

    plan = tensor_parallel_plan(model, sequence_parallel)
    head_style, head_input = plan.pop("lm_head", None), plan.pop("lm_head.__input__", None)
    parallelize_module(model, tp_mesh, plan)
    if head is not None:
        if tied:  # one Shard(0) parameter serves as the row-parallel embedding and the column-parallel head
            head.weight = embed.weight
            head_style = _TiedColwiseParallel(
                input_layouts=head_style.input_layouts[0],
                output_layouts=head_style.output_layouts[0],
                use_local_output=False,
            )
        head_style._apply(head, tp_mesh)
        head_input._apply(head, tp_mesh)  # prepended: runs before the column-parallel input hook

    # Everything not covered by the plan (norm gains, AttnRes queries/gains) is replicated; these run on the
    # residual-stream DTensors directly.
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and not isinstance(p, DTensor):
                distribute_param(module, name, tp_mesh, Replicate(), 0)

    for p in model.parameters():
        if isinstance(p, DTensor) and p.device_mesh == tp_mesh and p.requires_grad:
            if any(pl.is_replicate() for pl in p.placements):
                p.register_hook(reduce_partial_grad)

    if head is not None:  # module substitution of the loss seam (on the full model when ``model`` is a stage)
        getattr(model, "full_model", model).lm_loss = VocabParallelLMLoss(tp_mesh, act)
    # The depth-mixing seams (the full model's and its layers'): AttnRes mixes the local shards
    substitute_depth_views(getattr(model, "full_model", model))
    if sequence_parallel and embed is not None:
        embed.register_forward_pre_hook(functools.partial(_check_seq_len, tp_mesh.size()))


class _TiedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for an LM head whose weight already is the vocab-sharded (``Shard(0)``) embedding."""

    def _partition_linear_fn(self, name, module, device_mesh):
        pass


def _check_seq_len(tp: int, module: nn.Module, args) -> None:
    T = args[0].shape[SEQ_DIM]
    if T % tp:
        raise ValueError(
            f"sequence parallelism needs the sequence length ({T}) divisible by the tensor-parallel degree ({tp})"
        )


def tensor_parallel_sharding(model: nn.Module) -> List[Tuple[str, Tuple[int, ...], str]]:
    """``(name, global shape, placements)`` of every parameter, e.g. to print or document the layout."""
    rows = []
    for name, p in model.named_parameters():
        pl = "plain" if not isinstance(p, DTensor) else ",".join(str(x) for x in p.placements)
        rows.append((name, tuple(p.shape), pl))
    return rows
