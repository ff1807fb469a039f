"""The plain single-process Kimi-Linear MoE model with PreNorm / Full / Block Attention Residuals.

No distributed (c10d) import anywhere in this package: parallelism is applied from ``attnres_train.parallel``.
"""

from .depth import DepthState
from .transformer import AttnResForCausalLM, build_model

__all__ = ["AttnResForCausalLM", "DepthState", "build_model"]
