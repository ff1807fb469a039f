"""attnres-train: pretraining Kimi-Linear-style MoE LLMs with Block Attention Residuals."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``attnres_train.load_run_model``: the public way to load a run (analysis/loading.py), imported on first
    use so ``import attnres_train`` stays light (no torch)."""
    if name == "load_run_model":
        from .analysis.loading import load_run_model

        return load_run_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
