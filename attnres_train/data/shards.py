"""Our pre-tokenized format: flat token memmaps plus a small JSON header per shard.

Why our own format: training must start instantly on the second run and read any sample in O(1) without
loading the corpus into RAM. A shard is ``NAME.bin`` (the token ids of its documents back to back, each
document already followed by its EOS, as little-endian uint16 when the vocab fits, else uint32) and
``NAME.json``::

    {"format": "attnres-tokens", "version": 1, "dtype": "uint16", "num_tokens": N, "num_docs": D,
     "doc_offsets": [0, ..., N], "tokenizer": "byte", "vocab_size": 258, "eos_id": 256,
     "max_token_id": 255, "shard_index": 0, "num_shards": 2, "source": "..."}

Both files are written under temporary names and renamed into place (``.bin`` first, header last), so a
header never describes a partial ``.bin``. The reader still checks sizes (a copied/truncated ``.bin`` is
reported naming the file), that every shard of the set is present, and, given a model vocab size, that no
token id is out of range.

:class:`TokenStore` is the read interface shared with the Megatron reader: documents as (buffer, start,
length) triples, so the packer can stream across them without caring where they live.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import List, Optional

import numpy as np

from attnres_train.config.errors import UserInputError

FORMAT = "attnres-tokens"
VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens (512 MiB as uint16) per shard
_REQUIRED = ("format", "version", "dtype", "num_tokens", "num_docs", "doc_offsets", "vocab_size", "eos_id",
             "max_token_id", "shard_index", "num_shards")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenStore:
    """Documents of token ids. Document ``i`` is ``read(doc_buffer[i], doc_starts[i], doc_lengths[i])``."""

    name: str
    doc_lengths: np.ndarray  # int64 [D]
    doc_buffer: np.ndarray  # int32 [D]: which buffer holds the document
    doc_starts: np.ndarray  # int64 [D]: token offset of the document in its buffer
    eos_id: Optional[int] = None
    tokenizer: Optional[str] = None
    vocab_size: Optional[int] = None

    @property
    def num_docs(self) -> int:
        return int(self.doc_lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def read(self, buffer: int, start: int, length: int) -> np.ndarray:
        raise NotImplementedError

    def document(self, i: int) -> np.ndarray:
        return self.read(int(self.doc_buffer[i]), int(self.doc_starts[i]), int(self.doc_lengths[i]))

    def max_token_id(self) -> int:
        raise NotImplementedError

    def check_vocab(self, model_vocab_size: Optional[int]) -> None:
        """Raise UserInputError if any token id is >= the model's vocab size."""
        if model_vocab_size is None:
            return
        m = self.max_token_id()
        if m >= model_vocab_size:
            by = f" (tokenized with {self.tokenizer!r}, vocab {self.vocab_size})" if self.tokenizer else ""
            raise UserInputError(
                f"{self.name}: contains token id {m} >= model vocab size {model_vocab_size}{by}; "
                "raise model.vocab_size or re-tokenize with a smaller tokenizer"
            )


class ShardWriter:
    """Append documents (token id arrays, EOS already appended) and cut them into shards on disk."""

    def __init__(self, out_dir: str, *, tokenizer: str, vocab_size: int, eos_id: int, source: str = "",
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, prefix: str = "shard"):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, int(shard_tokens)
        self.meta = {"tokenizer": tokenizer, "vocab_size": int(vocab_size), "eos_id": int(eos_id), "source": source}
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size = int(vocab_size)
        self.finished: List[dict] = []  # headers of closed shards (num_shards filled in at close)
        self.num_tokens = self.num_docs = 0
        os.makedirs(out_dir, exist_ok=True)
        self._open = None

    def _start(self):
        idx = len(self.finished)
        base = os.path.join(self.out_dir, f"{self.prefix}_{idx:05d}")
        self._open = {"base": base, "f": open(base + ".bin.tmp", "wb"), "offsets": [0], "max": -1}

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise UserInputError(f"tokenizer produced id {hi if hi >= self.vocab_size else lo} outside 0..{self.vocab_size - 1}")
        if self._open is None:
            self._start()
        s = self._open
        s["f"].write(ids.astype(self.dtype, copy=False).tobytes())
        s["offsets"].append(s["offsets"][-1] + int(ids.size))
        s["max"] = max(s["max"], hi)
        self.num_tokens += int(ids.size)
        self.num_docs += 1
        if s["offsets"][-1] >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self):
        s, self._open = self._open, None
        s["f"].flush()
        os.fsync(s["f"].fileno())
        s["f"].close()
        os.replace(s["base"] + ".bin.tmp", s["base"] + ".bin")
        offsets = s["offsets"]
        self.finished.append({
            "format": FORMAT, "version": VERSION, "dtype": self.dtype.name, "num_tokens": offsets[-1],
            "num_docs": len(offsets) - 1, "doc_offsets": offsets, **self.meta, "max_token_id": s["max"],
            "shard_index": len(self.finished), "base": s["base"],
        })

    def close(self) -> List[str]:
        """Finish the last shard and write all headers. Returns the header paths."""
        if self._open is not None:
            self._close_shard()
        paths = []
        for h in self.finished:
            base = h.pop("base")
            h["num_shards"] = len(self.finished)
            write_json_atomic(base + ".json", h)
            paths.append(base + ".json")
        return paths


