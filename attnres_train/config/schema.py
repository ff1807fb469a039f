"""Top-level Hydra schema: the root config dataclass and its ConfigStore registration.

``configs/config.yaml`` starts its defaults list with ``base_config`` (registered here), so every YAML
preset and command-line override is type-checked against these dataclasses before our own validation runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from .model import ModelConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0


def register_configs() -> ConfigStore:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    return cs
