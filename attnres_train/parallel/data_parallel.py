"""Data parallelism on top of TP / EP: FSDP2 (ZeRO-3), HSDP, or plain replication, plus no-sync accumulation.

Why one code path for all three (``fully_shard`` per decoder-layer unit and the root on ``(dp_replicate,
dp_shard)``; replication = a size-1 shard dim): DDP does not take TP / EP DTensors and torch's ``replicate``
cannot put experts on their own mesh. Also here: the layer units (AttnRes queries in the root), the experts'
``(edp_replicate, edp_shard)`` placement and the ``1/ep`` gradient scale (:func:`finish_grad_sync`), gloo's
SUM-then-divide reduction, bf16 ``param_dtype`` and :func:`no_grad_sync` accumulation. docs/parallel.md,
"Data parallelism", has the reasons.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_common import (  # private: FSDP2's per-parameter shard placement
    FSDPMeshInfo,
    HSDPMeshInfo,
    ShardPlacementResult,
)
from torch.distributed.tensor import Shard
from torch.nn.parallel import DistributedDataParallel

from .expert import expert_parallel_parameters
from .mesh import autocast_dtype
from .parts import decoder_layers


def _fsdp_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _depth_query_module(name: str) -> bool:
    """AttnRes pseudo-query modules (``*_res_norm`` / ``*_res_proj``): read as parameters, not called."""
    return name.endswith("_res_norm") or name.endswith("_res_proj")


def layer_unit(layer: nn.Module) -> List[nn.Module]:
    """The modules of one decoder layer's FSDP unit: every child except the AttnRes pseudo-query modules.

    Why not the layer itself: Block AttnRes computes the phase-1 statistics of a whole block from the
    pseudo-queries of *all* its layers before the first of them runs (``forward_layers``), i.e. outside
    those layers' forward hooks, so per-layer units would hand it still-sharded queries. The queries
    (2 x hidden_size values per layer) therefore belong to the root unit, which is unsharded for the whole
    forward and backward; the layer's unit is the group of its other children (FSDP2's grouped
    ``fully_shard([...])``: one all-gather / reduce-scatter for all of them, hooks on each). The parameter-free
    ``depth_views`` seam is never called as a module, so it is left out too.
    """
    return [m for name, m in layer.named_children() if not _depth_query_module(name) and name != "depth_views"]


def _needs_sum_reduction(mesh) -> bool:
    """True unless every group of ``mesh`` is NCCL (gloo has no AVG / PREMUL_SUM reductions)."""
    try:
        return any(dist.get_backend(mesh.get_group(i)) != "nccl" for i in range(mesh.ndim))
    except Exception:  # noqa: BLE001 - be conservative
        return True


def _expert_placement_fn(model: nn.Module, pctx) -> Callable:
    """``shard_placement_fn`` giving the EP-sharded expert weights their own (HSDP) mesh inside a layer unit.

    FSDP2 (torch >= 2.10) groups a unit's parameters by process group, so the experts get their own
    all-gather / reduce-scatter on ``(edp_replicate, edp_shard)`` while sharing the layer's hooks (one
    unshard / reduce per layer unit; no separate ``fully_shard`` on ``moe.experts``). Shard dim: the expert dim if ``E/ep`` splits evenly
    over ``edp_shard``, else the first other dim that does (FSDP2 needs even shards off dim 0).
    """
    expert_ids = {id(p) for _, p in expert_parallel_parameters(model)}
    # One mesh-info object for all experts (FSDP2 requires it per process group). 1-D when there is no
    # replica: HSDP over a size-1 replicate dim would still issue (no-op) all-reduces.
    if pctx.dims.edp_replicate > 1:
        info = HSDPMeshInfo(mesh=pctx.expert_dp_mesh, shard_mesh_dim=1, replicate_mesh_dim=0)
    else:
        info = FSDPMeshInfo(mesh=pctx.mesh("edp_shard"), shard_mesh_dim=0)
    n = pctx.dims.edp_shard

    def fn(p):
        if id(p) not in expert_ids:
            return None  # the layer's mesh
        local = p.to_local() if hasattr(p, "to_local") else p
        dim = next((d for d in range(local.ndim) if local.shape[d] % n == 0), 0)
        return ShardPlacementResult(placement=Shard(dim), mesh_info=info)

    return fn


def fsdp_param_dtype(train_cfg, device) -> Optional[torch.dtype]:
    """The FSDP2 compute dtype of layer parameters for a run: bf16 when it trains under bf16 autocast, else None.

    ``train_cfg``: anything with a ``precision`` attribute (``TrainerConfig``); None means fp32.
    """
    if train_cfg is None:
        return None
    return autocast_dtype(getattr(train_cfg, "precision", "fp32"), device)


def apply_data_parallel(
    model: nn.Module, pctx, reshard_after_forward=None, param_dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """FSDP2 / HSDP / DDP-style replication on ``model`` per ``pctx.dims`` (module docstring). No-op if dp == 1.

    ``param_dtype`` (bf16 for bf16 training, :func:`fsdp_param_dtype`): layer units gather parameters in it and
    reduce gradients in fp32; the root unit keeps fp32 parameters. None: fp32 everywhere.
    """
    dims = pctx.dims
    if dims.dp == 1:
        return model
    if param_dtype is None or param_dtype == torch.float32:
        layer_mp = root_mp = MixedPrecisionPolicy()
    else:
        # cast_forward_inputs=False: the model decides its own activation dtypes (fp32 residual stream and
        # norms, autocast for the matmuls); FSDP only supplies the low-precision weights.
        layer_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        root_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    if reshard_after_forward is None and dims.dp_shard == 1:
        reshard_after_forward = False  # replication: nothing to free, no second all-gather in backward
    if reshard_after_forward is None and dims.pp > 1:
        # A pipeline stage runs every microbatch's F and B interleaved: resharding after each F would re-gather
        # its parameters for every B. Keep them gathered from F to B (docs/performance.md, memory cost).
        reshard_after_forward = False
    # 2-D (replicate, shard) only when there are replicas: a size-1 replicate dim would add no-op all-reduces.
    mesh = pctx.fsdp_mesh if dims.dp_replicate > 1 else pctx.dp_shard_mesh
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    expert_fn = _expert_placement_fn(model, pctx) if dims.ep > 1 else None
    for layer in decoder_layers(model):
        fully_shard(layer_unit(layer), shard_placement_fn=expert_fn, mp_policy=layer_mp, **kw)
    fully_shard(model, mp_policy=root_mp, **kw)  # root: embedding, final norm, AttnRes pseudo-queries, LM head
    if _needs_sum_reduction(pctx.dp_mesh):
        for unit in _fsdp_modules(model):
            unit.set_force_sum_reduction_for_comms(True)
    return model


def _param_groups(model: nn.Module):
    """Every FSDP2 parameter group (one per unit and process group: EP experts have their own)."""
    seen, out = set(), []
    for unit in _fsdp_modules(model):
        state = unit._get_fsdp_state()
        if id(state) in seen:
            continue
        seen.add(id(state))
        out.extend(state._fsdp_param_groups)
    return out


def _is_sharded(group) -> bool:
    return getattr(group.mesh_info, "shard_mesh_size", 1) > 1


@contextlib.contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally inside the block where that is free (module docstring); the next backward
    outside it synchronises everything accumulated. FSDP2 units, a DDP-wrapped model, or a plain model.

    Sharded FSDP2 groups keep reduce-scattering every microbatch (their gradients stay sharded); only the
    all-reduce over HSDP replicas is deferred. Replicated groups skip all gradient communication.
    """
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    set_grad_sync(model, False)
    try:
        yield
    finally:
        set_grad_sync(model, True)


