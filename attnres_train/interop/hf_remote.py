"""The ``trust_remote_code`` Hugging Face format for AttnRes models: config.json, tensor names, shipped code.

Why: native transformers' ``KimiLinearForCausalLM`` has no Attention Residuals, so a Block/Full AttnRes model
ships its own modeling code (``interop/remote/*.py``, copied next to the weights). The format is the native
one plus ``attnres_*`` config fields and the AttnRes tensors under their Kimi-K3 names. A format module of
interop/ (docs/hf_interop.md "Code layers", "The trust_remote_code format").
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from ..config.errors import UserInputError
from ..config.model import ModelConfig, ResidualConfig, as_model_config, validate_model_config
from .hf_config import apply_overrides, config_from_hf, config_to_hf
from .hf_mapping import group_to_hf, iter_state_dict_from_hf

REMOTE_MODEL_TYPE = "kimi_linear_attnres"
REMOTE_ARCHITECTURE = "KimiLinearAttnResForCausalLM"
REMOTE_DIR = Path(__file__).resolve().parent / "remote"
REMOTE_FILES = ("configuration_attnres.py", "modeling_attnres.py")
AUTO_MAP = {
    "AutoConfig": "configuration_attnres.KimiLinearAttnResConfig",
    "AutoModel": "modeling_attnres.KimiLinearAttnResModel",
    "AutoModelForCausalLM": "modeling_attnres.KimiLinearAttnResForCausalLM",
}
# config.json fields that exist only in the remote format
REMOTE_FIELDS = (
    "attnres_mode",
    "attnres_num_blocks",
    "attnres_block_size",
    "attnres_partition",
    "kda_chunk_size",
    "moe_bias_in_weights",
    "auto_map",
)


def is_attnres_key(key: str) -> bool:
    return key.endswith(("_res_norm.weight", "_res_proj.weight"))


def prenorm_view(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with a plain residual and unbiased routing weights: the part the native format describes."""
    return dataclasses.replace(cfg, residual=ResidualConfig(), moe=dataclasses.replace(cfg.moe, bias_in_weights=False))


def remote_config_dict(model_cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """config.json of the remote-code export of ``model_cfg`` (any residual mode)."""
    cfg = validate_model_config(as_model_config(model_cfg))
    raw = json.loads(config_to_hf(prenorm_view(cfg)).to_json_string())
    r = cfg.residual
    raw.update(
        model_type=REMOTE_MODEL_TYPE,
        architectures=[REMOTE_ARCHITECTURE],
        auto_map=dict(AUTO_MAP),
        attnres_mode=r.mode,
        attnres_num_blocks=r.num_blocks if r.mode == "block" else None,
        attnres_block_size=r.block_size if r.mode == "block" else None,
        attnres_partition=r.partition if r.mode == "block" else None,
        kda_chunk_size=cfg.kda.chunk_size,
        moe_bias_in_weights=cfg.moe.bias_in_weights,
    )
    if dtype is not None:
        raw["dtype"] = str(dtype).replace("torch.", "")
    return raw


def is_remote_config(raw: Mapping[str, Any]) -> bool:
    return raw.get("model_type") == REMOTE_MODEL_TYPE


def config_from_remote(raw: Mapping[str, Any], name: str = "hf") -> ModelConfig:
    """Our ModelConfig for a remote-format config.json (the native part is read as :func:`config_from_hf` does)."""
    native = {k: v for k, v in raw.items() if k not in REMOTE_FIELDS}
    native.update(model_type="kimi_linear", architectures=["KimiLinearForCausalLM"])
    base = config_from_hf(native, name=name)
    mode = raw.get("attnres_mode", "block")
    residual = {"mode": mode, "num_blocks": raw.get("attnres_num_blocks"), "block_size": raw.get("attnres_block_size")}
    residual["partition"] = raw.get("attnres_partition") or "decoder_layer"  # absent: exports before the field
    try:
        return apply_overrides(
            base,
            {
                "residual": residual,
                "kda.chunk_size": raw.get("kda_chunk_size", 64),
                "moe.bias_in_weights": bool(raw.get("moe_bias_in_weights", False)),
            },
        )
    except Exception as exc:  # ConfigError naming the model field
        raise UserInputError(f"invalid attnres fields in config.json: {exc}") from None


def group_to_remote(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, layer: Optional[int]) -> Dict[str, torch.Tensor]:
    """One :func:`group_keys` group of our state dict in the remote format (AttnRes tensors passed through)."""
    attn = {k: v for k, v in sd.items() if is_attnres_key(k)}
    if attn and cfg.residual.mode == "prenorm":
        raise UserInputError(f"state dict has AttnRes tensor {next(iter(attn))!r} but the config is prenorm")
    rest = {k: v for k, v in sd.items() if not is_attnres_key(k)}
    out = {k: v for k, v in group_to_hf(rest, cfg, layer, "checkpoint").items() if v.numel() > 0}
    out.update(attn)
    return out


def state_dict_from_remote(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our state dict from remote-format tensors (the native part checked as :func:`state_dict_from_hf` does)."""
    out: Dict[str, torch.Tensor] = {}
    for part in iter_state_dict_from_remote(hf_sd, cfg):
        out.update(part)
    return out


def iter_state_dict_from_remote(
    hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> Iterator[Dict[str, torch.Tensor]]:
    """:func:`state_dict_from_remote` one part at a time (the AttnRes tensors first: d values per sublayer),
    reading a lazy ``hf_sd`` only as each part needs it (see :func:`iter_state_dict_from_hf`)."""
    yield {k: hf_sd[k] for k in hf_sd.keys() if is_attnres_key(k)}
    native = KeyFilter(hf_sd, lambda k: not is_attnres_key(k))
    yield from iter_state_dict_from_hf(native, prenorm_view(cfg))


class KeyFilter(Mapping):
    """A read-only view of the keys of ``base`` that ``keep`` accepts (values are read from ``base`` on access)."""

    def __init__(self, base: Mapping, keep):
        self.base, self.names = base, [k for k in base.keys() if keep(k)]
        self._set = set(self.names)

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        return self.base[key]

    def __contains__(self, key) -> bool:
        return key in self._set

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def write_remote_files(directory: Path, model_cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> None:
    """config.json (with ``auto_map``) and the modeling/configuration files of the remote format."""
    directory = Path(directory)
    (directory / "config.json").write_text(
        json.dumps(remote_config_dict(model_cfg, dtype), indent=2, sort_keys=True) + "\n"
    )
    for name in REMOTE_FILES:
        src = REMOTE_DIR / name
        if not src.is_file():
            raise UserInputError(f"{src}: the remote-code file is missing from this installation of attnres-train")
        shutil.copyfile(src, directory / name)
