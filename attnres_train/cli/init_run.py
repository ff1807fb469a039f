"""``attnres-convert init-run``: a Hugging Face checkpoint becomes step 0 of a training run (any layout).

Why here: it writes what a fresh run saves at step 0 (weights, the run's zero optimizer state, ``step=0``, the
run config) with the trainer's own train module and :class:`CheckpointManager`, so it sits above train/ and
interop/. The run then resumes through the ordinary resume path; details in docs/hf_interop.md "Command line".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ..checkpoint import CheckpointManager
from ..config.errors import UserInputError
from ..config.parallel import ParallelConfig
from ..config.paths import CONFIG_DIR
from ..config.pipeline import PipelineConfig
from ..config.schema import as_config, register_configs, validate_config
from ..interop.hf import iter_hf_checkpoint
from ..model import build_model
from ..parallel.init import load_full_tensors
from ..parallel.mesh import build_parallel_context, init_process_group, single_process_context
from ..parallel.state_dict import training_state_dict
from ..train.train_module import build_train_module

PRESET_DIR = Path("configs") / "model"


def compose_run_config(overrides: Sequence[str]):
    """The typed run Config of ``configs/config.yaml`` with Hydra ``overrides`` (as on the command line)."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            dcfg = compose(config_name="config", overrides=list(overrides))
    except Exception as exc:  # hydra's override / missing-config errors
        raise UserInputError(f"bad training override: {(str(exc).strip().splitlines() or [''])[0]}") from None
    return as_config(dcfg)


def init_run_from_hf(
    src, run_dir, overrides: Sequence[str] = (), model_overrides: Optional[Dict] = None, preset: str = "imported"
) -> Path:
    """Write ``run_dir/checkpoints/step_00000000`` (+ the model preset) from the HF checkpoint ``src``.

    ``overrides``: the training run's Hydra overrides (at least those that shape the optimizer state:
    ``optim.*``). ``model_overrides``: as for :func:`load_from_hf` (e.g.
    ``{"residual.mode": "block", "residual.num_blocks": 4}``). Returns the checkpoint directory.

    No process ever holds the whole model: the model is built on ``meta``, this process's shards are
    materialised, and the HF tensors are converted one decoder layer at a time, read lazily from the safetensors
    files, each rank copying only its shards. Run in one process, the import holds the model once (plus the
    optimizer state it writes); under ``torchrun`` it uses the ``parallel.*`` / ``pipeline.*`` overrides as the
    layout and every rank writes its own part of the checkpoint (which still resumes under any layout).
    """
    if not preset.replace("_", "").replace("-", "").isalnum():
        raise UserInputError(f"preset name {preset!r} must be letters, digits, '-' or '_'")
    run = Path(os.fspath(run_dir)).expanduser().absolute()
    ckpt_root = run / "checkpoints"
    if CheckpointManager(ckpt_root, keep_last=0).latest() is not None:
        raise UserInputError(f"{ckpt_root} already holds a checkpoint; import into a new run_dir")
    model_cfg, parts = iter_hf_checkpoint(src, **(model_overrides or {}))

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:  # one process: the layout is irrelevant (the checkpoint resumes under any layout)
        overrides = [o for o in overrides if not o.lstrip("+~").startswith(("parallel.", "pipeline."))]
    cfg = compose_run_config(overrides)
    cfg.model, cfg.run_dir = model_cfg, str(run)
    if not distributed:
        cfg.parallel, cfg.pipeline = ParallelConfig(), PipelineConfig()
    cfg.trainer.compile = cfg.trainer.activation_checkpointing = False  # wrappers only; same state either way
    if distributed:
        world, device = init_process_group(cfg.trainer.device)
        validate_config(cfg, dp_world_size=world)  # (the name predates the engine: the world size)
        ctx = build_parallel_context(cfg.parallel, cfg.model, cfg.data.seq_len, world, device.type)
    else:
        validate_config(cfg, dp_world_size=1)
        ctx = single_process_context(torch.device("cpu"))

    torch.manual_seed(cfg.seed)  # the RNG state a fresh run has after building its model (saved with step 0)
    module = build_train_module(build_model(cfg.model, device="meta"), cfg, ctx, cfg.trainer.max_steps)
    try:
        load_full_tensors(module.model, parts, cfg.model)
    except KeyError as exc:
        raise UserInputError(f"converted checkpoint from {src}: {exc.args[0]}") from None
    model_sd, optim_sd = training_state_dict(module.model, module.optimizers)  # the trainer's own keys
    config_text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    meta = {
        "tokens_seen": 0,
        "data": {"consumed_samples": 0},
        "parallel": "imported (any layout)",
        "imported_from": os.fspath(src),
    }
    manager = CheckpointManager(
        ckpt_root,
        keep_last=0,
        rank=ctx.rank,
        world_size=ctx.world_size,
        barrier=ctx.barrier if ctx.is_distributed else None,
    )
    path = manager.save(0, {"model": model_sd, "optim": optim_sd}, config_text=config_text, meta=meta)
    if ctx.rank == 0:
        preset_file = run / PRESET_DIR / f"{preset}.yaml"
        preset_file.parent.mkdir(parents=True, exist_ok=True)
        preset_file.write_text(
            f"# imported from {os.fspath(src)} by attnres-convert init-run\n"
            + OmegaConf.to_yaml(OmegaConf.structured(cfg.model))
        )
    return path


def continue_command(run_dir, preset: str = "imported", overrides: List[str] = ()) -> str:
    """The ``attnres-train`` command line that starts training from an imported run directory."""
    run = Path(os.fspath(run_dir)).expanduser().absolute()
    extra = " ".join(o for o in overrides)
    return f"attnres-train 'hydra.searchpath=[file://{run / 'configs'}]' model={preset} run_dir={run}" + (
        f" {extra}" if extra else ""
    )
