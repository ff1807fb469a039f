"""``attnres-convert``: Hugging Face <-> attnres-train checkpoints, from and to any parallel layout.

    attnres-convert from-hf  SRC DST [--residual-mode ...] [--dtype ...] [--overwrite]
    attnres-convert to-hf    SRC DST [--format auto|native|remote] [--dtype ...] [--no-verify] [--overwrite]
    attnres-convert init-run SRC RUN_DIR [--residual-mode ...] [--preset NAME] [TRAINING_OVERRIDES ...]

Input errors print one ``error: ...`` line and exit 2; DST is written to a staging directory and moved into
place only when complete. Usage, examples and what each command writes: docs/hf_interop.md "Command line".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config.errors import ConfigError, UserInputError
from ..config.model import RESIDUAL_MODES, as_model_config, validate_model_config
from ..interop.export import export_checkpoint, resolve_checkpoint, resolve_format
from ..interop.hf import load_hf_checkpoint, write_hf_directory
from ..interop.hf_files import replace_directory
from ..interop.hf_mapping import check_state_dict
from .init_run import continue_command, init_run_from_hf

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"
DTYPES = ("float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error: ...`` line (exit 2) like every other user error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnres-convert",
        description="Convert between Hugging Face KimiLinear checkpoints and attnres-train checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("from-hf", help="HF KimiLinear directory / Hub id -> our checkpoint directory")
    p.add_argument("src", help="HF model directory (config.json + *.safetensors) or Hub repo id")
    p.add_argument("dst", help="output directory (model.safetensors + model_config.yaml)")
    p.add_argument(
        "--residual-mode",
        choices=RESIDUAL_MODES,
        default=None,
        help="residual mode of the imported model (default: prenorm, as in the HF model)",
    )
    p.add_argument("--num-blocks", type=int, default=None, help="block mode: number of AttnRes blocks")
    p.add_argument("--block-size", type=int, default=None, help="block mode: decoder layers per AttnRes block")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="cast floating-point weights (router bias stays fp32); default: keep the source dtype",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    p = sub.add_parser("to-hf", help="our checkpoint directory or a training checkpoint -> HF directory")
    p.add_argument(
        "src",
        help="our checkpoint directory (model.safetensors + model_config.yaml), or a training "
        "checkpoint of any layout (step_* dir, checkpoints/ dir or run dir)",
    )
    p.add_argument("dst", help="output HF model directory")
    p.add_argument(
        "--format",
        choices=("auto", "native", "remote"),
        default="auto",
        help="native: transformers' KimiLinearForCausalLM (PreNorm only); remote: trust_remote_code "
        "files shipped with the weights (any residual mode); auto (default): native for PreNorm",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating-point weights (default: keep)")
    p.add_argument(
        "--max-shard-size", default="5GiB", help="largest safetensors shard, e.g. 5GiB, 500MB (default 5GiB)"
    )
    p.add_argument("--no-verify", action="store_true", help="training checkpoint: skip the sha256 manifest check")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    p = sub.add_parser("init-run", help="HF KimiLinear directory / Hub id -> step 0 of a training run")
    p.add_argument("src", help="HF model directory (config.json + *.safetensors) or Hub repo id")
    p.add_argument("run_dir", help="new run directory (gets checkpoints/step_00000000 and configs/model/PRESET.yaml)")
    p.add_argument(
        "overrides", nargs="*", help="the training run's Hydra overrides (optim.* shape the optimizer state)"
    )
    p.add_argument("--residual-mode", choices=RESIDUAL_MODES, default=None, help="as for from-hf")
    p.add_argument("--num-blocks", type=int, default=None, help="block mode: number of AttnRes blocks")
    p.add_argument("--block-size", type=int, default=None, help="block mode: decoder layers per AttnRes block")
    p.add_argument("--preset", default="imported", help="name of the model preset written (default imported)")
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


def _model_overrides(args) -> dict:
    overrides = {}
    if args.residual_mode is not None:
        overrides["residual.mode"] = args.residual_mode
    if args.num_blocks is not None:
        overrides["residual.num_blocks"] = args.num_blocks
    if args.block_size is not None:
        overrides["residual.block_size"] = args.block_size
    return overrides


def parse_size(text: str) -> int:
    """``5GiB`` / ``500MB`` / ``1000000`` -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1, "": 1}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    try:
        value = float(num) * units[t[len(num) :]]
    except (KeyError, ValueError):
        raise UserInputError(f"--max-shard-size {text!r}: expected a size such as 5GiB, 500MB or 1000000") from None
    if value < 1:
        raise UserInputError(f"--max-shard-size {text!r}: must be positive")
    return int(value)


def from_hf(args) -> str:
    dst = Path(args.dst).expanduser()
    _check_dst(args.src, dst, args.overwrite)
    cfg, sd = load_hf_checkpoint(args.src, **_model_overrides(args))
    check_state_dict(sd, cfg, what=f"converted checkpoint from {args.src}")
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
        sd = {
            k: v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v
            for k, v in sd.items()
        }
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
    try:
        return load_file(str(model_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserInputError(f"{model_file}: cannot read safetensors file: {exc}") from None


def to_hf(args) -> str:
    dst = Path(args.dst).expanduser()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    max_shard = parse_size(args.max_shard_size)
    ours = (Path(args.src).expanduser() / CONFIG_FILE).is_file()
    if ours:
        _check_dst(args.src, dst, args.overwrite)
        cfg, model_file = read_checkpoint_config(args.src)
        resolve_format(cfg, args.format)  # before reading (possibly huge) weights
    else:  # a training checkpoint: DST may live in the run dir, just not in the checkpoint itself
        step_dir = resolve_checkpoint(args.src)
        _check_dst(str(step_dir), dst, args.overwrite)
    staging = _staging_dir(dst)
    try:
        if ours:
            sd = read_checkpoint_weights(model_file)
            check_state_dict(sd, cfg, what=str(model_file))
            write_hf_directory(sd, cfg, staging, max_shard_bytes=max_shard, fmt=args.format, dtype=dtype)
            source = str(args.src)
        else:
            _, cfg, step_dir = export_checkpoint(
                step_dir, staging, args.format, dtype, max_shard, verify=not args.no_verify
            )
            source = str(step_dir)
        replace_directory(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    kind = _describe_format(dst)
    return f"wrote {dst} from {source} ({kind}, {cfg.num_layers} layers, residual.mode={cfg.residual.mode})"


def _describe_format(dst: Path) -> str:
    model_type = json.loads((dst / "config.json").read_text()).get("model_type")
    if model_type == "kimi_linear":
        return "transformers KimiLinearForCausalLM"
    return "trust_remote_code format: load with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)"


def init_run(args) -> str:
    path = init_run_from_hf(args.src, args.run_dir, args.overrides, _model_overrides(args), preset=args.preset)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: one report, from rank 0
        return ""
    return (
        f"wrote {path} (step 0: imported weights + fresh optimizer state)\nstart training (any parallel "
        f"layout) with:\n  {continue_command(args.run_dir, args.preset, args.overrides)}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "init-run":  # training overrides may also follow the options
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        message = {"from-hf": from_hf, "to-hf": to_hf, "init-run": init_run}[args.command](args)
    except (UserInputError, ConfigError, OSError) as exc:  # OSError: permissions, disk full, ...
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always exactly one line
        return 2
    if message:
        print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
