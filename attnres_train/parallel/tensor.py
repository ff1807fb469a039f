"""Tensor parallelism (TP) and sequence parallelism (SP), applied to the plain model from outside.

``apply_tensor_parallel(model, tp_mesh, sequence_parallel)`` turns every parameter of an
:class:`~attnres_train.model.transformer.AttnResForCausalLM` into a DTensor on the 1-D ``tp_mesh`` (sharded or
replicated, table in ``docs/tensor_parallel.md``) and makes the forward exchange activations over the tp group.
The model code stays free of ``torch.distributed``: its only TP-related traits are head counts read from tensor
shapes (``-1``) and the ``lm_loss`` seam.

Activation layout. Between sublayers, the residual stream and every :class:`DepthState` tensor (blocks,
partial sum) is a DTensor on ``tp_mesh``: ``Shard(1)`` (sequence-sharded) with SP, ``Replicate()`` without.
Norms and the AttnRes depth mixing (``depth.py``) are per-token, so they run unchanged on those DTensors and
issue no collective (tested). Each token mixer / FFN is a *tensor-parallel region*:

* entry: all-gather over the sequence (SP) - backward reduce-scatter; without SP nothing (backward all-reduce);
* inside: plain local tensors, each rank computing its heads / its FFN columns;
* exit: the row-parallel output's partial sums are reduce-scattered (SP) or all-reduced (TP).

Pieces, and why each is what it is:

* Embedding: :class:`VocabParallelEmbedding` (masked lookup in this rank's vocab rows, partial sums
  reduce-scattered into the sequence shards; custom because the stock ``RowwiseParallel`` materialises a
  replicated full-vocab weight gradient on every rank in torch 2.13). LM head: stock ``ColwiseParallel`` with vocab-sharded output; the loss is
  :func:`~attnres_train.parallel.tp_ops.vocab_parallel_cross_entropy`, installed as ``model.lm_loss`` (and its
  fused, chunked form from the hidden states as ``model.fused_lm_loss``: :class:`VocabParallelFusedLMLoss`).
* Dense FFN and the MoE shared expert (``SwiGLU``): stock ``PrepareModuleInput`` + ``ColwiseParallel``
  (gate/up) + ``RowwiseParallel`` (down): column -> row, one gather and one reduce(-scatter).
* KDA and MLA (:class:`HeadParallel`): custom, because their forwards use parameters directly (conv weights,
  ``A_log``, ``dt_bias``, ``o_norm``, the shared ``k_pe``) and mix per-head and replicated low-rank paths;
  stock DTensor styles would hand them DTensors where they need local tensors. Parameters are stored as
  DTensors (for FSDP2 / DCP) and presented to the unmodified forward as local tensors for the duration of the
  call. Replicated parameters inside a region (KDA ``f_a_proj``, ``g_a_proj``, ``o_norm``; MLA
  ``kv_a_proj_with_mqa``, ``kv_a_layernorm``) get *partial* local gradients (each rank back-propagates only
  through its own heads), which are summed over tp (see "Gradients").
* MoE (:class:`TokenParallelMoE`): the router and the routed experts are replicated over tp and run on this
  rank's own tokens - the sequence shard with SP (no expert compute is duplicated), every token without SP
  (identical on all tp ranks). Under SP they therefore see different tokens per tp rank, like data-parallel
  replicas: their gradients are partial and summed over tp, the router-load counters ``tokens_per_expert``
  count only this rank's shard (sum them over the tp group too - summing over the whole world, as the train
  module does, is right), and the optional sequence-wise balance loss is made exact by all-reducing its
  per-sequence statistics. Routed experts that are already DTensors (expert parallelism applied first) are
  left to EP: under SP their gradient must additionally be summed over the tp group by whoever reduces them.

Gradients. After ``backward()`` every parameter's ``grad`` is a DTensor with the parameter's own placements.
Replicated parameters whose local gradient is partial (the ones above, and with SP every norm gain and AttnRes
query, which only see this rank's tokens) carry a gradient hook that all-reduces the ``Partial`` gradient over
tp. FSDP2 replaces parameter objects (and so drops such hooks) but redistributes ``Partial`` TP gradients to
the parameter placement itself before its reduce-scatter, so the result is the same.

Requirements: the plain model is on the meta device (then ``parallel.init.materialize_and_init``) or identical
on every tp rank (``distribute_tensor`` takes tp rank 0's values); every tp rank gets the same batch; with SP the
sequence length is divisible by the tp degree. Gloo (CPU) and NCCL (GPU) run the same code; torch 2.13's gloo
has every collective used here (all_gather_into_tensor, reduce_scatter_tensor, all_reduce SUM/MAX, scatter).
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from ..model.kda import KimiDeltaAttention
from ..model.lm_loss import fused_linear_cross_entropy, token_cross_entropy
from ..model.mla import MultiLatentAttention
from ..model.moe import MoE
from .parts import decoder_layers, embedding, lm_head, named_decoder_layers
from .tp_ops import all_reduce_replicated, reduce_grad, vocab_parallel_cross_entropy, vocab_parallel_fused_cross_entropy

__all__ = [
    "apply_tensor_parallel",
    "tensor_parallel_plan",
    "tensor_parallel_sharding",
    "HeadParallel",
    "TokenParallelMoE",
    "VocabParallelEmbedding",
    "RegionInput",
    "VocabParallelLMLoss",
    "KDA_PLACEMENTS",
    "MLA_PLACEMENTS",
]

SEQ_DIM = 1  # [B, T, d]

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


# --------------------------------------------------------------------------------------------------- helpers
def _resolve(module: nn.Module, rel_name: str) -> Tuple[nn.Module, str]:
    *path, name = rel_name.split(".")
    owner = module
    for p in path:
        owner = getattr(owner, p)
    return owner, name


def _distribute_param(owner: nn.Module, name: str, mesh: DeviceMesh, placement: Placement,
                      src_data_rank: Optional[int]) -> None:
    p = owner._parameters[name]
    if isinstance(p, DTensor):
        raise RuntimeError(f"{type(owner).__name__}.{name} is already a DTensor: apply_tensor_parallel applied twice?")
    if isinstance(placement, Shard) and p.shape[placement.dim] % mesh.size():
        raise ValueError(f"{type(owner).__name__}.{name} {tuple(p.shape)}: dim {placement.dim} is not divisible by "
                         f"the tensor-parallel degree {mesh.size()}")
    dt = distribute_tensor(p.detach(), mesh, [placement], src_data_rank=src_data_rank)
    owner.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


def _local_view(partial: bool):
    """View of a DTensor parameter as its local tensor; ``partial``: this rank's gradient is only a partial sum
    over tp (a replicated parameter used on this rank's heads or tokens), marked ``Partial`` so it is summed."""

    def view(p: DTensor) -> torch.Tensor:
        return p.to_local(grad_placements=[Partial() if (partial and pl.is_replicate()) else pl
                                           for pl in p.placements])

    return view


def _ep_view_reduced_over(group):
    """View of an expert-parallel (DTensor on the EP mesh) parameter whose gradient is also summed over
    ``group`` (the tp group under SP): still a DTensor, so the EP runner takes it as before."""

    def view(p: DTensor) -> torch.Tensor:
        local = reduce_grad(p.to_local(), group)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    return view


def _wrap_forward_with_local_params(module: nn.Module, views: Dict[str, Callable], enter, leave) -> None:
    """Run ``module.forward`` on local tensors: inputs via ``enter``, outputs via ``leave``, and every DTensor
    parameter named in ``views`` replaced by ``views[name](param)`` during the call (restored afterwards, also on
    error). Installed as an instance attribute, like activation checkpointing in ``parallel/wrap.py``; module hooks
    (FSDP2's unshard) still run before it, so it sees the unsharded parameters, and the views are taken inside
    the autograd graph (so activation-checkpoint recomputation and FSDP2 keep the gradient semantics).
    """
    inner = module.forward
    targets = [(*_resolve(module, n), view) for n, view in views.items()]

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        args, ctx = enter(args)
        saved = []
        try:
            for owner, name, view in targets:
                p = owner._parameters[name]
                if isinstance(p, DTensor):
                    saved.append((owner, name, p))
                    owner._parameters[name] = view(p)
            out = inner(*args, **kwargs)
        finally:
            for owner, name, p in reversed(saved):
                owner._parameters[name] = p
        return leave(out, ctx)

    module.forward = forward


class _ReduceGradToReplicate(torch.autograd.Function):
    """Identity on a ``Replicate`` DTensor whose backward sums a ``Partial`` gradient (all-reduce over tp)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_partial_grad(grad)


def _enter_region(x: torch.Tensor, mesh: DeviceMesh, layout: Placement) -> DTensor:
    """The replicated (full-sequence) input of a tensor-parallel region, from the residual-stream layout.

    ``x``: DTensor, or a local tensor taken to have ``layout``. Backward returns the gradient in the input's
    layout with the region's partial sums reduced: reduce-scatter (``Shard``) or all-reduce (``Replicate``),
    so the residual stream only ever carries complete gradients (and never a ``Partial`` one that would reach
    the embedding's masked-partial output, which torch 2.13 cannot redistribute).
    """
    dx = x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [layout], run_check=False)
    if dx.placements == (Replicate(),):
        return _ReduceGradToReplicate.apply(dx)
    return dx.redistribute(mesh, [Replicate()])


# ------------------------------------------------------------------------------------------- custom styles
class RegionInput(ParallelStyle):
    """``PrepareModuleInput`` for the first argument of a tensor-parallel region (SwiGLU, LM head).

    Unlike the stock style it also reduces the gradient without SP (see :func:`_enter_region`). Runs before
    any other forward pre-hook of the module (e.g. ``ColwiseParallel``'s, which then finds a replicated
    DTensor and does nothing).
    """

    def __init__(self, layout: Placement):
        super().__init__()
        self.layout = layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        layout = self.layout

        def hook(mod, args):
            return (_enter_region(args[0], device_mesh, layout), *args[1:])

        module.register_forward_pre_hook(hook, prepend=True)
        return module


class HeadParallel(ParallelStyle):
    """Head-parallel token mixer (KDA or MLA): one tensor-parallel region.

    ``placements`` maps every parameter of the module (relative names) to ``Shard(dim)`` or ``Replicate()``;
    a parameter missing from it is an error (a new parameter must be given a placement, not silently
    replicated). Input: DTensor ``Shard(1)`` (SP) or ``Replicate()`` (or a local tensor with that layout);
    all-gathered to the full sequence. Output: the same layout as the input, from the row-parallel partial sums.
    """

    def __init__(self, placements: Dict[str, Placement], sequence_parallel: bool, src_data_rank: Optional[int] = 0):
        super().__init__()
        self.placements = dict(placements)
        self.act = Shard(SEQ_DIM) if sequence_parallel else Replicate()
        self.src_data_rank = src_data_rank

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        heads = getattr(module, "num_heads", None)
        if heads is not None and heads % tp:
            raise ValueError(f"{type(module).__name__} has {heads} heads, not divisible by the tensor-parallel "
                             f"degree {tp}")
        names = {n for n, _ in module.named_parameters()}
        if names != set(self.placements):
            raise ValueError(f"{type(module).__name__}: TP placements do not match its parameters; "
                             f"missing {sorted(names - set(self.placements))}, "
                             f"unknown {sorted(set(self.placements) - names)}")
        for rel, placement in self.placements.items():
            _distribute_param(*_resolve(module, rel), device_mesh, placement, self.src_data_rank)
        mesh, act = device_mesh, self.act

        def enter(args):
            x, *rest = args
            # SP: all-gather the sequence (backward: reduce-scatter). Inside the region every gradient that
            # reaches a replicated tensor is a partial sum over tp.
            dx = _enter_region(x, mesh, act)
            return (dx.to_local(grad_placements=[Partial()]), *rest), isinstance(x, DTensor)

        def leave(y, was_dtensor):
            dy = DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [act])
            return dy if was_dtensor else dy.to_local()

        views = {rel: _local_view(partial=pl.is_replicate()) for rel, pl in self.placements.items()}
        _wrap_forward_with_local_params(module, views, enter, leave)
        return module


class VocabParallelEmbedding(ParallelStyle):
    """Row (vocab) parallel ``nn.Embedding``: ``weight`` ``Shard(0)``; output DTensor with ``layout``.

    Each rank looks up the ids in its vocab slice (others read row 0 and are zeroed), and the partial sums are
    reduce-scattered over the sequence (SP) or all-reduced. Not the stock ``RowwiseParallel``: with a
    replicated output gradient, torch 2.13 computes that one's weight gradient as a full ``Replicate``
    ``[vocab, d]`` tensor on every rank; here each rank back-propagates into its own rows only.
    """

    def __init__(self, layout: Placement, src_data_rank: Optional[int] = 0):
        super().__init__()
        self.layout = layout
        self.src_data_rank = src_data_rank

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Embedding) or module.padding_idx is not None:
            raise TypeError("VocabParallelEmbedding applies to nn.Embedding without padding_idx")
        _distribute_param(module, "weight", device_mesh, Shard(0), self.src_data_rank)
        mesh, layout = device_mesh, self.layout
        V_local = module.weight.to_local().shape[0]
        start = mesh.get_local_rank() * V_local

        def enter(args):
            ids, *rest = args
            if isinstance(ids, DTensor):
                ids = ids.full_tensor()
            outside = (ids < start) | (ids >= start + V_local)
            return ((ids - start).masked_fill(outside, 0), *rest), outside

        def leave(y, outside):
            y = y.masked_fill(outside.unsqueeze(-1), 0)
            return DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [layout])

        _wrap_forward_with_local_params(module, {"weight": _local_view(partial=False)}, enter, leave)
        return module


def _swiglu_plan(tokens: Placement, use_local_output: bool) -> Dict[str, ParallelStyle]:
    """Column -> row parallel SwiGLU whose input/output tokens have layout ``tokens`` (FQNs relative to it).

    The module-level :class:`RegionInput` gathers once for both column-parallel inputs (gate, up); their input
    gradients stay ``Partial`` DTensors and are reduced once, by that gather's backward.
    """
    return {
        "": RegionInput(tokens),
        "gate_proj": ColwiseParallel(),
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=tokens, use_local_output=use_local_output),
    }


class TokenParallelMoE(ParallelStyle):
    """MoE under TP: replicated router + routed experts on this rank's tokens, column/row-parallel shared expert.

    Input ``[B, T(/tp), d]`` DTensor (``Shard(1)`` with SP, else ``Replicate()``), output the same layout.
    """

    def __init__(self, sequence_parallel: bool, src_data_rank: Optional[int] = 0):
        super().__init__()
        self.sp = sequence_parallel
        self.act = Shard(SEQ_DIM) if sequence_parallel else Replicate()
        self.src_data_rank = src_data_rank

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MoE):
            raise TypeError(f"TokenParallelMoE applies to MoE modules, got {type(module).__name__}")
        mesh, act, sp = device_mesh, self.act, self.sp
        # With SP each tp rank routes its own tokens, so the router's and the experts' gradients are partial.
        views = {"gate.weight": _local_view(partial=sp)}
        _distribute_param(module.gate, "weight", mesh, Replicate(), self.src_data_rank)
        for name in ("w1", "w2", "w3"):
            if isinstance(getattr(module.experts, name), DTensor):
                # Expert parallelism got there first and owns them (sharded on its EP mesh, used by its runner).
                # Under SP their gradient must still be summed over tp: do it inside the graph.
                if sp:
                    views[f"experts.{name}"] = _ep_view_reduced_over(mesh.get_group())
            else:
                _distribute_param(module.experts, name, mesh, Replicate(), self.src_data_rank)
                views[f"experts.{name}"] = _local_view(partial=sp)
        if module.shared_experts is not None:
            # MoE.forward flattens tokens to [N, d] before the shared expert: with SP, N is this rank's shard.
            plan = _swiglu_plan(Shard(0) if sp else Replicate(), use_local_output=True)
            plan.pop("")._apply(module.shared_experts, mesh)
            parallelize_module(module.shared_experts, mesh, plan, src_data_rank=self.src_data_rank)
        if sp:
            group, tp = mesh.get_group(), mesh.size()
            module.sequence_aux_loss = types.MethodType(functools.partial(_sp_sequence_aux_loss, group, tp), module)

        def enter(args):
            x, *rest = args
            if isinstance(x, DTensor):
                return (x.to_local(), *rest), True  # grad placements = x's: Shard(1) (SP) / Replicate
            return (x, *rest), False

        def leave(out, was_dtensor):
            y, aux = out
            if was_dtensor:
                y = DTensor.from_local(y, mesh, [act], run_check=False)
            return y, aux

        _wrap_forward_with_local_params(module, views, enter, leave)
        return module


def _sp_sequence_aux_loss(group, tp: int, moe: MoE, topk_idx_TK: torch.Tensor, scores_TE: torch.Tensor,
                          batch_size: int) -> torch.Tensor:
    """``MoE.sequence_aux_loss`` on sequence shards, equal to the single-process value.

    Per sequence ``f_i`` (routing counts) and ``P_i`` (mean normalised score) are sums over its tokens, which
    are spread over the tp ranks: sum the shard statistics over tp (counts: no gradient; ``P``: forward
    all-reduce, identity backward, since the loss is then replicated and every rank back-propagates it).
    """
    E, K = moe.num_experts, moe.top_k
    s_BSE = scores_TE.view(batch_size, -1, E)
    S = s_BSE.shape[1] * tp
    P_BE = all_reduce_replicated((s_BSE / s_BSE.sum(dim=-1, keepdim=True)).sum(dim=1), group) / S
    idx_BN = topk_idx_TK.view(batch_size, -1)
    hits_BE = torch.zeros(batch_size, E, device=idx_BN.device, dtype=P_BE.dtype)
    hits_BE.scatter_add_(1, idx_BN, torch.ones_like(idx_BN, dtype=P_BE.dtype))
    dist.all_reduce(hits_BE, group=group)
    f_BE = hits_BE * (E / (K * S))
    return moe.seq_aux_loss_coef * (f_BE * P_BE).sum(dim=-1).mean()


class VocabParallelLMLoss:
    """``model.lm_loss`` for vocab-sharded logits (DTensor ``Shard(-1)`` from the column-parallel LM head)."""

    def __init__(self, tp_mesh: DeviceMesh):
        self.mesh = tp_mesh

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, DTensor):
            if logits.placements != (Shard(logits.ndim - 1),) and logits.placements != (Shard(-1),):
                logits = logits.redistribute(self.mesh, [Shard(logits.ndim - 1)])
            local = logits.to_local()
            vocab_start = self.mesh.get_local_rank() * local.shape[-1]
            return vocab_parallel_cross_entropy(local, labels, vocab_start, self.mesh.get_group())
        return token_cross_entropy(logits, labels)  # full (local) logits

    def __deepcopy__(self, memo):  # process groups cannot be copied: a deep-copied model shares the mesh
        return self

    def __repr__(self) -> str:
        return f"VocabParallelLMLoss(tp={self.mesh.size()})"


class VocabParallelFusedLMLoss:
    """``model.fused_lm_loss`` for the column-parallel (vocab-sharded, ``Shard(0)`` weight) LM head.

    The head module's input hooks do not run (the head is not called): the hidden states are brought to the
    region's replicated full-sequence layout here (:func:`_enter_region`: all-gather under SP) and their local
    gradient, this rank's vocab partial sum, is reduced on the way back (all-reduce / reduce-scatter).
    """

    def __init__(self, tp_mesh: DeviceMesh, layout: Placement):
        self.mesh, self.layout = tp_mesh, layout

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 chunk_tokens: int) -> torch.Tensor:
        if not isinstance(weight, DTensor):
            return fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens)
        if weight.placements != (Shard(0),):
            raise ValueError(f"fused LM loss: expected the head weight as Shard(0) on the tp mesh, got "
                             f"{weight.placements}")
        h = _enter_region(hidden, self.mesh, self.layout).to_local(grad_placements=[Partial()])
        w_local = weight.to_local()
        vocab_start = self.mesh.get_local_rank() * w_local.shape[0]
        return vocab_parallel_fused_cross_entropy(h, w_local, labels, vocab_start, chunk_tokens,
                                                  self.mesh.get_group())

    def __deepcopy__(self, memo):  # process groups cannot be copied: a deep-copied model shares the mesh
        return self

    def __repr__(self) -> str:
        return f"VocabParallelFusedLMLoss(tp={self.mesh.size()}, {self.layout})"


# ------------------------------------------------------------------------------------------------ the plan
def tensor_parallel_plan(model: nn.Module, sequence_parallel: bool,
                         src_data_rank: Optional[int] = 0) -> Dict[str, ParallelStyle]:
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
            plan[f"{pre}.self_attn"] = HeadParallel(KDA_PLACEMENTS, sequence_parallel, src_data_rank)
        elif isinstance(mixer, MultiLatentAttention):
            plan[f"{pre}.self_attn"] = HeadParallel(MLA_PLACEMENTS, sequence_parallel, src_data_rank)
        else:
            raise TypeError(f"{pre}.self_attn: no tensor-parallel plan for {type(mixer).__name__}")
        if layer.is_moe:
            plan[f"{pre}.block_sparse_moe"] = TokenParallelMoE(sequence_parallel, src_data_rank)
        else:
            for k, style in _swiglu_plan(act, use_local_output=False).items():
                plan[f"{pre}.mlp.{k}" if k else f"{pre}.mlp"] = style
    for style in plan.values():
        style.src_data_rank = src_data_rank
    return plan


def _reduce_partial_grad(grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook of replicated parameters: sum a ``Partial`` gradient over its mesh dims (all-reduce)."""
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        return grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p for p in grad.placements])
    return grad


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
    _check_divisible(model, tp_mesh.size())
    embed, head = embedding(model), lm_head(model)
    tied = embed is not None and head is not None and head.weight is embed.weight

    plan = tensor_parallel_plan(model, sequence_parallel)
    head_style, head_input = plan.pop("lm_head", None), plan.pop("lm_head.__input__", None)
    parallelize_module(model, tp_mesh, plan)
    if head is not None:
        if tied:  # one Shard(0) parameter serves as the row-parallel embedding and the column-parallel head
            head.weight = embed.weight
            head_style = _TiedColwiseParallel(input_layouts=head_style.input_layouts[0],
                                              output_layouts=head_style.output_layouts[0], use_local_output=False)
        head_style._apply(head, tp_mesh)
        head_input._apply(head, tp_mesh)  # prepended: runs before the column-parallel input hook

    # Everything not covered by the plan (norm gains, AttnRes queries/gains) is replicated; these run on the
    # residual-stream DTensors directly.
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and not isinstance(p, DTensor):
                _distribute_param(module, name, tp_mesh, Replicate(), 0)

    for p in model.parameters():
        if isinstance(p, DTensor) and p.device_mesh == tp_mesh and p.requires_grad:
            if any(pl.is_replicate() for pl in p.placements):
                p.register_hook(_reduce_partial_grad)

    if head is not None:
        model.lm_loss = VocabParallelLMLoss(tp_mesh)
        model.fused_lm_loss = VocabParallelFusedLMLoss(tp_mesh, Shard(SEQ_DIM) if sequence_parallel else Replicate())
    if sequence_parallel and embed is not None:
        embed.register_forward_pre_hook(functools.partial(_check_seq_len, tp_mesh.size()))


