"""Hugging Face file API: read an HF directory (or Hub id) into our config and state dict, load or save a model.

The top layer of interop/ (docs/hf_interop.md "Code layers"): it combines the formats (``hf_config``,
``hf_remote``, ``hf_files``) with the tensor mapping (``hf_mapping``); writing goes through ``export``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..config.errors import UserInputError
from ..config.model import ModelConfig
from ..model import build_model
from .export import write_state_dict
from .hf_config import apply_overrides, config_from_hf
from .hf_files import DEFAULT_MAX_SHARD_BYTES, read_hf_config, read_safetensors_dir, resolve_hf_path
from .hf_mapping import check_state_dict, iter_state_dict_from_hf
from .hf_remote import config_from_remote, is_remote_config, iter_state_dict_from_remote


def load_hf_checkpoint(path: os.PathLike | str, **overrides) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """Read an HF directory (or Hub repo id) → (our ModelConfig, our state dict), no model built.

    Reads native ``KimiLinear`` checkpoints and our ``trust_remote_code`` AttnRes exports
    (``model_type: kimi_linear_attnres``, :mod:`attnres_train.interop.hf_remote`).
    """
    cfg, parts = iter_hf_checkpoint(path, lazy=False, **overrides)
    sd: Dict[str, torch.Tensor] = {}
    for part in parts:
        sd.update(part)
    return cfg, sd


def iter_hf_checkpoint(path: os.PathLike | str, lazy: bool = True, **overrides):
    """``(our ModelConfig, iterator of our state-dict parts)``: as :func:`load_hf_checkpoint`, but converted one
    part at a time (embedding/head, then each decoder layer) from tensors read lazily from the safetensors files,
    so a consumer that copies what it needs and drops the rest never holds the whole model."""
    directory = resolve_hf_path(path)
    raw = read_hf_config(directory)
    remote = is_remote_config(raw)
    name = Path(os.fspath(path).rstrip("/")).name or "hf"
    try:
        base = config_from_remote(raw, name=name) if remote else config_from_hf(raw, name=name)
    except UserInputError as exc:
        raise UserInputError(f"{directory / 'config.json'}: {exc}") from None
    if remote and any(str(k) == "residual" or str(k).startswith("residual.") for k in overrides):
        raise UserInputError(
            f"{directory}: an AttnRes export keeps its own residual mode ({base.residual.mode}); "
            "residual overrides apply to native KimiLinear checkpoints only"
        )
    cfg = apply_overrides(base, overrides)
    hf_sd = read_safetensors_dir(directory, lazy=lazy)

    def parts():
        it = iter_state_dict_from_remote(hf_sd, cfg) if remote else iter_state_dict_from_hf(hf_sd, cfg)
        try:
            yield from it
        except UserInputError as exc:
            raise UserInputError(f"{directory}: {exc}") from None

    return cfg, parts()


def load_from_hf(path: os.PathLike | str, *, dtype: Optional[torch.dtype] = None, **overrides):
    """Load a Hugging Face KimiLinear model (or our AttnRes export) into our model: returns ``(model, cfg)``.

    ``path``: a local directory written by ``save_pretrained`` (``config.json`` + safetensors) or a Hub repo id.
    ``overrides``: config overrides, nested (``residual={"mode": "block", "num_blocks": 2}``) or dotted
    (``**{"residual.mode": "block"}``). Switching ``residual.mode`` to ``block``/``full`` loads the baseline
    weights and leaves the AttnRes pseudo-queries at zero. ``dtype``: parameter dtype of the returned model
    (default: the model's own default, fp32 master weights, whatever the checkpoint dtype). The model is
    returned in eval mode.
    """
    cfg, sd = load_hf_checkpoint(path, **overrides)
    model = build_model(cfg)
    check_state_dict(sd, cfg, what=f"converted checkpoint from {os.fspath(path)}")
    model.load_state_dict(sd, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), cfg


def save_to_hf(
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    path: os.PathLike | str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    fmt: str = "auto",
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Export a model as a Hugging Face directory.

    ``fmt="auto"``: a PreNorm model becomes a native transformers ``KimiLinearForCausalLM`` directory
    (``config.json`` + safetensors in the released checkpoint layout, loadable without remote code); a
    Block/Full AttnRes model (or ``moe.bias_in_weights``) becomes the ``trust_remote_code`` format (modeling
    files shipped in the directory). ``fmt="native"`` refuses AttnRes models; ``fmt="remote"`` forces remote code.
    Existing weight files in ``path`` are replaced.
    """
    return write_hf_directory(
        model.state_dict(), model_cfg, path, max_shard_bytes=max_shard_bytes, fmt=fmt, dtype=dtype
    )


def write_hf_directory(
    sd: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    path: os.PathLike | str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    fmt: str = "auto",
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write our state dict ``sd`` as an HF directory (``config.json`` + safetensors; see :func:`save_to_hf`)."""
    out = Path(os.fspath(path)).expanduser()
    write_state_dict(sd, model_cfg, out, fmt=fmt, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return out
