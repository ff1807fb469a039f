"""Tensor-parallel regions: the ``ParallelStyle`` s that ``tensor.py``'s plan applies, module by module.

Why hooks: every region keeps its module and the module's parameter names (``named_parameters()`` and
``state_dict`` keys equal the plain model's). Parameters are stored as DTensors (for FSDP2 / DCP) and presented
to the unmodified forward as local tensors by :func:`run_on_local_params`: a forward pre-hook swaps them in
(``NamedMemberAccessor``, the mechanism behind ``torch.func.functional_call``) and an ``always_call`` forward
hook swaps them back. Layouts, gradients and the reasons for each custom style: docs/tensor_parallel.md.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module
from torch.nn.utils._named_member_accessor import NamedMemberAccessor

from ..config.parallel import require_tp_divides
from ..model.moe import MoE, SequenceStats
from .tp_ops import all_reduce_replicated, reduce_grad

__all__ = [
    "RegionInput",
    "HeadParallel",
    "VocabParallelEmbedding",
    "TokenParallelMoE",
    "SequenceParallelStats",
    "run_on_local_params",
    "distribute_param",
    "enter_region",
    "reduce_partial_grad",
    "SEQ_DIM",
]

SEQ_DIM = 1  # [B, T, d]


# --------------------------------------------------------------------------------------------------- helpers
def _resolve(module: nn.Module, rel_name: str) -> Tuple[nn.Module, str]:
    *path, name = rel_name.split(".")
    return module.get_submodule(".".join(path)), name


def distribute_param(
    owner: nn.Module, name: str, mesh: DeviceMesh, placement: Placement, src_data_rank: Optional[int]
) -> None:
    """Replace ``owner.<name>`` by an ``nn.Parameter`` holding a DTensor with ``placement`` on ``mesh``."""
    p = getattr(owner, name)
    if isinstance(p, DTensor):
        raise RuntimeError(f"{type(owner).__name__}.{name} is already a DTensor: apply_tensor_parallel applied twice?")
    if isinstance(placement, Shard) and p.shape[placement.dim] % mesh.size():
        raise ValueError(
            f"{type(owner).__name__}.{name} {tuple(p.shape)}: dim {placement.dim} is not divisible by "
            f"the tensor-parallel degree {mesh.size()}"
        )
    dt = distribute_tensor(p.detach(), mesh, [placement], src_data_rank=src_data_rank)
    owner.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


def _local_view(partial: bool):
    """View of a DTensor parameter as its local tensor; ``partial``: this rank's gradient is only a partial sum
    over tp (a replicated parameter used on this rank's heads or tokens), marked ``Partial`` so it is summed."""

    def view(p: DTensor) -> torch.Tensor:
        return p.to_local(grad_placements=[Partial() if (partial and pl.is_replicate()) else pl for pl in p.placements])

    return view


def _ep_view_reduced_over(group):
    """View of an expert-parallel (DTensor on the EP mesh) parameter whose gradient is also summed over
    ``group`` (the tp group under SP): still a DTensor, so the EP experts module takes it as before."""

    def view(p: DTensor) -> torch.Tensor:
        local = reduce_grad(p.to_local(), group)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())

    return view


def run_on_local_params(module: nn.Module, views: Dict[str, Callable], enter, leave) -> None:
    """Make ``module`` a region: its forward runs on local tensors, with names and the forward unchanged.

    Forward pre-hook: inputs through ``enter(args) -> (args, ctx)``, and every DTensor parameter named in
    ``views`` (relative names) swapped for ``views[name](param)``; forward hook (``always_call``: also when the
    forward raises): the parameters swapped back and the output through ``leave(out, ctx)``. The hooks run
    after FSDP2's unshard pre-hook (which is prepended) and before its reshard post-hook, and the views are
    taken inside the autograd graph, so activation-checkpoint recomputation and FSDP2 see the same semantics.
    """
    accessor = NamedMemberAccessor(module)
    active = []  # (swapped-out parameters, ctx) of the call in progress

    def pre(mod, args, kwargs):
        args, ctx = enter(args)
        local = {}
        for name, view in views.items():
            p = accessor.get_tensor(name)
            if isinstance(p, DTensor):
                local[name] = view(p)
        original, _ = accessor.swap_tensors_dict(local)
        active.append((original, ctx))
        return args, kwargs

    def post(mod, args, kwargs, out):
        if not active:  # the pre-hook itself failed: nothing was swapped
            return None
        original, ctx = active.pop()
        accessor.swap_tensors_dict(original)
        return None if out is None else leave(out, ctx)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True, always_call=True, prepend=True)


class _ReduceGradToReplicate(torch.autograd.Function):
    """Identity on a ``Replicate`` DTensor whose backward sums a ``Partial`` gradient (all-reduce over tp)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return reduce_partial_grad(grad)


def reduce_partial_grad(grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook of replicated parameters: sum a ``Partial`` gradient over its mesh dims (all-reduce)."""
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        return grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p for p in grad.placements])
    return grad


