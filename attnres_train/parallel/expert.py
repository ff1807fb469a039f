"""Expert parallelism (EP), applied to the plain model from outside: ``apply_expert_parallel(model, ep_mesh)``.

Why a module: each MoE's ``experts`` child is replaced by :class:`ExpertParallelExperts`, which holds this rank's
experts as ``Shard(0)`` DTensors under the same names (checkpoints, FSDP2, DCP see the plain model's keys) and
whose forward keeps the plain contract (rows sorted by expert in, expert outputs out) while the rows travel to
their owners by a dropless uneven all-to-all. Steps, router statistics, where expert gradients live and the
collective order: docs/expert_parallel.md. Gloo and NCCL run the same code.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..model.moe import GroupedExperts, MoE

__all__ = ["apply_expert_parallel", "expert_parallel_parameters", "ExpertParallelExperts", "all_to_all"]

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


class ExpertParallelExperts(GroupedExperts):
    """The ``experts`` child of an MoE under EP, substituted for the plain :class:`GroupedExperts`.

    Holds ``w1``/``w2``/``w3`` under the same names as ``Shard(0)`` DTensors on the 1-D ``ep_mesh`` (rank ``r``:
    experts ``[r*E/ep, (r+1)*E/ep)``). ``forward(x_sorted_ND, counts_E)`` has the plain module's contract (this
    rank's rows sorted by global expert id, ``[E]`` counts -> the expert outputs in that order) and exchanges
    the rows with the owners on the way (docs/expert_parallel.md, "Dispatch data flow").
    """

    def __init__(self, experts: GroupedExperts, ep_mesh: DeviceMesh):
        if ep_mesh.ndim != 1:
            raise ValueError(f"ep_mesh must be 1-D (slice it, e.g. world_mesh['ep']), got {ep_mesh.ndim}-D")
        nn.Module.__init__(self)
        self.num_experts, self.hidden_size = experts.num_experts, experts.hidden_size
        self.intermediate_size, self.impl = experts.intermediate_size, experts.impl
        self.ep_mesh = ep_mesh
        self.ep_size, self.ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
        E, ep, r = self.num_experts, self.ep_size, self.ep_rank
        if E % ep:
            raise ValueError(f"moe.num_experts={E} is not divisible by the expert-parallel degree {ep}")
        L = E // ep
        own = dict(experts.named_parameters(recurse=False))
        if set(own) != set(EXPERT_WEIGHTS):
            raise ValueError(f"expert parallelism shards {EXPERT_WEIGHTS}, the experts module has {sorted(own)}")
        for name, p in own.items():  # the plain module's order: named_parameters() / optimizers see the same
            if isinstance(p, DTensor):
                raise RuntimeError(f"experts.{name} is already a DTensor (another parallelism applied first?)")
            # Every rank holds the same full (or meta) tensor, as for data parallelism: slice locally, no traffic.
            local = p.detach()[r * L : (r + 1) * L].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
            self.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep_rank={self.ep_rank}, ep_size={self.ep_size}"

    def exchange_counts(self, counts_E: torch.Tensor) -> Tuple[List[int], List[int], List[int], torch.Tensor]:
        """All-to-all of the per-expert counts. Returns ``(in_splits, out_splits, local_counts, recv_RL)``.

        ``in_splits[r]``: rows this rank sends to rank r; ``out_splits[s]``: rows it receives from rank s;
        ``local_counts[j]``: rows for local expert j over all sources; ``recv_RL[s, j]`` (device tensor).
        """
        ep, E = self.ep_size, counts_E.numel()
        L = E // ep
        send_E = counts_E.to(torch.int64).contiguous()
        recv_E = torch.empty_like(send_E)
        dist.all_to_all_single(recv_E, send_E, group=self.ep_mesh.get_group())
        host = torch.stack([send_E, recv_E]).view(2, ep, L).tolist()  # the one device->host sync
        in_splits = [sum(row) for row in host[0]]
        out_splits = [sum(row) for row in host[1]]
        local_counts = [sum(host[1][s][j] for s in range(ep)) for j in range(L)]
        return in_splits, out_splits, local_counts, recv_E.view(ep, L)

    # Never traced: the split sizes are host ints that change every step (a traced exchange would recompile
    # per step) and the collectives need them anyway; the layer around it stays compiled.
    @torch.compiler.disable
    def forward(self, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``x_sorted_ND`` arrives in the experts' compute dtype (``moe.expert_dtype``: bf16 under bf16 autocast),
        so both all-to-alls carry bf16 rows; the result comes back in that dtype."""
        ep, group = self.ep_size, self.ep_mesh.get_group()
        L = counts_E.numel() // ep
        in_splits, out_splits, local_counts, recv_RL = self.exchange_counts(counts_E)
        n_recv = sum(out_splits)

        x_recv_ND = all_to_all(x_sorted_ND, out_splits, in_splits, group)  # (source rank, local expert)

        order_N = None
        if ep > 1 and L > 1 and n_recv > 0:  # regroup to (local expert, source rank): stable keeps token order
            expert_of_row_N = (
                torch.arange(L, device=x_recv_ND.device)
                .repeat(ep)
                .repeat_interleave(recv_RL.reshape(-1), output_size=n_recv)
            )
            order_N = torch.argsort(expert_of_row_N, stable=True)
            x_recv_ND = x_recv_ND.index_select(0, order_N)

        y_ND = self.local_experts(x_recv_ND, local_counts)

        if order_N is not None:
            inverse_N = torch.empty_like(order_N)
            inverse_N[order_N] = torch.arange(n_recv, device=order_N.device)
            y_ND = y_ND.index_select(0, inverse_N)

        return all_to_all(y_ND, in_splits, out_splits, group)

    def local_experts(
        self, x_ND: torch.Tensor, counts_E: Union[torch.Tensor, Sequence[int]], expert_offset: int = 0
    ) -> torch.Tensor:
        """This rank's LOCAL experts on rows sorted by local expert: ``counts_E[j]`` rows go to local expert
        ``expert_offset + j`` (global expert ``ep_rank * E/ep + expert_offset + j``)."""
        counts = counts_E.tolist() if isinstance(counts_E, torch.Tensor) else [int(c) for c in counts_E]
        w1_EFD, w3_EFD, w2_EDF = (_local(getattr(self, n)) for n in ("w1", "w3", "w2"))
        n_local = len(counts)
        if expert_offset < 0 or expert_offset + n_local > w1_EFD.shape[0]:
            raise ValueError(f"local experts [{expert_offset}, {expert_offset + n_local}) outside 0..{w1_EFD.shape[0]}")
        if sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but x has {x_ND.shape[0]} rows")
        sl = slice(expert_offset, expert_offset + n_local)
        if x_ND.shape[0] == 0:
            # Nothing routed here. The (empty) output must still depend on x_ND, or this rank's backward would
            # skip the dispatch all-to-all that its peers enter (deadlock); and on the weights, so their
            # gradient is a zero tensor on every rank (not None), as for an unused expert without EP.
            keep = (w1_EFD.sum() + w3_EFD.sum() + w2_EDF.sum()).to(x_ND.dtype) * 0
            return x_ND * 0 + keep  # [0, D]: the experts map D -> D
        if expert_offset == 0 and n_local == w1_EFD.shape[0]:
            # All local experts (the forward's case): the shards themselves, not a full-range slice, whose
            # backward zero-fills and copies every [E/ep, ff, d] weight gradient once more (as GroupedExperts).
            return self.compute(x_ND, counts, w1_EFD, w3_EFD, w2_EDF)
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


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's routed experts over ``ep_mesh`` (1-D) and route tokens with all-to-all.

    In place, by module substitution: ``moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)`` (same
    parameter names). Call before building the optimizer (the expert ``nn.Parameter`` objects are replaced)
    and before FSDP. Works on a meta-device model (shards are meta too; ``parallel.init.materialize_and_init``
    after). Shared experts, the router and everything else are untouched (replicated).
    """
    for moe in model.modules():
        if isinstance(moe, MoE):
            if isinstance(moe.experts, ExpertParallelExperts):
                raise RuntimeError("apply_expert_parallel was already applied to this model")
            moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)


def expert_parallel_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, param)`` of every expert-parallel (EP-sharded) parameter: exclude these from a DDP all-reduce
    over the EP ranks; their ``grad`` is the sum over the EP group's losses (docs/expert_parallel.md)."""
    out = []
    for mname, moe in model.named_modules():
        if isinstance(moe, MoE) and isinstance(moe.experts, ExpertParallelExperts):
            for name in EXPERT_WEIGHTS:
                out.append((f"{mname}.experts.{name}" if mname else f"experts.{name}", getattr(moe.experts, name)))
    return out
