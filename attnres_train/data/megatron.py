"""Read Megatron-LM ``.bin/.idx`` indexed datasets through megatron-core (the optional ``megatron`` extra).

Why: many teams already have corpora tokenized by Megatron's ``tools/preprocess_data.py``; re-tokenizing
terabytes to switch frameworks is not an option. We let megatron-core's own ``IndexedDataset`` parse the
index (so format versions and dtypes are whatever Megatron says) and expose its sequences as a
:class:`~attnres_train.data.shards.TokenStore`, one document per sequence, used as-is: Megatron data is
expected to carry its end-of-document token already (``preprocess_data.py --append-eod``), so no EOS is
added. megatron-core is imported lazily and only for ``kind: megatron``; it is slow to import (seconds)
and pulls in its own stack, which the rest of the data layer must not depend on.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import numpy as np

from attnres_train.config.errors import UserInputError

from .shards import TokenStore, write_json_atomic

RANGE_SUFFIX = ".attnres-range.json"  # the cached (min, max) token id of a Megatron dataset

INSTALL_HINT = "pip install 'attnres-train[megatron]'  (or: pip install megatron-core)"


def import_indexed_dataset():
    """megatron-core's IndexedDataset class, or a UserInputError telling the user how to get it."""
    try:
        with warnings.catch_warnings():
            # megatron-core warns at import when Transformer Engine / Apex are absent; irrelevant for reading.
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError as e:
        raise UserInputError(
            f"reading Megatron .bin/.idx data needs megatron-core, which is not importable ({e}): {INSTALL_HINT}"
        ) from None
    except Exception as e:  # a broken install fails in arbitrary ways at import time
        raise UserInputError(
            f"megatron-core failed to import ({type(e).__name__}: {e}); reinstall it: {INSTALL_HINT}"
        ) from None
    return IndexedDataset


def megatron_available() -> bool:
    try:
        import_indexed_dataset()
        return True
    except UserInputError:
        return False


class MegatronStore(TokenStore):
    """One Megatron indexed dataset (``prefix.bin`` + ``prefix.idx``); each sequence is a document."""

    def __init__(
        self,
        prefix: str,
        *,
        eos_id: Optional[int] = None,
        tokenizer: Optional[str] = None,
        vocab_size: Optional[int] = None,
    ):
        if prefix.endswith((".bin", ".idx")):
            prefix = prefix[:-4]
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise UserInputError(f"{p}: Megatron dataset file not found (need both {prefix}.bin and {prefix}.idx)")
        IndexedDataset = import_indexed_dataset()
        # megatron-core's __del__ deletes bin_reader and index: after a failed __init__ it would raise and print
        # "Exception ignored ... Traceback" under our one error line, so both exist (None) before __init__ runs
        self.ds = IndexedDataset.__new__(IndexedDataset)
        self.ds.bin_reader = self.ds.index = None
        try:
            self.ds.__init__(prefix, mmap=True)
        except Exception as e:  # megatron-core signals a bad index with assert / struct / value errors
            raise UserInputError(f"{idx_path}: not a readable Megatron index ({type(e).__name__}: {e})") from None
        index = self.ds.index
        self.name = prefix
        self.dtype = np.dtype(index.dtype)
        self.itemsize = self.dtype.itemsize
        self.doc_lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
        pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
        if self.doc_lengths.size == 0:
            raise UserInputError(f"{idx_path}: Megatron dataset contains no sequences")
        if np.any(pointers % self.itemsize):
            raise UserInputError(f"{idx_path}: sequence pointers are not aligned to {self.dtype.name} (corrupt index)")
        need = int(pointers[-1] + self.doc_lengths[-1] * self.itemsize)
        size = os.path.getsize(bin_path)
        if size < need:
            raise UserInputError(
                f"{bin_path}: truncated Megatron data file: the index needs {need} bytes, the file has {size}"
            )
        self.doc_starts = pointers // self.itemsize
        self.doc_buffer = np.zeros(self.doc_lengths.shape[0], dtype=np.int32)
        self.eos_id, self.tokenizer, self.vocab_size = eos_id, tokenizer, vocab_size
        self._range: Optional[tuple] = None

    def read(self, buffer: int, start: int, length: int) -> np.ndarray:
        return self.ds.bin_reader.read(dtype=self.ds.index.dtype, count=int(length), offset=int(start) * self.itemsize)

    def token_range(self, chunk: int = 1 << 24) -> tuple:
        """(min, max) token id over the whole ``.bin``: one sequential pass, then cached in memory and in
        ``PREFIX.attnres-range.json`` next to the data (keyed by the sizes and mtimes of ``.bin``/``.idx``),
        so later starts on any rank read one small file instead of the corpus. If that directory is not
        writable the pass is repeated at each start."""
        if self._range is None:
            self._range = self._cached_range()
        if self._range is None:
            lo, hi = None, None
            total = int(self.doc_starts[-1] + self.doc_lengths[-1])
            for s in range(0, total, chunk):
                a = self.read(0, s, min(chunk, total - s))
                if a.size:
                    lo = int(a.min()) if lo is None else min(lo, int(a.min()))
                    hi = int(a.max()) if hi is None else max(hi, int(a.max()))
            self._range = (lo or 0, hi if hi is not None else -1)
            try:
                write_json_atomic(
                    self.name + RANGE_SUFFIX, {**self._stamp(), "min": self._range[0], "max": self._range[1]}
                )
            except OSError:
                pass  # read-only data directory: correct, only slower (documented)
        return self._range

    def _stamp(self) -> dict:
        out = {}
        for ext in (".bin", ".idx"):
            st = os.stat(self.name + ext)
            out[ext[1:]] = [st.st_size, st.st_mtime_ns]
        return out

    def _cached_range(self) -> Optional[tuple]:
        try:
            with open(self.name + RANGE_SUFFIX) as f:
                c = json.load(f)
            if {k: c.get(k) for k in ("bin", "idx")} == self._stamp():
                return int(c["min"]), int(c["max"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def max_token_id(self) -> int:
        lo, hi = self.token_range()
        if lo < 0:
            raise UserInputError(f"{self.name}.bin: contains negative token id {lo}")
        return hi
