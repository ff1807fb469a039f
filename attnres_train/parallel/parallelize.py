"""``parallelize_model``: apply every parallelism to the plain model (or one pipeline stage), in one fixed order.

Why one function: EP -> TP/SP -> activation checkpointing -> compile -> FSDP/replicate compose only in this
order (docs/parallel.md, "Order of application"), and each is applied by the one mechanism of
docs/parallel.md, "How parallelism is applied" (child-module substitution, forward hooks, torch's composable
APIs; names and ``state_dict`` keys unchanged). What was applied is recorded as ``model.parallel_plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from torch import nn

from .data_parallel import apply_data_parallel, fsdp_param_dtype
from .expert import apply_expert_parallel
from .mesh import ParallelContext
from .tensor import apply_tensor_parallel
from .wrap import apply_activation_checkpointing, apply_compile

__all__ = ["ParallelPlan", "parallelize_model", "record_plan"]


@dataclass(frozen=True)
class ParallelPlan:
    """What was applied to a model, recorded on it as ``model.parallel_plan`` (None on a plain model).

    ``steps``: the applied steps in order, names from ``expert_parallel``, ``tensor_parallel``,
    ``activation_checkpointing``, ``compile``, ``data_parallel`` (``pipeline_parallel`` first on the full
    model of a pipelined run); the degrees are the layout's (1 / False / None: not applied).
    """

    steps: Tuple[str, ...] = ()
    ep: int = 1
    tp: int = 1
    sp: bool = False
    dp: int = 1
    pp: int = 1
    compile_backend: Optional[str] = None

    def __contains__(self, step: str) -> bool:
        return step in self.steps


def record_plan(model: nn.Module, plan: ParallelPlan, what: str) -> None:
    """Set ``model.parallel_plan``; applying a second time is an error (it would re-shard DTensors)."""
    if getattr(model, "parallel_plan", None) is not None:
        raise RuntimeError(f"{what} was already applied to this model (model.parallel_plan = {model.parallel_plan})")
    model.parallel_plan = plan


def parallelize_model(model: nn.Module, pctx: ParallelContext, train_cfg=None) -> nn.Module:
    """Apply EP -> TP/SP -> AC -> compile -> FSDP/replicate in place, record them as ``model.parallel_plan``
    and return ``model``.

    ``train_cfg``: anything with ``activation_checkpointing`` / ``compile`` attributes (``TrainerConfig``);
    None = neither. On a single process only AC / compile apply.
    """
    dims = pctx.dims
    record_plan(model, ParallelPlan(), "parallelize_model")  # claimed first: a failure midway is not retried
    plan = ParallelPlan(pp=dims.pp)
    if dims.ep > 1:
        apply_expert_parallel(model, pctx.ep_mesh)
        plan = replace(plan, steps=plan.steps + ("expert_parallel",), ep=dims.ep)
    if dims.tp > 1:
        apply_tensor_parallel(model, pctx.tp_mesh, sequence_parallel=dims.sp)
        plan = replace(plan, steps=plan.steps + ("tensor_parallel",), tp=dims.tp, sp=dims.sp)
    if train_cfg is not None and getattr(train_cfg, "activation_checkpointing", False):
        apply_activation_checkpointing(model)
        plan = replace(plan, steps=plan.steps + ("activation_checkpointing",))
    if train_cfg is not None and getattr(train_cfg, "compile", False):
        backend = getattr(train_cfg, "compile_backend", "inductor")
        apply_compile(model, backend)
        plan = replace(plan, steps=plan.steps + ("compile",), compile_backend=backend)
    if dims.dp > 1:
        apply_data_parallel(model, pctx, param_dtype=fsdp_param_dtype(train_cfg, pctx.device))
        plan = replace(plan, steps=plan.steps + ("data_parallel",), dp=dims.dp)
    model.parallel_plan = plan
    return model