def set_grad_sync(module: nn.Module, enabled: bool) -> None:
    """Every FSDP2 parameter group under ``module``: all gradient reductions (``enabled``), or the accumulation
    policy of :func:`no_grad_sync` (sharded groups still reduce-scatter, the HSDP replica all-reduce and
    replicated groups wait). The pipeline sets it per stage."""
    # FSDP2's public switches act on whole units; a layer unit can hold both a sharded group and a
    # replicated one (EP experts on their own mesh), so set the two flags per parameter group.
    for g in _param_groups(module):
        g.reduce_grads = enabled or _is_sharded(g)
        g.all_reduce_grads = enabled


def grad_sync(model: nn.Module, enabled: bool):
    """``no_grad_sync(model)`` when ``enabled`` is False, else a null context (one call site in the loop)."""
    return contextlib.nullcontext() if enabled else no_grad_sync(model)


def finish_grad_sync(model: nn.Module, pctx) -> None:
    """Gradient reductions the FSDP hooks do not express; call once after the last microbatch's backward
    (linear, so accumulated microbatches are handled at once). A no-op without expert parallelism.

    EP-sharded expert weights: the all-to-all backward already SUMS the ep ranks' contributions on the
    owner, and FSDP then AVERAGES over the expert's ``edp = dp / ep`` replicas, which leaves ``ep`` times the
    gradient of the mean loss over all dp ranks: scale by ``1/ep``. (torchtitan folds this into the reduction
    with ``set_gradient_divide_factor(dp)`` on a separate experts unit; here the experts share their layer's
    unit, whose public divide factor applies to every parameter group of the unit, so we multiply once
    instead - exact, and one ``_foreach_mul_`` on the local shards.) With sequence parallelism each tp rank
    routes only its own sequence shard; the sum of the expert gradients over tp happens inside the graph
    (``tensor.TokenParallelMoE``), not here.
    """
    if pctx.dims.ep == 1:
        return
    grads = []
    for _, p in expert_parallel_parameters(model):
        if p.grad is not None:
            g = p.grad
            grads.append(g.to_local() if hasattr(g, "to_local") else g)
    if grads:
        torch._foreach_mul_(grads, 1.0 / pctx.dims.ep)


@contextlib.contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[None]:
    """Unshard every FSDP unit for code that reads parameters outside ``forward`` (e.g. depth statistics).

    Collective: every data-parallel rank must enter it. TP/EP shards stay sharded (they are model-parallel).
    """
    units = _fsdp_modules(model)
    for u in units:
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
