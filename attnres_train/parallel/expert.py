"""Expert parallelism (EP), applied to the plain model from outside: ``apply_expert_parallel(model, ep_mesh)``.

What it does, per MoE layer (``attnres_train.model.moe.MoE``), in place:

* **Weights.** The routed experts' stacked weights ``w1``/``w3`` ``[E, F, D]`` and ``w2`` ``[E, D, F]`` become
  ``DTensor`` parameters with placement ``Shard(0)`` on the 1-D ``ep_mesh``: EP rank ``r`` holds experts
  ``[r*E/ep, (r+1)*E/ep)`` as its local shard. DTensor (not bare local tensors) because then
  ``state_dict()`` / DCP ``get_state_dict`` keep the original names with the *global* shape, DCP saves each
  shard once and reshards on load (EP 4 -> EP 2 -> no EP), and FSDP2 can shard the experts further on another
  mesh dimension (torchtitan's ``dp_mod_ep``), as it does with TP DTensors.
* **Dispatch.** ``MoE.forward`` is unchanged: it routes this rank's own tokens, permutes them locally by expert
  (``MoE.dispatch``), records this rank's routing counts in ``tokens_per_expert``, then calls
  ``run_experts``. EP installs :class:`ExpertParallelRunner` as ``MoE.expert_runner``, which (dropless):

  1. exchanges the per-expert counts: ``all_to_all_single`` of the ``[E]`` count vector (equal splits of
     ``E/ep``), so rank ``r`` learns ``recv[s, j]`` = rows rank ``s`` sends to its local expert ``j``;
  2. one device->host copy of both count vectors gives the uneven split sizes;
  3. ``all_to_all_single`` of the token rows with uneven splits (an autograd function: backward runs the
     reverse exchange with the splits swapped);
  4. regroups the received rows from (source rank, local expert) to (local expert, source rank) order and
     calls the experts module (:class:`ExpertParallelGroupedExperts`, so hooks such as FSDP2's unshard fire),
     which runs ``GroupedExperts.compute`` on the local weight shard (``F.grouped_mm`` where usable, a loop
     otherwise, exactly as without EP);
  5. undoes the regrouping and sends the outputs back with the reverse ``all_to_all_single``; ``MoE.combine``
     then un-permutes and weights them locally as without EP.

Semantics the caller (``parallelize.py``) must know:

* **Tokens.** EP ranks are data-parallel ranks for the rest of the model: each rank feeds its own batch slice.
  The EP group is folded out of the data-parallel ranks (torchtitan / Megatron "parallel folding").
* **Router statistics.** ``tokens_per_expert`` holds this rank's OWN routing counts (recorded before any
  exchange; received tokens are never counted). All-reducing it (SUM) over the whole data-parallel group
  (which contains the EP ranks) gives the global counts, exactly once each; the train module already does
  this. Do not all-reduce over the EP group and the DP group separately.
* **Gradients.** Non-expert parameters are replicated: rank ``r``'s gradient is ``dL_r/dθ`` and DP averages
  it as usual. An expert's gradient lives only on its owner (as the ``Shard(0)`` DTensor ``grad``) and is the
  SUM over all EP ranks' losses, ``Σ_{s in EP} dL_s/dW``, because the owner saw every EP rank's tokens. The
  gradient of the data-parallel mean loss is therefore ``Σ over the expert's replicas (dp_mod_ep) / dp_world``:
  with FSDP2 on experts use ``set_gradient_divide_factor(dp_world)`` (torchtitan does this), or a plain sum
  and one global normalisation. The expert parameters must not go through a DDP all-reduce over the EP ranks
  (they differ per rank): see :func:`expert_parallel_parameters`.
* **Collectives.** Every MoE layer's forward issues 3 all-to-alls on the EP group (counts, tokens, outputs) and
  its backward 2, in the same order on every rank, so all EP ranks must run the same layers (also under
  activation checkpointing, whose recomputation repeats the forward exchange). The split sizes need one
  device->host sync per layer forward (unavoidable for dropless uneven splits).

Gloo (CPU) and NCCL (GPU) run the same code: gloo's ``all_to_all_single`` supports uneven and zero splits
(checked with torch 2.13), so no send/recv fallback is needed.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..model.moe import GroupedExperts, MoE

__all__ = ["apply_expert_parallel", "expert_parallel_parameters", "ExpertParallelRunner",
           "ExpertParallelGroupedExperts", "all_to_all"]

EXPERT_WEIGHTS = ("w1", "w2", "w3")


def _all_to_all_raw(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single`` along dim 0; backward sends the gradient back with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all_raw(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        return _all_to_all_raw(grad_out, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all: ``in_splits[r]`` rows of ``x`` go to rank ``r``; ``out_splits[r]`` come
    back from rank ``r`` (rows ordered by source rank)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w


class ExpertParallelRunner:
    """``MoE.expert_runner`` for one EP group: exchange rows, run the local experts, send the results back.

    Input/output contract (the same as ``MoE.run_experts`` without EP): ``x_sorted_ND`` are this rank's rows
    sorted by global expert id, ``counts_E`` the ``[E]`` row counts; returns the expert outputs in that order.
    """

    def __init__(self, ep_mesh: DeviceMesh):
        if ep_mesh.ndim != 1:
            raise ValueError(f"ep_mesh must be 1-D (slice it, e.g. world_mesh['ep']), got {ep_mesh.ndim}-D")
        self.ep_mesh = ep_mesh
        self.group = ep_mesh.get_group()
        self.ep_size = ep_mesh.size()
        self.ep_rank = ep_mesh.get_local_rank()

    def __deepcopy__(self, memo):  # process groups cannot be copied: a deep-copied model shares the group
        return self

    def __repr__(self) -> str:
        return f"ExpertParallelRunner(ep_rank={self.ep_rank}, ep_size={self.ep_size})"

    def exchange_counts(self, counts_E: torch.Tensor) -> Tuple[List[int], List[int], List[int], torch.Tensor]:
        """All-to-all of the per-expert counts. Returns ``(in_splits, out_splits, local_counts, recv_RL)``.

        ``in_splits[r]``: rows this rank sends to rank r; ``out_splits[s]``: rows it receives from rank s;
        ``local_counts[j]``: rows for local expert j over all sources; ``recv_RL[s, j]`` (device tensor).
        """
        ep, E = self.ep_size, counts_E.numel()
        L = E // ep
        send_E = counts_E.to(torch.int64).contiguous()
        recv_E = torch.empty_like(send_E)
        dist.all_to_all_single(recv_E, send_E, group=self.group)
        host = torch.stack([send_E, recv_E]).view(2, ep, L).tolist()  # the one device->host sync
        in_splits = [sum(row) for row in host[0]]
        out_splits = [sum(row) for row in host[1]]
        local_counts = [sum(host[1][s][j] for s in range(ep)) for j in range(L)]
        return in_splits, out_splits, local_counts, recv_E.view(ep, L)

    # Never traced: the split sizes are host ints that change every step (a traced exchange would recompile
    # per step) and the collectives need them anyway; the layer around it stays compiled.
    @torch.compiler.disable
    def __call__(self, experts: GroupedExperts, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``x_sorted_ND`` arrives in the experts' compute dtype (``moe.expert_dtype``: bf16 under bf16 autocast),
        so both all-to-alls carry bf16 rows; the result comes back in that dtype."""
        ep = self.ep_size
        L = counts_E.numel() // ep
        in_splits, out_splits, local_counts, recv_RL = self.exchange_counts(counts_E)
        n_recv = sum(out_splits)

        x_recv_ND = all_to_all(x_sorted_ND, out_splits, in_splits, self.group)  # (source rank, local expert)

        order_N = None
        if ep > 1 and L > 1 and n_recv > 0:  # regroup to (local expert, source rank): stable keeps token order
            expert_of_row_N = torch.arange(L, device=x_recv_ND.device).repeat(ep).repeat_interleave(
                recv_RL.reshape(-1), output_size=n_recv)
            order_N = torch.argsort(expert_of_row_N, stable=True)
            x_recv_ND = x_recv_ND.index_select(0, order_N)

        # Through the module call (not .compute) so hooks on the experts module (FSDP2's unshard) fire.
        y_ND = experts(x_recv_ND, local_counts)

        if order_N is not None:
            inverse_N = torch.empty_like(order_N)
            inverse_N[order_N] = torch.arange(n_recv, device=order_N.device)
            y_ND = y_ND.index_select(0, inverse_N)

        return all_to_all(y_ND, in_splits, out_splits, self.group)


