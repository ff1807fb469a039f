"""Activation checkpointing and torch.compile, applied from outside the model by ``parallelize_model``.

Applied per decoder layer (the natural recompute / compile unit), in the order torchtitan uses
(AC, then compile), without touching the model code: the layer's ``forward`` is wrapped in place.
"""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from .parts import decoder_layers


def apply_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant: the DepthState passes through as is)."""
    for layer in decoder_layers(model):
        if getattr(layer, "_ac_wrapped", False):
            continue
        inner = layer.forward

        @functools.wraps(inner)
        def forward(state, _inner=inner):
            return checkpoint(_inner, state, use_reentrant=False)

        layer.forward = forward
        layer._ac_wrapped = True


def apply_compile(model, backend: str = "inductor") -> None:
    """torch.compile each decoder layer (dynamic=False: fixed training shapes)."""
    for layer in decoder_layers(model):
        layer.compile(dynamic=False, backend=backend)
