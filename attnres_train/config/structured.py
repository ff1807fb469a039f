"""Turn a dataclass, dict or OmegaConf node into a typed config object, with field-named errors.

Shared by every config group (model, data, the root config) so that an unknown key or a wrong type anywhere
reports the same way: one ConfigError whose field is the dotted path (``model.moe.top_k``). Keys added with
Hydra's ``+key=value`` reach us as extra attributes of the dataclass (OmegaConf keeps them); they are refused
here too, since no code reads them and a silently ignored setting is worse than an error.
"""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError


def as_structured(schema: type, cfg, prefix: str = ""):
    """Return ``cfg`` as an instance of the dataclass ``schema`` (merged over its defaults)."""
    if isinstance(cfg, schema):
        obj = cfg
    else:
        try:
            obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
        except OmegaConfBaseException as exc:  # unknown key / bad type
            key = str(getattr(exc, "full_key", None) or "")
            field = ".".join(p for p in (prefix, key) if p) or "config"
            owner = getattr(exc, "object_type", None)
            if type(exc).__name__ == "ConfigKeyError" and dataclasses.is_dataclass(owner):
                raise ConfigError(field, unknown_key_message(owner, field)) from None
            raise ConfigError(field, str(exc).splitlines()[0]) from None
    for path, owner, _key in _extra_keys(obj, prefix):
        raise ConfigError(path, unknown_key_message(type(owner), path))
    return obj


def unknown_key_message(schema: type, field: str) -> str:
    """Why the dotted ``field`` is refused and what its parent (dataclass ``schema``) accepts instead."""
    parent, _, key = field.rpartition(".")
    names = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    where = f"{parent!r}" if parent else "the top level of the config"
    return (
        f"unknown key {key!r}: {where} has no such field ({hint}its fields: {', '.join(names)}; "
        f"`attnres-train --cfg job` prints the whole config)"
    )


def _extra_keys(obj, path: str):
    """(dotted path, owning dataclass instance, key) for every attribute that is not a declared field."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = {f.name for f in dataclasses.fields(obj)}
        for key in vars(obj):
            if key not in names and not key.startswith("_"):
                yield ".".join(p for p in (path, key) if p), obj, key
        for name in names:
            yield from _extra_keys(getattr(obj, name), ".".join(p for p in (path, name) if p))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _extra_keys(item, f"{path}.{i}")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _extra_keys(item, f"{path}.{key}")
