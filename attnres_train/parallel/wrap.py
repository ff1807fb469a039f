"""Activation checkpointing and torch.compile, applied from outside the model by ``parallelize_model``.

Activation checkpointing wraps each decoder layer's ``forward`` in place (the natural recompute unit). Compile
is applied after it (the order torchtitan uses), without touching the model code, to each layer's sublayer
bodies (norms, token mixer, FFN / MoE), not to the layer: a layer's forward reads per-layer Python values
(the sublayer index ``2 * layer_idx + k`` into the phase-1 statistics, whether a sublayer opens a block, the
number of depth sources so far), so dynamo compiled one variant per layer and, past
``torch._dynamo.config.recompile_limit`` (8) variants, ran the remaining layers eagerly. The sublayer bodies
see the same attributes and shapes in every layer of a kind, so each kind compiles once (KDA, MLA, dense FFN,
MoE, norm) and stays compiled for any depth. The AttnRes depth mixing between them runs in its own fused
forms (hand-differentiated torch functions on CPU, Triton kernels on CUDA).
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
        def forward(state, _inner=inner, **kwargs):  # kwargs: doc_ids (document masking)
            return checkpoint(_inner, state, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._ac_wrapped = True


#: The children of a decoder layer that ``apply_compile`` compiles (those that exist in the layer).
COMPILED_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "block_sparse_moe")


def apply_compile(model, backend: str = "inductor") -> None:
    """torch.compile every decoder layer's sublayer modules (dynamic=False: fixed training shapes)."""
    for layer in decoder_layers(model):
        for name in COMPILED_SUBMODULES:
            module = getattr(layer, name, None)
            if module is not None:
                module.compile(dynamic=False, backend=backend)