def enter_region(x: torch.Tensor, mesh: DeviceMesh, layout: Placement) -> DTensor:
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

    Unlike the stock style it also reduces the gradient without SP (see :func:`enter_region`). Runs before
    any other forward pre-hook of the module (e.g. ``ColwiseParallel``'s, which then finds a replicated
    DTensor and does nothing).
    """

    def __init__(self, layout: Placement):
        super().__init__()
        self.layout = layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        layout = self.layout

        def hook(mod, args):
            return (enter_region(args[0], device_mesh, layout), *args[1:])

        module.register_forward_pre_hook(hook, prepend=True)
        return module


class HeadParallel(ParallelStyle):
    """Head-parallel token mixer (KDA or MLA): one tensor-parallel region.

    ``placements`` maps every parameter of the module (relative names) to ``Shard(dim)`` or ``Replicate()``;
    a parameter missing from it is an error (a new parameter must be given a placement, not silently
    replicated). Input: DTensor ``Shard(1)`` (SP) or ``Replicate()`` (or a local tensor with that layout);
    all-gathered to the full sequence. Output: the same layout as the input, from the row-parallel partial sums.
    """

    def __init__(
        self,
        placements: Dict[str, Placement],
        sequence_parallel: bool,
        src_data_rank: Optional[int] = 0,
        heads_field: str = "model.kda.num_heads",
    ):
        super().__init__()
        self.placements = dict(placements)
        self.act = Shard(SEQ_DIM) if sequence_parallel else Replicate()
        self.src_data_rank = src_data_rank
        self.heads_field = heads_field

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        heads = getattr(module, "num_heads", None)
        if heads is not None:
            require_tp_divides(device_mesh.size(), self.heads_field, heads, "heads are split over the tp group")
        names = {n for n, _ in module.named_parameters()}
        if names != set(self.placements):
            raise ValueError(
                f"{type(module).__name__}: TP placements do not match its parameters; "
                f"missing {sorted(names - set(self.placements))}, "
                f"unknown {sorted(set(self.placements) - names)}"
            )
        for rel, placement in self.placements.items():
            distribute_param(*_resolve(module, rel), device_mesh, placement, self.src_data_rank)
        mesh, act = device_mesh, self.act

        def enter(args):
            x, *rest = args
            # SP: all-gather the sequence (backward: reduce-scatter). Inside the region every gradient that
            # reaches a replicated tensor is a partial sum over tp.
            dx = enter_region(x, mesh, act)
            return (dx.to_local(grad_placements=[Partial()]), *rest), isinstance(x, DTensor)

        def leave(y, was_dtensor):
            dy = DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [act])
            return dy if was_dtensor else dy.to_local()

        views = {rel: _local_view(partial=pl.is_replicate()) for rel, pl in self.placements.items()}
        run_on_local_params(module, views, enter, leave)
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
        distribute_param(module, "weight", device_mesh, Shard(0), self.src_data_rank)
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

        run_on_local_params(module, {"weight": _local_view(partial=False)}, enter, leave)
        return module


def swiglu_plan(tokens: Placement, use_local_output: bool) -> Dict[str, ParallelStyle]:
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


class SequenceParallelStats(SequenceStats):
    """``MoE.sequence_stats`` under SP: the per-sequence statistics summed over the tp ranks holding the
    sequence's shards, so the sequence-wise balance loss equals the single-process value.

    Counts: plain all-reduce (no gradient); score sums: forward all-reduce, identity backward, since the loss
    is then replicated and every rank back-propagates it (``tp_ops.all_reduce_replicated``).
    """

    def __init__(self, tp_mesh: DeviceMesh):
        super().__init__()
        self.mesh = tp_mesh

    def forward(self, hits_BE: torch.Tensor, share_BE: torch.Tensor, tokens: int):
        group = self.mesh.get_group()
        dist.all_reduce(hits_BE, group=group)
        return hits_BE, all_reduce_replicated(share_BE, group), tokens * self.mesh.size()

    def __deepcopy__(self, memo):  # process groups cannot be copied: a deep-copied model shares the mesh
        return type(self)(self.mesh)

    def extra_repr(self) -> str:
        return f"tp={self.mesh.size()}"


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
        distribute_param(module.gate, "weight", mesh, Replicate(), self.src_data_rank)
        for name in ("w1", "w2", "w3"):
            if isinstance(getattr(module.experts, name), DTensor):
                # Expert parallelism got there first and owns them (sharded on its EP mesh, used by its module).
                # Under SP their gradient must still be summed over tp: do it inside the graph.
                if sp:
                    views[f"experts.{name}"] = _ep_view_reduced_over(mesh.get_group())
            else:
                distribute_param(module.experts, name, mesh, Replicate(), self.src_data_rank)
                views[f"experts.{name}"] = _local_view(partial=sp)
        if module.shared_experts is not None:
            # MoE.forward flattens tokens to [N, d] before the shared expert: with SP, N is this rank's shard.
            plan = swiglu_plan(Shard(0) if sp else Replicate(), use_local_output=True)
            plan.pop("")._apply(module.shared_experts, mesh)
            parallelize_module(module.shared_experts, mesh, plan, src_data_rank=self.src_data_rank)
        if sp:
            module.sequence_stats = SequenceParallelStats(mesh)

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

        run_on_local_params(module, views, enter, leave)
        return module
