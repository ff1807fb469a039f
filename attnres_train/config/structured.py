"""Turn a dataclass, dict or OmegaConf node into a typed config object, with field-named errors.

Shared by every config group (model, data, the root config) so that an unknown key or a wrong type anywhere
reports the same way: one ConfigError whose field is the dotted path (``model.moe.top_k``).
"""

from __future__ import annotations

from .errors import ConfigError


def as_structured(schema: type, cfg, prefix: str = ""):
    """Return ``cfg`` as an instance of the dataclass ``schema`` (merged over its defaults)."""
    if isinstance(cfg, schema):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except OmegaConfBaseException as exc:  # unknown key / bad type
        key = str(getattr(exc, "full_key", None) or "")
        field = ".".join(p for p in (prefix, key) if p) or "config"
        raise ConfigError(field, str(exc).splitlines()[0]) from None