class _TiedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for an LM head whose weight already is the vocab-sharded (``Shard(0)``) embedding."""

    def _partition_linear_fn(self, name, module, device_mesh):
        pass


def _check_divisible(model: nn.Module, tp: int) -> None:
    """Every sharded size must split evenly over tp (checked up front, naming the config field)."""
    cfg = model.config  # a stage exposes its full model's
    sizes = [("vocab_size", cfg.vocab_size)]
    for layer in decoder_layers(model):
        prefix = "mla" if layer.is_mla else "kda"
        sizes.append((f"{prefix}.num_heads", layer.self_attn.num_heads))
        if not layer.is_moe:
            sizes.append(("moe.dense_intermediate_size", layer.mlp.intermediate_size))
        elif layer.block_sparse_moe.shared_experts is not None:
            sizes.append(("moe.intermediate_size * moe.num_shared_experts",
                          layer.block_sparse_moe.shared_experts.intermediate_size))
    for field_name, value in sizes:
        if value % tp:
            raise ValueError(f"model.{field_name}={value} is not divisible by the tensor-parallel degree {tp}")


def _check_seq_len(tp: int, module: nn.Module, args) -> None:
    T = args[0].shape[SEQ_DIM]
    if T % tp:
        raise ValueError(f"sequence parallelism needs the sequence length ({T}) divisible by the tensor-parallel "
                         f"degree ({tp})")


def tensor_parallel_sharding(model: nn.Module) -> List[Tuple[str, Tuple[int, ...], str]]:
    """``(name, global shape, placements)`` of every parameter, e.g. to print or document the layout."""
    rows = []
    for name, p in model.named_parameters():
        pl = "plain" if not isinstance(p, DTensor) else ",".join(str(x) for x in p.placements)
        rows.append((name, tuple(p.shape), pl))
    return rows
