"""Diagnostics computed from a checkpoint on a held-out batch: where each layer reads from, how large the
per-layer outputs and gradients are across depth, and how evenly tokens reach the experts.

Why these: they are the paper's pictures for "what did AttnRes learn" (Fig. 8 depth-attention weights,
Fig. 5b/c output and gradient magnitude per block) plus the MoE expert load, which is where a Kimi-Linear
run goes wrong first. The paper does not define the Fig. 5 metrics; our definitions: docs/analysis.md.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch

from ..config.errors import ConfigError, UserInputError
from ..config.model import as_model_config, block_starts, is_moe_layer
from ..data.loader import build_datasets
from ..model.moe import MoE
from .runs import Run


# -- model and data ------------------------------------------------------------------------------------
def heldout_batch(run: Run, batch_size: int) -> tuple:
    """``([B, T+1] LongTensor, where)`` from the run's validation split (the training data if it has none)."""
    data_cfg = dict(run.config.get("data") or {})
    data_cfg["num_workers"] = 0
    try:
        data = build_datasets(data_cfg, model_vocab_size=int(run.config["model"]["vocab_size"]), progress=False)
    except (ConfigError, UserInputError) as exc:
        raise UserInputError(
            f"the run's data is needed for a held-out batch and cannot be read: {exc} "
            "(--metrics-only plots the logs alone)"
        ) from None
    if data.val.num_samples > 0:
        return next(data.val.batches(min(batch_size, data.val.num_samples), max_batches=1)), "validation split"
    sampler = data.train_sampler(batch_size, num_workers=0)
    try:
        return sampler.batch_at(0), "training data (the run has no validation split)"
    finally:
        sampler.close()


# -- labels --------------------------------------------------------------------------------------------
def reader_labels(model_cfg) -> List[str]:
    """One label per AttnRes read: ``L0.kda``, ``L0.mlp``, ``L1.kda``, ``L1.moe``, ..., ``out``."""
    cfg = as_model_config(model_cfg)
    mla = set(cfg.mla_layers)
    out = []
    for i in range(cfg.num_layers):
        out.append(f"L{i}.{'mla' if i in mla else 'kda'}")
        out.append(f"L{i}.{'moe' if is_moe_layer(cfg, i) else 'mlp'}")
    return out + ["out"]


def source_labels(model_cfg) -> List[str]:
    """One label per source column: ``emb`` then the blocks (Block) or the sublayer outputs (Full)."""
    cfg = as_model_config(model_cfg)
    if cfg.residual.mode == "prenorm":
        return []
    if cfg.residual.mode == "full":
        return ["emb"] + reader_labels(cfg)[:-1]
    return ["emb"] + [f"b{j}" for j in range(1, len(block_starts(cfg)) + 1)]


def layer_block_boundaries(model_cfg) -> List[float]:
    """Where Block AttnRes blocks start, in decoder layers (for marking plots); [] otherwise.

    ``i`` for a block opening at layer i's token mixer, ``i + 0.5`` for one opening at its FFN (the sublayer
    partition, docs/model.md "Block partition")."""
    cfg = as_model_config(model_cfg)
    if cfg.residual.mode != "block":
        return []
    return [s // 2 if s % 2 == 0 else s / 2 for s in block_starts(cfg)]


# -- depth attention -----------------------------------------------------------------------------------
@torch.no_grad()
def depth_weights(model, input_ids: torch.Tensor) -> List[torch.Tensor]:
    """Per read (sublayers, then the output head) the softmax weights over sources, ``[n, B, T]`` fp32."""
    return [w.float() for w in model.depth_attention(input_ids)]


def depth_matrix(weights: List[torch.Tensor]) -> np.ndarray:
    """Token-averaged weights ``[reads, max sources]``; NaN where a source does not exist for a reader."""
    if not weights:
        return np.zeros((0, 0))
    width = max(w.shape[0] for w in weights)
    out = np.full((len(weights), width), np.nan)
    for r, w in enumerate(weights):
        out[r, : w.shape[0]] = w.mean(dim=(1, 2)).double().numpy()
    return out


def depth_entropy(weights: List[torch.Tensor]) -> List[float]:
    """Mean entropy (nats) of each read's weights over tokens."""
    out = []
    for w in weights:
        p = w.clamp_min(1e-30)
        out.append(float(-(p * p.log()).sum(0).mean()))
    return out


# -- magnitudes, gradients, expert load -----------------------------------------------------------------
def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean(-1).sqrt().mean())


def layer_diagnostics(model, batch: torch.Tensor) -> dict:
    """Forward layer by layer and backward on ``batch`` ``[B, T+1]``; see the module docstring.

    Returns ``loss``, ``output_rms`` / ``grad_norm`` (one per decoder layer), ``expert_load`` (one row of
    fractions per MoE layer) and ``moe_layers`` (their decoder-layer indices).
    """
    ids, labels = batch[:, :-1], batch[:, 1:]
    model.zero_grad(set_to_none=True)
    layers = model.model.layers
    output_rms = []
    with torch.enable_grad():
        state = model.embed(ids)
        for i in range(len(layers)):
            state = model.forward_layers(state, i, i + 1)
            output_rms.append(_rms(state.partial.detach()))
        loads, moe_layers = [], []
        for i, layer in enumerate(layers):
            moe = getattr(layer, "block_sparse_moe", None)
            if isinstance(moe, MoE):
                c = moe.last_tokens_per_expert.detach().double()
                loads.append((c / c.sum().clamp_min(1)).tolist())
                moe_layers.append(i)
        loss = model.lm_loss(model.head(state), labels)
        loss.backward()
    grad_norm = []
    for layer in layers:
        sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in layer.parameters() if p.grad is not None)
        grad_norm.append(sq**0.5)
    model.zero_grad(set_to_none=True)
    return {
        "loss": float(loss.detach()),
        "output_rms": output_rms,
        "grad_norm": grad_norm,
        "expert_load": loads,
        "moe_layers": moe_layers,
    }


def analyze_checkpoint(model, model_cfg, batch: torch.Tensor) -> dict:
    """Everything ``attnres-analyze`` computes from a checkpoint, as plain (JSON-able) values."""
    weights = depth_weights(model, batch[:, :-1])
    diag = layer_diagnostics(model, batch)
    mat = depth_matrix(weights)
    return {
        **diag,
        "readers": reader_labels(model_cfg) if weights else [],
        "sources": source_labels(model_cfg),
        "depth_weights": [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in mat],
        "depth_entropy": [round(e, 6) for e in depth_entropy(weights)],
        "block_starts": layer_block_boundaries(model_cfg),
    }
