"""Interoperability with Hugging Face transformers: native ``KimiLinear`` checkpoints, the ``trust_remote_code``
AttnRes format and consolidation of training checkpoints of any parallel layout.

Layered bottom-up: tensor mapping (``hf_mapping``) -> formats (``hf_config``, ``hf_remote``, ``hf_files``,
``hf_card``) -> file API (``export``, ``hf``). Importing this package does not import transformers (seconds);
it is imported where a transformers object is needed. Guide: docs/hf_interop.md. The import of a checkpoint as
a training run is a CLI action: :mod:`attnres_train.cli.init_run`.
"""

from .export import export_checkpoint, write_hf
from .hf import load_from_hf, save_to_hf
from .hf_config import config_from_hf, config_to_hf
from .hf_mapping import state_dict_from_hf, state_dict_to_hf

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "export_checkpoint",
    "load_from_hf",
    "save_to_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "write_hf",
]