class ExpertParallelGroupedExperts(GroupedExperts):
    """``GroupedExperts`` whose ``w1``/``w2``/``w3`` are ``Shard(0)`` DTensors on an EP mesh.

    ``apply_expert_parallel`` swaps an instance's class to this one (as FSDP2's ``fully_shard`` does), so
    ``isinstance(m, GroupedExperts)`` still holds. Rows reach it through ``MoE.expert_runner``.
    """

    def forward(self, x_ND: torch.Tensor, counts_E: Union[torch.Tensor, Sequence[int]],
                expert_offset: int = 0) -> torch.Tensor:
        """Like ``GroupedExperts.forward`` on this rank's LOCAL experts: ``counts_E[j]`` rows go to local expert
        ``expert_offset + j`` (global expert ``ep_rank * E/ep + expert_offset + j``)."""
        counts = counts_E.tolist() if isinstance(counts_E, torch.Tensor) else [int(c) for c in counts_E]
        w1_EFD, w3_EFD, w2_EDF = (_local(getattr(self, n)) for n in ("w1", "w3", "w2"))
        n_local = len(counts)
        if expert_offset < 0 or expert_offset + n_local > w1_EFD.shape[0]:
            raise ValueError(f"local experts [{expert_offset}, {expert_offset + n_local}) outside "
                             f"0..{w1_EFD.shape[0]}")
        if sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but x has {x_ND.shape[0]} rows")
        sl = slice(expert_offset, expert_offset + n_local)
        if x_ND.shape[0] == 0:
            # Nothing routed here. The (empty) output must still depend on x_ND, or this rank's backward would
            # skip the dispatch all-to-all that its peers enter (deadlock); and on the weights, so their
            # gradient is a zero tensor on every rank (not None), as for an unused expert without EP.
            keep = (w1_EFD.sum() + w3_EFD.sum() + w2_EDF.sum()).to(x_ND.dtype) * 0
            return x_ND * 0 + keep  # [0, D]: the experts map D -> D
        return self.compute(x_ND, counts, w1_EFD[sl], w3_EFD[sl], w2_EDF[sl])

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        """The values the unsharded module would get from the same RNG state (layout-independent init).

        Samples each full ``[E, ...]`` tensor on the local device and keeps this rank's part (transient memory of
        one full expert weight), with DTensor's own slicing so it also holds after FSDP2 shards the experts
        further. DTensor's random ops would give every rank the SAME rows on CPU (no DTensor RNG tracker
        there) and layout-dependent values on GPU.
        """
        for w in (self.w1, self.w2, self.w3):
            local = w.to_local()
            full = torch.empty(w.shape, dtype=local.dtype, device=local.device)
            nn.init.normal_(full, mean=0.0, std=init_std)
            local.copy_(distribute_tensor(full, w.device_mesh, w.placements, src_data_rank=None).to_local())


