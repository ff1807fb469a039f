"""attnres-train: pretraining Kimi-Linear-style MoE LLMs with Block Attention Residuals."""

__version__ = "0.1.0"
