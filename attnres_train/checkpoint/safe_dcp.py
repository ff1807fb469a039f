"""``torch.distributed.checkpoint`` save/load with no arbitrary unpickling, in one process or a process group.

Why: DCP unpickles the non-tensor leaves of a state dict (``weights_only=False``) and ``.metadata`` (plain
``pickle``), so a crafted checkpoint could execute code. :class:`SafeLoadPlanner` loads the byte blobs with
``weights_only=True`` and :class:`SafeFileSystemReader` unpickles only DCP's own metadata classes; anything
else is a :class:`UserInputError`. What DCP pickles and the single-process warning we silence:
docs/training.md "Checkpoints" ("What DCP unpickles").
"""

from __future__ import annotations

import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta

from ..config.errors import UserInputError

_ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any of DCP's metadata dataclasses / enums
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


def distributed() -> bool:
    """True when a default process group is initialised (DCP then runs its collectives)."""
    return dist.is_available() and dist.is_initialized()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get(module, ())
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` is read with an allow-listed unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise UserInputError(f"checkpoint metadata {path} cannot be read safely: {exc}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that loads non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserInputError(
                f"checkpoint value {read_item.dest_index.fqn!r} is not plain data: {str(exc).splitlines()[0]}"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextmanager
def _quiet_single_process():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def dcp_save(state_dict: dict, path: Path) -> None:
    """Write ``state_dict`` (nested dict of tensors / DTensors / plain values) as a DCP checkpoint at ``path``."""
    with _quiet_single_process():
        dcp.save(state_dict, storage_writer=FileSystemWriter(str(path)), no_dist=not distributed())


def dcp_async_save(state_dict: dict, path: Path, process_group=None):
    """Start writing ``state_dict`` at ``path`` in a background thread; returns a ``Future``.

    The state is first copied to CPU memory (blocking: DCP's ``FileSystemWriter`` is a
    ``BlockingAsyncStager``), so the caller may change parameters and optimizer state as soon as this returns.
    ``process_group``: the group DCP's own collectives run on from the background thread; give it a group of
    its own (gloo) so they never interleave with the training collectives of the main thread.
    """
    if not distributed():  # the save runs in another thread, outside any catch_warnings block
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    with _quiet_single_process():
        return dcp.async_save(
            state_dict,
            storage_writer=FileSystemWriter(str(path)),
            process_group=process_group,
            no_dist=not distributed(),
        )


def dcp_load(state_dict: dict, path: Path) -> None:
    """Load ``path`` into ``state_dict`` in place (resharding to the tensors' current layout)."""
    with _quiet_single_process():
        dcp.load(
            state_dict,
            storage_reader=SafeFileSystemReader(str(path)),
            planner=SafeLoadPlanner(),
            no_dist=not distributed(),
        )
