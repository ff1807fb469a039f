"""Interoperability with other ecosystems (currently Hugging Face transformers' native ``KimiLinear``).

Importing this package does not import transformers; :mod:`attnres_train.interop.hf` imports it lazily where a
transformers object is really needed (building a ``KimiLinearConfig``, writing ``config.json``).
"""

from .hf import (
    config_from_hf,
    config_to_hf,
    load_from_hf,
    save_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "load_from_hf",
    "save_to_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
