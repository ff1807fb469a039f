"""File-level Hugging Face I/O: locate a checkpoint (local directory or hub id), read its config and
(sharded) safetensors or weights-only torch bins, write sharded safetensors, and swap a finished directory
into place. A format module of interop/ (docs/hf_interop.md "Code layers"); no model knowledge here.
huggingface_hub is imported only for a Hub download (a transformers dependency, slow to import).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config.errors import UserInputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_hf_path(path: os.PathLike | str) -> Path:
    """A local directory for ``path``: the directory itself, or a Hub snapshot for a ``org/name`` repo id."""
    s = os.fspath(path)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise UserInputError(f"{s}: expected a directory holding config.json and *.safetensors, found a file")
    if _HUB_ID.match(s) and not s.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as exc:  # offline, unknown repo, auth...
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserInputError(
                f"{s}: no such local directory, and downloading it from the Hub failed: {reason}"
            ) from None
    raise UserInputError(f"{s}: no such directory (expected a Hugging Face model directory or a Hub repo id)")


def read_hf_config(directory: Path) -> Dict[str, Any]:
    cfg_file = Path(directory) / "config.json"
    if not cfg_file.is_file():
        raise UserInputError(f"{cfg_file}: missing config.json (not a Hugging Face model directory?)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{cfg_file}: cannot read JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"{cfg_file}: expected a JSON object")
    return raw


def read_safetensors_dir(directory: Path, lazy: bool = False) -> Mapping[str, torch.Tensor]:
    """All tensors of a HF model directory (sharded or not); ``pytorch_model*.bin`` only via weights_only.

    ``lazy``: a :class:`LazySafetensors` mapping that reads each tensor from its file when it is looked up (and
    keeps nothing), so a caller that converts and drops one part at a time never holds the whole model.
    ``.bin`` checkpoints cannot be read lazily and are loaded whole either way.
    """
    directory = Path(directory)
    files = _safetensors_files(directory)
    if not files:
        return _read_torch_bins(directory)
    if lazy:
        return LazySafetensors([directory / name for name in files])
    sd: Dict[str, torch.Tensor] = {}
    for name in files:
        f = directory / name
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserInputError(f"{f}: cannot read safetensors file: {exc}") from None
    return sd


class LazySafetensors(Mapping):
    """``name -> tensor`` over safetensors files, each tensor read from disk on lookup (nothing cached)."""

    def __init__(self, files: List[Path]):
        self._where: Dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self._where[k] = f
            except (SafetensorError, OSError, ValueError) as exc:
                raise UserInputError(f"{f}: cannot read safetensors file: {exc}") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self._where[key]
        with safe_open(str(f), framework="pt") as h:
            return h.get_tensor(key)

    def __contains__(self, key) -> bool:
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _safetensors_files(directory: Path) -> List[str]:
    """The safetensors files of ``directory`` (from the index if there is one; each checked to exist)."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserInputError(f"{index}: not a valid safetensors index: {exc}") from None
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(f.name for f in directory.glob("*.safetensors"))
    for name in files:
        if not (directory / name).is_file():
            raise UserInputError(f"{directory / name}: weight file listed in {SAFETENSORS_INDEX} is missing")
    return files


def _read_torch_bins(directory: Path) -> Dict[str, torch.Tensor]:
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise UserInputError(f"{directory}: no weights found (expected model.safetensors or sharded *.safetensors)")
    sd: Dict[str, torch.Tensor] = {}
    for f in bins:
        try:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as exc:  # pickles with arbitrary objects are refused by weights_only
            raise UserInputError(f"{f}: cannot read with torch.load(weights_only=True): {exc}") from None
    return sd


class ShardWriter:
    """Streams tensors into HF-style safetensors shards, holding at most one shard in memory.

    ``add`` buffers tensors (copied to CPU, optionally cast: every floating tensor but the MoE router's
    ``e_score_correction_bias``, which stays fp32) and writes a shard whenever the next tensor would exceed
    ``max_shard_bytes``; ``finish`` names the shards ``model-0000i-of-0000N.safetensors`` (or
    ``model.safetensors`` for one) and writes the index. Used to consolidate checkpoints larger than host memory
    one decoder layer at a time.
    """

    def __init__(
        self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: "torch.dtype | None" = None
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in list(self.directory.glob("model*.safetensors")) + [self.directory / SAFETENSORS_INDEX]:
            if stale.is_file():
                stale.unlink()
        self.max_shard_bytes, self.dtype = max_shard_bytes, dtype
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []
        self.total = 0
        self.dtypes: set = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in keys for keys in self.shards):
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().to("cpu")
        if self.dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(self.dtype)
        t = t.contiguous().clone()  # own storage: safetensors refuses tensors that share memory
        if t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            self.dtypes.add(t.dtype)
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        save_file(self.pending, str(self.directory / f".shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> List[str]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.directory / ".shard-00000.tmp", self.directory / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / f".shard-{i:05d}.tmp", self.directory / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        (self.directory / SAFETENSORS_INDEX).write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2, sort_keys=True)
        )
        return names + [SAFETENSORS_INDEX]


def replace_directory(staging: Path, dst: Path) -> None:
    """Move a fully written ``staging`` directory to ``dst``, replacing ``dst`` (only after success)."""
    staging, dst = Path(staging), Path(dst)
    if dst.exists():
        backup = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, backup)
        os.replace(staging, dst)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, dst)