def _shard_experts(experts: GroupedExperts, ep_mesh: DeviceMesh) -> None:
    ep, r = ep_mesh.size(), ep_mesh.get_local_rank()
    E = experts.num_experts
    if E % ep:
        raise ValueError(f"moe.num_experts={E} is not divisible by the expert-parallel degree {ep}")
    L = E // ep
    for name in EXPERT_WEIGHTS:
        p = getattr(experts, name)
        if isinstance(p, DTensor):
            raise RuntimeError(f"experts.{name} is already a DTensor (another parallelism applied first?)")
        # Every rank holds the same full (or meta) tensor, as for data parallelism: slice locally, no traffic.
        local = p.detach()[r * L:(r + 1) * L].clone()
        dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
        setattr(experts, name, nn.Parameter(dt, requires_grad=p.requires_grad))
    experts.__class__ = ExpertParallelGroupedExperts


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's routed experts over ``ep_mesh`` (1-D) and route tokens with all-to-all.

    In place; call before building the optimizer (the expert ``nn.Parameter`` objects are replaced) and
    before FSDP. Works on a meta-device model (shards are meta too; ``parallel.init.materialize_and_init`` after).
    Shared experts, the router and everything else are untouched (replicated).
    """
    runner = ExpertParallelRunner(ep_mesh)
    for moe in model.modules():
        if isinstance(moe, MoE):
            if moe.expert_runner is not None:
                raise RuntimeError("apply_expert_parallel was already applied to this model")
            _shard_experts(moe.experts, ep_mesh)
            moe.expert_runner = runner


def expert_parallel_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, param)`` of every expert-parallel (EP-sharded) parameter: exclude these from a DDP all-reduce
    over the EP ranks; their ``grad`` is the sum over the EP group's losses (see the module docstring)."""
    out = []
    for mname, moe in model.named_modules():
        if isinstance(moe, MoE) and moe.expert_runner is not None:
            for name in EXPERT_WEIGHTS:
                out.append((f"{mname}.experts.{name}" if mname else f"experts.{name}", getattr(moe.experts, name)))
    return out
