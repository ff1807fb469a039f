"""Export to Hugging Face, streaming: our state dict or a training checkpoint of any layout -> safetensors.

Why streaming: torch.distributed.checkpoint reads any subset of tensors of a checkpoint of any layout into
full-size CPU tensors in one process, so we consolidate one decoder layer at a time: peak host memory is one
layer plus one output shard, not the model. Formats: ``native`` (transformers' ``KimiLinearForCausalLM``,
PreNorm), ``remote`` (:mod:`.hf_remote`, any residual mode), ``auto``. The file API layer of interop/
(docs/hf_interop.md "Code layers", "Command line").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from omegaconf import OmegaConf

from ..checkpoint import CheckpointManager, is_complete, read_config_text, verify_checkpoint
from ..checkpoint.safe_dcp import SafeFileSystemReader, dcp_load
from ..config.errors import ConfigError, UserInputError
from ..config.model import ModelConfig, as_model_config, validate_model_config
from ..model import build_model
from .hf_card import write_hf_extras
from .hf_config import config_to_hf
from .hf_files import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from .hf_mapping import ATTNRES_EXPORT_MESSAGE, group_keys, group_to_hf
from .hf_remote import group_to_remote, write_remote_files

FORMATS = ("auto", "native", "remote")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LoadGroup = Callable[[Iterable[str]], Mapping[str, torch.Tensor]]


def resolve_format(cfg: ModelConfig, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise UserInputError(f"unknown export format {fmt!r}; choose one of {'|'.join(FORMATS)}")
    if fmt == "auto":
        return "native" if cfg.residual.mode == "prenorm" and not cfg.moe.bias_in_weights else "remote"
    if fmt == "native" and cfg.residual.mode != "prenorm":
        raise UserInputError(ATTNRES_EXPORT_MESSAGE.format(mode=cfg.residual.mode))
    return fmt


def expected_tensors(cfg: ModelConfig) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Our state-dict names -> (shape, dtype) for ``cfg`` (built on the meta device: no memory)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in build_model(cfg, device="meta").state_dict().items()}


def write_hf(
    load_group: LoadGroup,
    model_cfg: ModelConfig,
    out_dir,
    fmt: str = "auto",
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    keys: Optional[Iterable[str]] = None,
    tokenizer: Optional[str] = None,
    step_dir: Optional[Path] = None,
    config_text: Optional[str] = None,
) -> str:
    """Write an HF directory, converting group by group; returns the format used (``native``/``remote``).

    ``load_group(keys)`` returns our tensors for those names (e.g. a slice of a state dict, or a DCP read);
    ``keys`` defaults to the full model's names. ``dtype`` casts floating weights (the router's correction bias
    stays fp32). ``tokenizer`` (a ``data.tokenizer`` value), ``step_dir`` and ``config_text`` (the training
    checkpoint and its run config) go into the tokenizer files, generation config and model card
    (:mod:`attnres_train.interop.hf_card`).
    """
    cfg = validate_model_config(as_model_config(model_cfg))
    fmt = resolve_format(cfg, fmt)
    hf_cfg = config_to_hf(cfg) if fmt == "native" else None  # raises (e.g. bias_in_weights) before writing
    out = Path(os.fspath(out_dir)).expanduser()
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out}: exists and is not a directory")
    keys = list(expected_tensors(cfg) if keys is None else keys)
    writer = ShardWriter(out, max_shard_bytes, dtype)
    for layer, group in group_keys(keys, cfg.num_layers).items():
        sd = load_group(group)
        hf = group_to_hf(sd, cfg, layer) if fmt == "native" else group_to_remote(sd, cfg, layer)
        for k, v in hf.items():
            writer.add(k, v)
        del sd, hf
    writer.finish()
    weights_dtype = next(iter(writer.dtypes)) if len(writer.dtypes) == 1 else None
    if fmt == "native":
        if weights_dtype is not None:
            hf_cfg.dtype = str(weights_dtype).replace("torch.", "")
        hf_cfg.save_pretrained(str(out))
    else:
        write_remote_files(out, cfg, weights_dtype)
    write_hf_extras(out, cfg, fmt, tokenizer=tokenizer, step_dir=step_dir, config_text=config_text)
    return fmt


def write_state_dict(
    sd: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    out_dir,
    fmt: str = "auto",
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: Optional[str] = None,
) -> str:
    """:func:`write_hf` for an in-memory state dict of ours (all of its keys are converted and checked)."""
    return write_hf(
        lambda keys: {k: sd[k] for k in keys},
        model_cfg,
        out_dir,
        fmt,
        dtype,
        max_shard_bytes,
        keys=list(sd),
        tokenizer=tokenizer,
    )


# ============================================================================================ checkpoints
def resolve_checkpoint(path) -> Path:
    """A complete training checkpoint for ``path``: a ``step_*`` dir, a ``checkpoints`` dir or a run dir
    (the newest complete checkpoint in them)."""
    p = Path(os.fspath(path)).expanduser()
    if is_complete(p):
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            latest = CheckpointManager(root, keep_last=0).latest()
            if latest is not None:
                return latest
    why = "does not exist" if not p.exists() else "holds no complete checkpoint (step_* dir with a COMMITTED marker)"
    raise UserInputError(f"{path}: {why}; expected a checkpoint dir, a checkpoints/ dir or a run dir")


def checkpoint_model_config(step_dir: Path) -> ModelConfig:
    """The ``model`` section of the run config saved with a checkpoint."""
    try:
        raw = OmegaConf.create(read_config_text(step_dir))
        return validate_model_config(as_model_config(raw["model"]))
    except ConfigError as exc:
        raise UserInputError(f"{step_dir}/config.yaml: {exc}") from None
    except Exception as exc:  # YAML syntax, no model section
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserInputError(f"{step_dir}/config.yaml: no usable model section ({reason})") from None


class CheckpointReader:
    """Reads full-size model tensors out of a DCP checkpoint (any layout), in one process, a subset at a time."""

    def __init__(self, step_dir: Path, cfg: ModelConfig):
        self.step_dir, self.cfg = Path(step_dir), cfg
        md = SafeFileSystemReader(str(self.step_dir)).read_metadata().state_dict_metadata
        self.dtypes: Dict[str, torch.dtype] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        tied = cfg.tie_word_embeddings
        for k, (shape, _) in expected_tensors(cfg).items():
            entry = md.get("model." + k)
            if entry is None:
                if tied and k == "lm_head.weight":
                    continue  # the head is the embedding
                raise UserInputError(
                    f"checkpoint {self.step_dir} has no tensor 'model.{k}' although its config.yaml "
                    f"describes it (a checkpoint of another model?)"
                )
            size = tuple(getattr(entry, "size", ()))
            if size != shape:
                raise UserInputError(
                    f"checkpoint {self.step_dir} tensor 'model.{k}' has shape {size}, its config.yaml needs {shape}"
                )
            self.shapes[k], self.dtypes[k] = shape, entry.properties.dtype

    def keys(self):
        return list(self.shapes)

    def load(self, keys: Iterable[str]) -> Dict[str, torch.Tensor]:
        sd = {k: torch.empty(self.shapes[k], dtype=self.dtypes[k]) for k in keys if k in self.shapes}
        if sd:
            dcp_load({"model": sd}, self.step_dir)
        return sd

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.load(self.keys())


def export_checkpoint(
    src,
    dst,
    fmt: str = "auto",
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    verify: bool = True,
    tokenizer: Optional[str] = None,
) -> Tuple[str, ModelConfig, Path]:
    """Consolidate a training checkpoint of any layout into an HF directory ``dst``.

    Returns ``(format, model config, checkpoint dir used)``. ``verify`` checks every file against the
    checkpoint's manifest first (sha256; slow for very large checkpoints). ``tokenizer`` defaults to the
    run's ``data.tokenizer``.
    """
    step_dir = resolve_checkpoint(src)
    if verify:
        verify_checkpoint(step_dir)
    cfg = checkpoint_model_config(step_dir)
    resolve_format(cfg, fmt)  # fail before reading tensors
    config_text = read_config_text(step_dir)
    if tokenizer is None:
        tokenizer = checkpoint_tokenizer(config_text)
    reader = CheckpointReader(step_dir, cfg)
    used = write_hf(
        reader.load,
        cfg,
        dst,
        fmt,
        dtype,
        max_shard_bytes,
        keys=reader.keys(),
        tokenizer=tokenizer,
        step_dir=step_dir,
        config_text=config_text,
    )
    return used, cfg, step_dir


def checkpoint_tokenizer(config_text: str) -> Optional[str]:
    """``data.tokenizer`` of a checkpoint's run config (``byte`` when the config has a data section without
    it, the schema default); None when the config has no data section (e.g. written by ``init-run``)."""
    try:
        raw = OmegaConf.to_container(OmegaConf.create(config_text))
    except Exception:  # noqa: BLE001 - checkpoint_model_config has already parsed it; be lenient here
        return None
    data = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict):
        return None
    tok = data.get("tokenizer", "byte")
    return tok if isinstance(tok, str) and tok.strip() else None
