"""What the parallelisms see of a model: the whole model or one pipeline stage, through the same few names.

Why: ``parallelize_model`` is the one place parallelism is applied, to the whole model (no pipeline) and to each
pipeline stage's modules alike. Both expose ``.model.layers`` (a ``ModuleList`` of all layers, or a stage's
``ModuleDict`` keyed by the global layer index, so names stay ``model.layers.<i>``), and optionally
``.model.embed_tokens`` (first stage) and ``.lm_head`` (last stage); ``.config`` is the full model's.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn


def named_decoder_layers(part: nn.Module) -> List[Tuple[int, nn.Module]]:
    """``(global layer index, layer)`` of the decoder layers ``part`` holds."""
    layers = part.model.layers
    if isinstance(layers, nn.ModuleDict):
        return [(int(k), v) for k, v in layers.items()]
    return list(enumerate(layers))


def decoder_layers(part: nn.Module) -> List[nn.Module]:
    return [layer for _, layer in named_decoder_layers(part)]


def embedding(part: nn.Module) -> Optional[nn.Module]:
    return getattr(part.model, "embed_tokens", None)


def lm_head(part: nn.Module) -> Optional[nn.Module]:
    return getattr(part, "lm_head", None)
