"""SwiGLU feed-forward: the dense FFN of the first ``first_k_dense`` layers and the MoE's shared expert.

Kimi Linear uses the same bias-free SwiGLU everywhere (``down(silu(gate x) * up x)``); parameter names
``gate_proj``/``up_proj``/``down_proj`` match the released checkpoint so interop is a plain rename-free copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def init_weights(self, init_std: float) -> None:
        """Nothing beyond nn.Linear weights, which the model initialises (normal(0, init_std))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
