"""Our pre-tokenized format: flat token files, a compact offsets file and a small JSON header per shard,
plus one index per shard set.

Why our own format: training must start in seconds on a corpus of 10^8+ documents and read any sample in
O(1) without loading the corpus into RAM, so nothing per document is ever parsed as Python objects; each
shard is complete on its own (files renamed into place, header last), so an interrupted prepare keeps its
finished shards. File layout, headers and checks: docs/data.md "Shard format". :class:`TokenStore` is the
read interface shared with the Megatron reader (documents streamed in chunks, never one array entry each).
"""

from __future__ import annotations

import json
import os
import tempfile
from array import array
from typing import Iterator, List, Optional, Tuple

import numpy as np

from attnres_train.config.errors import UserInputError

FORMAT, SET_FORMAT = "attnres-tokens", "attnres-token-set"
VERSION = 2
INDEX_NAME = "index.json"
DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens (512 MiB as uint16) per shard
CHUNK_DOCS = 1 << 18  # documents per chunk when streaming offsets (2 MiB of int64)
_REQUIRED = ("format", "version", "dtype", "num_tokens", "num_docs", "vocab_size", "eos_id", "max_token_id")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenStore:
    """Documents of token ids. Document ``i`` is ``read(*doc_span(i))``.

    Subclasses either set the arrays ``doc_lengths`` / ``doc_buffer`` / ``doc_starts`` (one entry per
    document) or override ``num_docs``, ``num_tokens``, ``doc_span`` and ``iter_doc_chunks``.
    """

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

    def doc_span(self, i: int) -> Tuple[int, int, int]:
        return int(self.doc_buffer[i]), int(self.doc_starts[i]), int(self.doc_lengths[i])

    def document(self, i: int) -> np.ndarray:
        return self.read(*self.doc_span(i))

    def iter_doc_chunks(self, chunk: int = CHUNK_DOCS) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(buffer int32 [c], start int64 [c], length int64 [c]) for consecutive documents, in order."""
        for lo in range(0, self.num_docs, chunk):
            hi = min(lo + chunk, self.num_docs)
            yield self.doc_buffer[lo:hi], self.doc_starts[lo:hi], self.doc_lengths[lo:hi]

    def buffer_segments(self) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(buffer, start, length) covering every document when buffers hold nothing else, else None."""
        return None

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
    """Append documents (token id arrays, EOS already appended) and cut them into finished shards on disk.

    ``write_index=False`` leaves the set index to the caller (parallel prepare writes one for all workers).
    """

    def __init__(
        self,
        out_dir: str,
        *,
        tokenizer: str,
        vocab_size: int,
        eos_id: int,
        source: str = "",
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        prefix: str = "shard",
        write_index: bool = True,
    ):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, int(shard_tokens)
        self.meta = {"tokenizer": tokenizer, "vocab_size": int(vocab_size), "eos_id": int(eos_id), "source": source}
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size, self.write_index = int(vocab_size), write_index
        self.finished: List[str] = []  # names of finished shards, in order
        self.num_tokens = self.num_docs = 0
        os.makedirs(out_dir, exist_ok=True)
        self._open = None

    def _start(self):
        name = f"{self.prefix}_{len(self.finished):05d}"
        base = os.path.join(self.out_dir, name)
        self._open = {
            "name": name,
            "base": base,
            "f": open(base + ".bin.tmp", "wb"),
            "offsets": array("q", [0]),
            "max": -1,
        }

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise UserInputError(
                f"tokenizer produced id {hi if hi >= self.vocab_size else lo} outside 0..{self.vocab_size - 1}"
            )
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
        _finish_file(s["f"], s["base"] + ".bin")
        offsets = np.frombuffer(s["offsets"], dtype=np.int64)
        with open(s["base"] + ".idx.tmp", "wb") as f:
            f.write(offsets.astype("<i8").tobytes())
            _finish_file(f, s["base"] + ".idx")
        write_json_atomic(
            s["base"] + ".json",
            {
                "format": FORMAT,
                "version": VERSION,
                "dtype": self.dtype.name,
                "num_tokens": int(offsets[-1]),
                "num_docs": int(offsets.size - 1),
                **self.meta,
                "max_token_id": s["max"],
            },
        )
        self.finished.append(s["name"])

    def close(self) -> List[str]:
        """Finish the last shard and (unless ``write_index=False``) write the set index. Returns shard names."""
        if self._open is not None:
            self._close_shard()
        if self.write_index:
            write_set_index(self.out_dir, self.finished)
        return list(self.finished)


