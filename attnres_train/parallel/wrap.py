"""Activation checkpointing and torch.compile, applied from outside the model by ``parallelize_model``.

Why per decoder layer and per sublayer: a layer is the natural recompute unit (torch's composable ``checkpoint``:
hooks, names unchanged); compile goes to each layer's sublayer modules, not the layer, whose per-layer Python
values made dynamo compile one variant per layer and give up past its recompile limit, so each kind (KDA, MLA,
FFN, MoE, norm) compiles once for any depth (docs/parallel.md, "Order of application").
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

from .parts import decoder_layers


def apply_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant: the DepthState passes through as is)."""
    for layer in decoder_layers(model):
        if is_checkpointed(layer):
            raise RuntimeError("activation checkpointing was already applied to this model")
        checkpoint(layer)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` (torch's composable ``checkpoint``) is on ``module``."""
    return checkpoint.state(module) is not None


#: The children of a decoder layer that ``apply_compile`` compiles (those that exist in the layer).
COMPILED_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "block_sparse_moe")


def apply_compile(model, backend: str = "inductor") -> None:
    """torch.compile every decoder layer's sublayer modules (dynamic=False: fixed training shapes)."""
    for layer in decoder_layers(model):
        for name in COMPILED_SUBMODULES:
            module = getattr(layer, name, None)
            if module is not None:
                module.compile(dynamic=False, backend=backend)
