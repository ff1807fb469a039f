"""Whole tensors from DTensor shards (FSDP / TP / EP), for tests that compare a parallel run with one process.

Test-only, so kept out of the package. Collective: every rank must call them in the same order.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def full_tensor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole tensor behind a DTensor (all-gather over its mesh; collective), or ``t`` itself."""
    if t is None:
        return None
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t


def full_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: whole parameter}`` (detached copies), in ``named_parameters`` order. Collective."""
    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}


def full_grads(model: nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    """``{name: whole gradient or None}``. Collective (the None pattern must agree across ranks)."""
    return {n: (None if p.grad is None else full_tensor(p.grad).clone()) for n, p in model.named_parameters()}