def make_staging_dir(parent: str, prefix: str) -> str:
    """A fresh hidden directory in ``parent`` with umask-based permissions (mkdtemp alone gives 0700, which
    would make renamed caches/shards unreadable to other users of a shared filesystem)."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)
    return path


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_header(path: str) -> dict:
    try:
        with open(path) as f:
            h = json.load(f)
    except FileNotFoundError:
        raise UserInputError(f"{path}: shard header not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: shard header is not valid JSON ({e})") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise UserInputError(f"{path}: not an {FORMAT} shard header (written by attnres-prepare)")
    missing = [k for k in _REQUIRED if k not in h]
    if missing:
        raise UserInputError(f"{path}: shard header lacks {', '.join(missing)}")
    if h["version"] != VERSION:
        raise UserInputError(f"{path}: shard format version {h['version']} is not supported (expected {VERSION})")
    if h["dtype"] not in ("uint16", "uint32"):
        raise UserInputError(f"{path}: unsupported dtype {h['dtype']!r}")
    return h


class ShardSet(TokenStore):
    """Read-only view of shards: a directory holding a complete set, or an explicit list of headers."""

    def __init__(self, path_or_headers, verify: bool = False):
        if isinstance(path_or_headers, str):
            self.name = path_or_headers
            headers = self._find_headers(path_or_headers)
        else:
            headers = list(path_or_headers)
            self.name = headers[0] if headers else "<no shards>"
        self.headers = [(_p, _read_header(_p)) for _p in headers]
        self._buffers, lengths, buf_ids, starts = [], [], [], []
        first = self.headers[0][1]
        for b, (hp, h) in enumerate(self.headers):
            for key in ("tokenizer", "vocab_size", "eos_id"):
                if h.get(key) != first.get(key):
                    raise UserInputError(f"{hp}: {key}={h.get(key)!r} differs from {self.headers[0][0]} ({first.get(key)!r})")
            self._buffers.append(self._open_bin(hp, h, verify))
            off = np.asarray(h["doc_offsets"], dtype=np.int64)
            lengths.append(np.diff(off))
            starts.append(off[:-1])
            buf_ids.append(np.full(len(off) - 1, b, dtype=np.int32))
        self.doc_lengths = np.concatenate(lengths)
        self.doc_starts = np.concatenate(starts)
        self.doc_buffer = np.concatenate(buf_ids)
        self.tokenizer, self.vocab_size, self.eos_id = first.get("tokenizer"), int(first["vocab_size"]), int(first["eos_id"])
        self._max = max(int(h["max_token_id"]) for _, h in self.headers)

    @staticmethod
    def _find_headers(path: str) -> List[str]:
        if os.path.isfile(path):
            if not path.endswith((".bin", ".json")):
                raise UserInputError(f"{path}: not a token shard (expected NAME.bin / NAME.json or a directory)")
            return [path.rsplit(".", 1)[0] + ".json"]
        if not os.path.isdir(path):
            raise UserInputError(f"token shard directory {path!r} does not exist")
        heads = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".json") and os.path.exists(os.path.join(path, f[:-5] + ".bin")))
        if not heads:
            raise UserInputError(f"{path}: no token shards (NAME.bin + NAME.json) found; create them with attnres-prepare")
        hs = {p: _read_header(p) for p in heads}
        n = {h["num_shards"] for h in hs.values()}
        idx = sorted(h["shard_index"] for h in hs.values())
        if len(n) != 1 or idx != list(range(n.pop())):
            raise UserInputError(
                f"{path}: incomplete shard set (found shard indices {idx[:8]}{'...' if len(idx) > 8 else ''}, "
                f"headers say {sorted({h['num_shards'] for h in hs.values()})} shards); re-run attnres-prepare"
            )
        return sorted(heads, key=lambda p: hs[p]["shard_index"])

    @staticmethod
    def _open_bin(header_path: str, h: dict, verify: bool) -> np.ndarray:
        bin_path = header_path[:-5] + ".bin"
        dtype = np.dtype(h["dtype"])
        n, offs = int(h["num_tokens"]), h["doc_offsets"]
        if len(offs) != int(h["num_docs"]) + 1 or offs[0] != 0 or offs[-1] != n:
            raise UserInputError(f"{header_path}: doc_offsets do not match num_docs/num_tokens (corrupt header)")
        if not os.path.isfile(bin_path):
            raise UserInputError(f"{bin_path}: shard data file is missing (header {header_path} exists)")
        size, want = os.path.getsize(bin_path), n * dtype.itemsize
        if size != want:
            what = "truncated" if size < want else "larger than its header says"
            raise UserInputError(
                f"{bin_path}: shard is {what}: expected {want} bytes ({n} {dtype.name} tokens), found {size}; "
                "re-run attnres-prepare (or delete the cache directory)"
            )
        if n == 0:
            return np.zeros(0, dtype=dtype)
        arr = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))
        if verify:
            if np.any(np.diff(np.asarray(offs)) < 0):
                raise UserInputError(f"{header_path}: doc_offsets are not increasing (corrupt header)")
            real = int(arr.max())
            if real != int(h["max_token_id"]):
                raise UserInputError(f"{bin_path}: max token id is {real} but the header says {h['max_token_id']} (corrupt shard)")
        return arr

    def read(self, buffer: int, start: int, length: int) -> np.ndarray:
        return self._buffers[buffer][start : start + length]

    def max_token_id(self) -> int:
        return self._max
