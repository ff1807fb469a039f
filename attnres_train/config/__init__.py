"""Typed (dataclass) config schemas, validation with field-named errors, and Hydra ConfigStore registration."""

from .errors import ConfigError, UserInputError
from .model import ModelConfig, as_model_config, validate_model_config

__all__ = ["ConfigError", "ModelConfig", "UserInputError", "as_model_config", "validate_model_config"]
