"""Model + optimizer state dicts for DCP checkpoints that do not depend on the parallel layout.

Why a helper: ``get_state_dict`` keeps optimizer ``param_groups`` as one list per rank by default, and DCP
stores a non-tensor value under one key once. Ranks holding different parameters (pipeline stages) then save
different lists under the same key, one wins, and the others cannot load their groups back (seen as a
``KeyError: 'lr'`` after resuming a pp=2 run). ``flatten_optimizer_state_dict=True`` keys every optimizer value by
the parameter's fully qualified name (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``), the same names on
every layout (stages, FSDP / TP / EP shards, one process), so any checkpoint loads under any other layout.
Everything that writes or reads training checkpoints (trainer, HF import) goes through these two functions.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def training_state_dict(model: nn.Module, optimizers: Sequence) -> Tuple[dict, dict]:
    """``(model_state_dict, optimizer_state_dict)`` with layout-independent keys (module docstring)."""
    return get_state_dict(model, list(optimizers), options=OPTIONS)


def load_training_state_dict(model: nn.Module, optimizers: Sequence, model_sd: dict, optim_sd: dict) -> None:
    """Inverse of :func:`training_state_dict` (after DCP filled the dicts in place)."""
    set_state_dict(model, list(optimizers), model_state_dict=model_sd, optim_state_dict=optim_sd, options=OPTIONS)
