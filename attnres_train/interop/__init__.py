"""Interoperability with Hugging Face transformers: native ``KimiLinear`` checkpoints, the ``trust_remote_code``
AttnRes format, consolidation of training checkpoints of any parallel layout, and import as a training run.

Importing this package does not import transformers; it is imported lazily where a transformers object is
really needed (building a ``KimiLinearConfig``, writing ``config.json``). Guide: docs/hf_interop.md.
"""

from .export import export_checkpoint, write_hf
from .hf import (
    config_from_hf,
    config_to_hf,
    load_from_hf,
    save_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from .init_run import init_run_from_hf

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "export_checkpoint",
    "init_run_from_hf",
    "load_from_hf",
    "save_to_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "write_hf",
]
