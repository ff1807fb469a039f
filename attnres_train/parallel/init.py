"""Materialise a parallelised meta-device model and initialise only this rank's shards, layout-independently.

Why: at 48B no rank can hold the whole model, so construction is ``build_model(device="meta")`` ->
``parallelize_model`` (or the pipeline's stage cut) -> :func:`materialize_and_init`. The values come from
``attnres_train.model.init`` (a counter-based stream per parameter row), and this module supplies which rows and
columns a rank's shard holds: for every tensor dimension, the DTensor placements that shard it are applied to a
1-D ``arange`` over that dimension (so the index lists follow torch's own chunking, ``_StridedShard`` included,
with no collective and no full-size tensor). A shard then draws only its own rows; columns of column-sharded
layouts (TP row-parallel weights) are sliced after drawing, so the transient is ``local rows x full width``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from ..model.init import InitRule, canonical_name, draw_rows, init_model_weights, named_init_targets, write_full


def global_indices(t: DTensor, dim: int) -> torch.Tensor:
    """The global indices along ``dim`` of ``t``'s local shard (1-D int64, CPU), in local order."""
    mapped = []
    for pl in t.placements:
        if isinstance(pl, _StridedShard):
            mapped.append(_StridedShard(0, split_factor=pl.split_factor) if pl.dim == dim else Replicate())
        elif isinstance(pl, Shard):
            mapped.append(Shard(0) if pl.dim == dim else Replicate())
        elif isinstance(pl, Replicate):
            mapped.append(Replicate())
        else:
            raise ValueError(f"cannot initialise a parameter with placement {pl} (expected Shard/Replicate)")
    n = t.shape[dim]
    if all(isinstance(pl, Replicate) for pl in mapped):
        return torch.arange(n)
    device = t.device_mesh.device_type
    proxy = torch.arange(n, device=device)
    return distribute_tensor(proxy, t.device_mesh, mapped, src_data_rank=None).to_local().cpu()


def write_sharded(t: torch.Tensor, rule: InitRule, seed: int, name: str) -> None:
    """Writer for :func:`init_model_weights` that fills a DTensor's local shard (plain tensors: all of it)."""
    if not isinstance(t, DTensor):
        write_full(t, rule, seed, name)
        return
    local = t.to_local()
    if local.numel() == 0:
        return
    if t.ndim == 0:
        local.copy_(draw_rows(rule, seed, name, (), [0], local.dtype).reshape(()))
        return
    idx = [global_indices(t, d) for d in range(t.ndim)]
    rows = draw_rows(rule, seed, name, t.shape, idx[0].tolist(), local.dtype)  # dim 0 already this shard's
    local.copy_(_select(rows, t, idx, first_dim=1).reshape(local.shape))


def copy_into_shard(t: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor ``full`` into ``t`` (a DTensor's local shard, or a plain tensor)."""
    if tuple(full.shape) != tuple(t.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not match the parameter's {tuple(t.shape)}")
    if not isinstance(t, DTensor):
        t.copy_(full)
        return
    local = t.to_local()
    if local.numel() == 0:
        return
    idx = [global_indices(t, d) for d in range(t.ndim)]
    local.copy_(_select(full, t, idx, first_dim=0).reshape(local.shape))  # copy_ casts to the shard's dtype


def _select(block: torch.Tensor, t: DTensor, idx: List[torch.Tensor], first_dim: int) -> torch.Tensor:
    """``block`` restricted to the shard's global indices ``idx`` along dims ``first_dim..`` (a full dim is kept)."""
    for d in range(first_dim, t.ndim):
        if idx[d].numel() != t.shape[d]:
            block = block.index_select(d, idx[d])
    return block


@torch.no_grad()
def load_full_tensors(module: nn.Module, parts, model_cfg) -> int:
    """Fill ``module``'s local shards from ``parts``: an iterable of ``{full name: full tensor}`` dicts (e.g. one
    decoder layer at a time, ``interop.hf.iter_hf_checkpoint``); names this rank does not hold are skipped, so a
    rank keeps only its shards and one part at a time. Every parameter and persistent buffer must be covered.
    Returns the number of tensors copied."""
    targets = {}
    for name, mod, attr, t in named_init_targets(module):
        if attr in mod._buffers and attr in mod._non_persistent_buffers_set:
            continue
        targets.setdefault(canonical_name(name, model_cfg.tie_word_embeddings), []).append(t)
    done = set()
    for part in parts:
        for name, full in part.items():
            for t in targets.get(name, ()):
                copy_into_shard(t, full)
                done.add(name)
    missing = sorted(set(targets) - done)
    if missing:
        raise KeyError(f"no values for {len(missing)} tensors of this rank, e.g. {missing[:3]}")
    return len(done)


@torch.no_grad()
def materialize_and_init(module: nn.Module, device, model_cfg, seed: Optional[int]) -> None:
    """``to_empty(device)`` then initialise every local shard of ``module`` (its names are the full model's, whose
    config is ``model_cfg``) with the values one process would give it from ``seed`` (None: torch's global RNG)."""
    to_empty_keeping_ties(module, device)
    init_model_weights(module, model_cfg, seed, write=write_sharded)


def to_empty_keeping_ties(module: nn.Module, device) -> None:
    """``module.to_empty(device)`` that keeps shared parameters shared (tied embeddings): with swapping on,
    ``nn.Module._apply`` swaps each tensor's contents in place instead of registering a new object per owner
    (FSDP2 expects exactly that and re-pads its shards afterwards)."""
    prev = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(prev)


def local_bytes(module: nn.Module, include_buffers: bool = True) -> int:
    """Bytes of this rank's local parameter (and buffer) storage, each tensor once."""
    seen, total = set(), 0
    tensors = list(module.parameters()) + (list(module.buffers()) if include_buffers else [])
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        loc = t.to_local() if isinstance(t, DTensor) else t
        total += loc.numel() * loc.element_size()
    return total
