"""``attnres-convert``: convert between Hugging Face KimiLinear checkpoints and our checkpoint directories.

    attnres-convert from-hf SRC DST [--residual-mode prenorm|full|block] [--num-blocks N | --block-size S]
                                    [--dtype float32|bfloat16|float16] [--overwrite]
    attnres-convert to-hf   SRC DST [--overwrite]

``from-hf``: SRC is an HF model directory (``config.json`` + safetensors, e.g. from ``save_pretrained``) or a
Hub repo id; DST becomes our checkpoint directory: ``model.safetensors`` (our tensor names) and
``model_config.yaml`` (the resolved ModelConfig). ``--residual-mode block|full`` imports the PreNorm weights
into an AttnRes model whose pseudo-queries start at zero.
``to-hf``: SRC is such a directory of ours (PreNorm only); DST becomes a native transformers
``KimiLinearForCausalLM`` directory.

Errors in the input print one ``error: ...`` line to stderr and exit with status 2, with no traceback. DST is
written to a staging directory first and moved into place only when complete; a non-empty DST is refused
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from ..config.errors import ConfigError, UserInputError
from ..config.model import RESIDUAL_MODES

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"
DTYPES = ("float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error: ...`` line (exit 2) like every other user error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnres-convert",
                     description="Convert between Hugging Face KimiLinear checkpoints and attnres-train checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("from-hf", help="HF KimiLinear directory / Hub id -> our checkpoint directory")
    p.add_argument("src", help="HF model directory (config.json + *.safetensors) or Hub repo id")
    p.add_argument("dst", help="output directory (model.safetensors + model_config.yaml)")
    p.add_argument("--residual-mode", choices=RESIDUAL_MODES, default=None,
                   help="residual mode of the imported model (default: prenorm, as in the HF model)")
    p.add_argument("--num-blocks", type=int, default=None, help="block mode: number of AttnRes blocks")
    p.add_argument("--block-size", type=int, default=None, help="block mode: decoder layers per AttnRes block")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast floating-point weights (router bias stays fp32); default: keep the source dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    p = sub.add_parser("to-hf", help="our checkpoint directory -> native transformers KimiLinear directory")
    p.add_argument("src", help="our checkpoint directory (model.safetensors + model_config.yaml)")
    p.add_argument("dst", help="output HF model directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    return parser


def _check_dst(src: str, dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise UserInputError(f"{dst}: exists and is not a directory")
    if os.path.exists(src):
        s, d = Path(src).resolve(), dst.resolve()
        if s == d or s in d.parents or d in s.parents:
            raise UserInputError(f"{dst}: must not be the source directory, inside it, or contain it")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise UserInputError(f"{dst}: directory is not empty; pass --overwrite to replace it")


def _staging_dir(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def from_hf(args) -> str:
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ..interop.hf import check_state_dict, load_hf_checkpoint, replace_directory

    dst = Path(args.dst).expanduser()
    _check_dst(args.src, dst, args.overwrite)
    overrides = {}
    if args.residual_mode is not None:
        overrides["residual.mode"] = args.residual_mode
    if args.num_blocks is not None:
        overrides["residual.num_blocks"] = args.num_blocks
    if args.block_size is not None:
        overrides["residual.block_size"] = args.block_size
    cfg, sd = load_hf_checkpoint(args.src, **overrides)
    check_state_dict(sd, cfg, what=f"converted checkpoint from {args.src}")
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
        sd = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v
              for k, v in sd.items()}
    staging = _staging_dir(dst)
    try:
        tensors = {k: v.detach().contiguous().clone() for k, v in sd.items()}  # untie shared storage
        save_file(tensors, str(staging / MODEL_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        replace_directory(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"wrote {dst} ({len(sd)} tensors, residual.mode={cfg.residual.mode})"


def read_checkpoint_config(src: str):
    """(ModelConfig, path of model.safetensors) of one of our checkpoint directories, with clear errors."""
    from omegaconf import OmegaConf

    from ..config.model import as_model_config, validate_model_config

    d = Path(src).expanduser()
    if not d.is_dir():
        raise UserInputError(f"{src}: no such directory (expected {MODEL_FILE} + {CONFIG_FILE})")
    cfg_file, model_file = d / CONFIG_FILE, d / MODEL_FILE
    for f in (cfg_file, model_file):
        if not f.is_file():
            raise UserInputError(f"{f}: missing (expected {MODEL_FILE} + {CONFIG_FILE} in {src})")
    try:
        raw = OmegaConf.load(cfg_file)
    except Exception as exc:  # YAML syntax errors
        raise UserInputError(f"{cfg_file}: cannot parse YAML: {str(exc).splitlines()[0]}") from None
    try:
        cfg = validate_model_config(as_model_config(raw))
    except ConfigError as exc:
        raise UserInputError(f"{cfg_file}: {exc}") from None
    return cfg, model_file


def read_checkpoint_weights(model_file: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(model_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserInputError(f"{model_file}: cannot read safetensors file: {exc}") from None


def to_hf(args) -> str:
    from ..interop.hf import ATTNRES_EXPORT_MESSAGE, check_state_dict, replace_directory, write_hf_directory

    dst = Path(args.dst).expanduser()
    _check_dst(args.src, dst, args.overwrite)
    cfg, model_file = read_checkpoint_config(args.src)
    if cfg.residual.mode != "prenorm":  # before reading (possibly huge) weights
        raise UserInputError(ATTNRES_EXPORT_MESSAGE.format(mode=cfg.residual.mode))
    sd = read_checkpoint_weights(model_file)
    check_state_dict(sd, cfg, what=str(model_file))
    staging = _staging_dir(dst)
    try:
        write_hf_directory(sd, cfg, staging)
        replace_directory(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"wrote {dst} (transformers KimiLinearForCausalLM, {cfg.num_layers} layers)"


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        message = from_hf(args) if args.command == "from-hf" else to_hf(args)
    except (UserInputError, ConfigError, OSError) as exc:  # OSError: permissions, disk full, ...
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always exactly one line
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
