"""Top-level Hydra schema: the root config dataclass, its ConfigStore registration and whole-config validation.

``configs/config.yaml`` starts its defaults list with ``base_config`` (registered here), so every YAML preset
and command-line override is type-checked against these dataclasses by OmegaConf, and then
:func:`validate_config` checks values and cross-field rules, raising one ConfigError that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from .data import DataConfig, as_data_config, validate_data_config
from .errors import ConfigError
from .model import ModelConfig, as_model_config, validate_model_config
from .parallel import ParallelConfig, resolve_parallel_dims
from .pipeline import PipelineConfig, check_pipeline_dp, validate_pipeline_config
from .run import LoggingConfig, TrainerConfig, validate_logging_config, validate_trainer_config
from .structured import as_structured
from .train import CheckpointConfig, OptimConfig, validate_checkpoint_config, validate_optim_config


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Parallel layout (docs/parallel.md): dp_replicate x dp_shard x tp (x pp) = world size; ep folded into dp.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # How pipeline stages are cut and scheduled when parallel.pp > 1 (docs/pipeline.md).
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # Where checkpoints, metrics.jsonl and config.yaml go; null = Hydra's output directory.
    run_dir: Optional[str] = None
    # Seeds torch's RNG and the weight initialisation (the same weights for every parallel layout).
    seed: int = 0


def register_configs() -> ConfigStore:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    return cs


def as_config(cfg) -> Config:
    """A typed Config from a Config, dict or DictConfig (unknown keys / bad types → ConfigError)."""
    return as_structured(Config, cfg)


def validate_config(cfg: Config, dp_world_size: int = 1) -> Config:
    """Check every group and the cross-group rules; one ConfigError naming the first bad field.

    ``dp_world_size`` is the number of processes (the name predates the parallel engine): the data-parallel
    degree the batch is split over is derived from it and ``parallel.*`` (``parallel.dp_replicate *
    parallel.dp_shard``), so e.g. ``trainer.global_batch_size`` must divide over dp, not over tp ranks.
    """
    cfg.model = validate_model_config(as_model_config(cfg.model))
    cfg.data = validate_data_config(as_data_config(cfg.data))
    dims = resolve_parallel_dims(cfg.parallel, dp_world_size, model_cfg=cfg.model, seq_len=cfg.data.seq_len)
    validate_trainer_config(cfg.trainer, dims.dp)
    micro = cfg.trainer.global_batch_size // (dims.dp * cfg.trainer.micro_batch_size)
    validate_pipeline_config(cfg.pipeline, dims.pp, dims.vpp, cfg.model.num_layers, microbatches=micro)
    if dims.pp > 1:
        check_pipeline_dp(cfg.pipeline, dims.dp)
    validate_optim_config(cfg.optim, cfg.trainer.max_steps)
    validate_checkpoint_config(cfg.checkpoint)
    validate_logging_config(cfg.logging)
    if not isinstance(cfg.seed, int):
        raise ConfigError("seed", f"must be an integer, got {cfg.seed!r}")
    return cfg