def _finish_file(f, final: str) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(final + ".tmp", final)


def write_set_index(out_dir: str, names: List[str], dest_dir: Optional[str] = None) -> dict:
    """Write ``index.json`` listing the finished shards ``names`` (in stream order) of ``out_dir``."""
    entries, first = [], None
    for n in names:
        h = _read_header(os.path.join(out_dir, n + ".json"))
        first = first or h
        for key in ("tokenizer", "vocab_size", "eos_id"):
            if h.get(key) != first.get(key):
                raise UserInputError(
                    f"{n}.json: {key}={h.get(key)!r} differs from the first shard ({first.get(key)!r})"
                )
        entries.append({"name": n, **{k: h[k] for k in ("dtype", "num_tokens", "num_docs", "max_token_id")}})
    first = first or {}
    index = {
        "format": SET_FORMAT,
        "version": VERSION,
        "tokenizer": first.get("tokenizer"),
        "vocab_size": first.get("vocab_size"),
        "eos_id": first.get("eos_id"),
        "num_tokens": sum(e["num_tokens"] for e in entries),
        "num_docs": sum(e["num_docs"] for e in entries),
        "shards": entries,
    }
    write_json_atomic(os.path.join(dest_dir or out_dir, INDEX_NAME), index)
    return index


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


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserInputError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: {what} is not valid JSON ({e})") from None


def _check_version(path: str, h: dict) -> None:
    if h["version"] != VERSION:
        raise UserInputError(
            f"{path}: shard format version {h['version']} is not supported (expected {VERSION}); "
            "re-run attnres-prepare (or delete the cache directory)"
        )


def _read_header(path: str) -> dict:
    h = _load_json(path, "shard header")
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise UserInputError(f"{path}: not an {FORMAT} shard header (written by attnres-prepare)")
    missing = [k for k in _REQUIRED if k not in h]
    if missing:
        raise UserInputError(f"{path}: shard header lacks {', '.join(missing)}")
    _check_version(path, h)
    if h["dtype"] not in ("uint16", "uint32"):
        raise UserInputError(f"{path}: unsupported dtype {h['dtype']!r}")
    return h


