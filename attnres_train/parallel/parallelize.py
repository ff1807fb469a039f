"""``parallelize_model``: apply every parallelism to the plain model, in one fixed, documented order.

1. **EP** (``ep > 1``): ``attnres_train.parallel.expert.apply_expert_parallel(model, ep_mesh)``: routed
   experts become ``Shard(0)`` DTensors on the ep mesh and tokens move by all-to-all. Before TP because TP
   turns every parameter that is not yet a DTensor into a tp DTensor (replicating the routed experts over tp)
   and leaves DTensor experts alone, while EP slices plain experts and refuses DTensors: EP-then-TP is the
   order in which the two compose (torchtitan's TP plan likewise never touches the experts). The two
   touch disjoint parameters, so the end state is what "TP, then EP on the experts" would give.
2. **TP / SP** (``tp > 1``): ``attnres_train.parallel.tensor.apply_tensor_parallel(model, tp_mesh, sp)``;
   DTensor plans per layer type (heads, columns/rows, vocab), DepthState tensors become tp DTensors.
3. **Activation checkpointing**, then **torch.compile**, per decoder layer (``attnres_train.parallel.wrap``),
   from ``train_cfg.activation_checkpointing`` / ``train_cfg.compile``: after the model-parallel rewrites
   (so recomputation replays their collectives) and before FSDP (whose hooks must see the final modules),
   as torchtitan does.
4. **FSDP2 / HSDP / replicate** (``dp > 1``): ``data_parallel.apply_data_parallel``; last, because it wraps
   the final parameters (TP / EP DTensors included) into data-parallel shards.

The model must not be wrapped yet, and the optimizer must be built afterwards (parameters are replaced).
``tensor.py`` / ``expert.py`` are imported only when needed, so a layout without TP / EP never imports them.
``model`` is a whole model or one pipeline stage (``parallel/parts.py``), normally on the ``meta`` device: the
caller then materialises this rank's shards with ``parallel.init.materialize_and_init`` (values equal to one
process's; docs/parallel.md, "Initialisation"). A materialised model must be identical on every rank.
"""

from __future__ import annotations

from torch import nn

from .data_parallel import apply_data_parallel, fsdp_param_dtype
from .mesh import ParallelContext


def parallelize_model(model: nn.Module, pctx: ParallelContext, train_cfg=None) -> nn.Module:
    """Apply EP -> TP/SP -> AC -> compile -> FSDP/replicate in place and return ``model``.

    ``train_cfg``: anything with ``activation_checkpointing`` / ``compile`` attributes (``TrainerConfig``);
    None = neither. On a single process only AC / compile apply.
    """
    dims = pctx.dims
    if getattr(model, "_attnres_parallelized", False):
        raise RuntimeError("parallelize_model was already applied to this model")
    if dims.ep > 1:
        from .expert import apply_expert_parallel

        apply_expert_parallel(model, pctx.ep_mesh)
    if dims.tp > 1:
        from .tensor import apply_tensor_parallel

        apply_tensor_parallel(model, pctx.tp_mesh, sequence_parallel=dims.sp)
    if train_cfg is not None and getattr(train_cfg, "activation_checkpointing", False):
        from .wrap import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if train_cfg is not None and getattr(train_cfg, "compile", False):
        from .wrap import apply_compile

        apply_compile(model, getattr(train_cfg, "compile_backend", "inductor"))
    if dims.dp > 1:
        apply_data_parallel(model, pctx, param_dtype=fsdp_param_dtype(train_cfg, pctx.device))
    model._attnres_parallelized = True
    return model