class ShardSet(TokenStore):
    """Read-only view of a shard set (a directory with ``index.json``) or of one shard (``NAME.bin|json``)."""

    def __init__(self, path: str, verify: bool = False):
        self.name = path
        self.dir, index = self._load_index(path)
        self.headers = index["shards"]  # one small dict per shard (name, dtype, num_tokens, num_docs, max_token_id)
        if not self.headers:
            raise UserInputError(f"{path}: the shard set lists no shards")
        self._bases = [os.path.join(self.dir, e["name"]) for e in self.headers]
        self._buffers = [self._open_bin(b, e, verify) for b, e in zip(self._bases, self.headers)]
        self._doc_cum = np.concatenate([[0], np.cumsum([int(e["num_docs"]) for e in self.headers])]).astype(np.int64)
        self._num_tokens = sum(int(e["num_tokens"]) for e in self.headers)
        self.tokenizer, self.vocab_size, self.eos_id = (
            index.get("tokenizer"),
            int(index["vocab_size"]),
            int(index["eos_id"]),
        )
        self._max = max(int(e["max_token_id"]) for e in self.headers)
        self._arrays = None

    @staticmethod
    def _load_index(path: str):
        if os.path.isfile(path):
            if not path.endswith((".bin", ".json")) or os.path.basename(path) == INDEX_NAME:
                raise UserInputError(f"{path}: not a token shard (expected NAME.bin / NAME.json or a directory)")
            base = path.rsplit(".", 1)[0]
            h = _read_header(base + ".json")
            entry = {
                "name": os.path.basename(base),
                **{k: h[k] for k in ("dtype", "num_tokens", "num_docs", "max_token_id")},
            }
            return os.path.dirname(base) or ".", {**h, "shards": [entry]}
        if not os.path.isdir(path):
            raise UserInputError(f"token shard directory {path!r} does not exist")
        ipath = os.path.join(path, INDEX_NAME)
        if not os.path.exists(ipath):
            if any(
                f.endswith(".json") and os.path.exists(os.path.join(path, f[:-5] + ".bin")) for f in os.listdir(path)
            ):
                raise UserInputError(
                    f"{path}: incomplete shard set (shards but no {INDEX_NAME}; an interrupted or old "
                    "attnres-prepare?); re-run attnres-prepare"
                )
            raise UserInputError(
                f"{path}: no token shards (NAME.bin + NAME.json) found; create them with attnres-prepare"
            )
        index = _load_json(ipath, "shard set index")
        if (
            not isinstance(index, dict)
            or index.get("format") != SET_FORMAT
            or not isinstance(index.get("shards"), list)
        ):
            raise UserInputError(f"{ipath}: not an {SET_FORMAT} index (written by attnres-prepare)")
        _check_version(ipath, index)
        return path, index

    @staticmethod
    def _open_bin(base: str, e: dict, verify: bool) -> np.ndarray:
        dtype, n, d = np.dtype(e["dtype"]), int(e["num_tokens"]), int(e["num_docs"])
        for path, want, what in (
            (base + ".bin", n * dtype.itemsize, f"{n} {dtype.name} tokens"),
            (base + ".idx", (d + 1) * 8, f"{d + 1} int64 document offsets"),
        ):
            if not os.path.isfile(path):
                raise UserInputError(f"{path}: shard file is missing (the set index lists it)")
            size = os.path.getsize(path)
            if size != want:
                kind = "truncated" if size < want else "larger than its header says"
                raise UserInputError(
                    f"{path}: shard is {kind}: expected {want} bytes ({what}), found {size}; "
                    "re-run attnres-prepare (or delete the cache directory)"
                )
        arr = np.zeros(0, dtype=dtype) if n == 0 else np.memmap(base + ".bin", dtype=dtype, mode="r", shape=(n,))
        if verify:
            off = np.fromfile(base + ".idx", dtype="<i8")
            if off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
                raise UserInputError(f"{base}.idx: document offsets are not 0..{n} increasing (corrupt shard)")
            real = int(arr.max()) if n else -1
            if real != int(e["max_token_id"]):
                raise UserInputError(
                    f"{base}.bin: max token id is {real} but the header says {e['max_token_id']} (corrupt shard)"
                )
        return arr

    def _offsets(self, b: int, lo: int, hi: int) -> np.ndarray:
        """Offsets ``lo..hi-1`` of shard ``b`` (read from disk, not mapped: scanning them keeps RSS flat)."""
        return np.fromfile(self._bases[b] + ".idx", dtype="<i8", count=hi - lo, offset=lo * 8).astype(np.int64)

    @property
    def num_docs(self) -> int:
        return int(self._doc_cum[-1])

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def doc_span(self, i: int) -> Tuple[int, int, int]:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} outside 0..{self.num_docs - 1}")
        b = int(np.searchsorted(self._doc_cum, i, side="right")) - 1
        a, z = self._offsets(b, i - int(self._doc_cum[b]), i - int(self._doc_cum[b]) + 2)
        return b, int(a), int(z - a)

    def iter_doc_chunks(self, chunk: int = CHUNK_DOCS):
        for b, e in enumerate(self.headers):
            d = int(e["num_docs"])
            for lo in range(0, d, chunk):
                off = self._offsets(b, lo, min(lo + chunk, d) + 1)
                yield np.full(off.size - 1, b, dtype=np.int32), off[:-1], np.diff(off)

    def buffer_segments(self):
        n = np.array([int(e["num_tokens"]) for e in self.headers], dtype=np.int64)
        return np.arange(n.size, dtype=np.int64), np.zeros(n.size, dtype=np.int64), n

    def _materialise(self):  # one entry per document: only for small stores and tests
        if self._arrays is None:
            parts = list(zip(*self.iter_doc_chunks())) or ([], [], [])
            self._arrays = tuple(
                np.concatenate(p) if len(p) else np.zeros(0, t) for p, t in zip(parts, (np.int32, np.int64, np.int64))
            )
        return self._arrays

    doc_buffer = property(lambda self: self._materialise()[0])
    doc_starts = property(lambda self: self._materialise()[1])
    doc_lengths = property(lambda self: self._materialise()[2])

    def read(self, buffer: int, start: int, length: int) -> np.ndarray:
        return self._buffers[buffer][start : start + length]

    def max_token_id(self) -> int:
        return self._max
