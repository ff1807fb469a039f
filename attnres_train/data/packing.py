"""Documents → one token stream per source → fixed-length samples, and the weighted blend across sources.

Why these rules: all deterministic, O(1) per sample, independent of the number of workers/ranks, so resume
and any layout see the same samples. The EOS, sample, split, blend, epoch and salt rules are written out in
docs/data.md "From documents to samples". Everything that touches every document (the split) streams the
document offsets in chunks: start-up holds O(shards + held-out documents), never one entry per document.
"""

from __future__ import annotations

import hashlib
import threading
import zlib
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from attnres_train.config.errors import UserInputError

from .shards import CHUNK_DOCS, DEFAULT_SHARD_TOKENS, ShardWriter, TokenStore
from .shuffle import FeistelPermutation
from .tokenizer import Tokenizer

BLEND_PERIOD = 4096


def stable_salt(name: str) -> int:
    """A per-source integer that does not depend on Python's randomized str hash."""
    return zlib.crc32(name.encode("utf-8"))


def content_salt(store: TokenStore, probe: int = 4096, samples: int = 64) -> int:
    """A salt from what a store holds, in O(1) reads: its document and token counts, the first and last
    ``probe`` tokens, and the lengths of ``samples`` evenly spaced documents. The same corpus anywhere on
    disk gets the same salt; two sources that agree on all of this need distinct ``name``s to differ."""
    h = hashlib.sha256(f"{store.num_docs},{store.num_tokens}".encode())
    n = store.num_docs
    if n:
        for i in (0, n - 1):
            b, st, ln = store.doc_span(i)
            take = min(ln, probe)
            h.update(np.asarray(store.read(b, st if i == 0 else st + ln - take, take), dtype=np.int64).tobytes())
        picks = np.unique(np.linspace(0, n - 1, min(n, samples)).astype(np.int64))
        h.update(np.array([store.doc_span(int(i))[2] for i in picks], dtype=np.int64).tobytes())
    return int.from_bytes(h.digest()[:4], "little")


def tokenize_to_shards(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str,
    *,
    source: str = "",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress=None,
    batch_chars: int = 1 << 20,
    prefix: str = "shard",
    write_index: bool = True,
) -> ShardWriter:
    """Tokenize ``docs`` in batches, append EOS to each, write shards into ``out_dir``. Returns the writer."""
    writer = ShardWriter(
        out_dir,
        tokenizer=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        source=source,
        shard_tokens=shard_tokens,
        prefix=prefix,
        write_index=write_index,
    )
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    batch: List[str] = []
    size = 0

    def flush():
        for ids in tokenizer.encode_batch(batch):
            writer.add(np.concatenate([ids.astype(np.int64, copy=False), eos]))
        if progress is not None:
            progress.update(len(batch))
            progress.set_postfix(tokens=f"{writer.num_tokens:,}", refresh=False)
        batch.clear()

    for text in docs:
        batch.append(text)
        size += len(text)
        if size >= batch_chars or len(batch) >= 4096:
            flush()
            size = 0
    if batch:
        flush()
    writer.close()
    return writer


def split_documents(
    num_docs: int,
    val_fraction: float,
    seed: int,
    salt: int = 0,
    doc_lengths: Optional[np.ndarray] = None,
    min_val_tokens: int = 0,
):
    """(train_doc_ids, val_doc_ids), both sorted. See the split rule in the module docstring.

    Small corpora: if the drawn documents hold fewer than ``min_val_tokens`` tokens (e.g. one sample), more
    documents are moved to validation in order of their draw (smallest ``u`` first), never more than half.
    """
    if val_fraction <= 0 or num_docs < 2:
        return np.arange(num_docs, dtype=np.int64), np.zeros(0, dtype=np.int64)
    u = np.random.default_rng([seed, salt, 0x5EED]).random(num_docs)
    is_val = u < val_fraction
    if not is_val.any():
        is_val[int(np.argmin(u))] = True  # tiny corpora still get one validation document
    if doc_lengths is not None and min_val_tokens > 0:
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        short = min_val_tokens - int(lengths[is_val].sum())
        if short > 0:
            order = np.argsort(u, kind="stable")
            cand = order[~is_val[order]][: max(0, num_docs // 2 - int(is_val.sum()))]
            n_add = int(np.searchsorted(np.cumsum(lengths[cand]), short)) + 1
            is_val[cand[:n_add]] = True
    if is_val.all():
        is_val[int(np.argmax(u))] = False
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def _val_draws(seed: int, salt: int):
    return np.random.default_rng([seed, salt, 0x5EED])  # chunks of .random() continue one stream


def split_streams(
    store: TokenStore, val_fraction: float, seed: int, salt: int = 0, min_val_tokens: int = 0, chunk: int = CHUNK_DOCS
) -> Tuple["PackedStream", "PackedStream"]:
    """(train, val) streams of ``store`` under the split rule, as :func:`split_documents` would choose them,
    built by streaming the document offsets in chunks: memory O(shards + held-out documents), not O(D).
    The rare top-up case (held-out documents too short for one sample) falls back to the exact array path."""
    n = store.num_docs
    if val_fraction <= 0 or n < 2:
        return PackedStream(store, None), PackedStream.empty(store)
    rng = _val_draws(seed, salt)
    parts = {False: [], True: []}  # (buffer, start, length) segments of each side, per chunk
    count = tokens = 0
    for buf, st, lens in store.iter_doc_chunks(chunk):
        v = np.flatnonzero(rng.random(lens.size) < val_fraction)
        count, tokens = count + int(v.size), tokens + int(lens[v].sum())
        parts[True].append((buf[v].astype(np.int64), st[v], lens[v]))
        parts[False].append(_complement(buf, st, lens, v))
    if count == 0 or count == n or tokens < min_val_tokens:
        tr, va = split_documents(
            n, val_fraction, seed, salt, doc_lengths=store.doc_lengths, min_val_tokens=min_val_tokens
        )
        return PackedStream(store, tr), PackedStream(store, va)
    return tuple(
        PackedStream.from_segments(store, *(np.concatenate(c) for c in zip(*parts[side])), docs)
        for side, docs in ((False, n - count), (True, count))
    )


def _complement(buf: np.ndarray, st: np.ndarray, lens: np.ndarray, v: np.ndarray):
    """Segments of the documents of a chunk *not* in ``v`` (sorted). When the chunk's documents lie back to
    back in one buffer (always, for our shards), each run between two held-out documents is one segment,
    found in O(len(v)); otherwise documents are merged one by one."""
    ends = st + lens
    if buf.size and buf[0] == buf[-1] and np.array_equal(st[1:], ends[:-1]):
        a = np.concatenate([[0], v + 1])  # run [a_k, b_k) of kept documents
        b = np.concatenate([v, [lens.size]])
        a, b = a[a < b], b[a < b]
        return np.full(a.size, int(buf[0]), dtype=np.int64), st[a], ends[b - 1] - st[a]
    keep = np.ones(lens.size, dtype=bool)
    keep[v] = False
    return _segments(buf[keep], st[keep], lens[keep])


def _segments(buf: np.ndarray, st: np.ndarray, lens: np.ndarray):
    """Merge physically adjacent documents (same buffer, contiguous) into (buffer, start, length) segments."""
    keep = lens > 0
    buf, st, lens = buf[keep].astype(np.int64), st[keep], lens[keep]
    if lens.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.ones(lens.size, dtype=bool)
    brk[1:] = (buf[1:] != buf[:-1]) | (st[1:] != st[:-1] + lens[:-1])
    heads = np.flatnonzero(brk)
    return buf[heads], st[heads], np.add.reduceat(lens, heads)


class PackedStream:
    """The chosen documents of a store, back to back, as one virtual token array.

    Physically adjacent documents are merged into segments, so a read touches few memmap slices.
    """

    def __init__(self, store: TokenStore, doc_ids: Optional[np.ndarray] = None):
        """All documents (``doc_ids=None``: streamed in chunks) or the given ones (array path)."""
        if doc_ids is None and store.buffer_segments() is not None:  # whole buffers: O(shards)
            b, st, ln = store.buffer_segments()
            self._init(store, *_segments(b, st, ln), num_docs=store.num_docs)
            return
        if doc_ids is None:
            parts = [_segments(*c) for c in store.iter_doc_chunks()]
            segs = [np.concatenate(p) for p in zip(*parts)] if parts else [np.zeros(0, np.int64)] * 3
            self._init(store, *segs, num_docs=store.num_docs)
            return
        sel = np.sort(np.asarray(doc_ids, dtype=np.int64))
        self._init(
            store,
            *_segments(store.doc_buffer[sel], store.doc_starts[sel], store.doc_lengths[sel]),
            num_docs=int(sel.size),
        )

    @classmethod
    def from_segments(cls, store: TokenStore, buf, start, length, num_docs: int) -> "PackedStream":
        self = cls.__new__(cls)
        self._init(store, *_segments(buf, start, length), num_docs=num_docs)
        return self

    @classmethod
    def empty(cls, store: TokenStore) -> "PackedStream":
        z = np.zeros(0, np.int64)
        return cls.from_segments(store, z, z, z, 0)

    def _init(self, store, buf, start, length, num_docs):
        self.store, self.num_docs = store, int(num_docs)
        self.seg_buf, self.seg_start, self.seg_len = buf, start, length
        self.seg_cum = np.concatenate([[0], np.cumsum(self.seg_len)]).astype(np.int64)
        self.num_tokens = int(self.seg_cum[-1])

    def num_samples(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"read [{start}, {start + length}) outside stream of {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.seg_cum, start, side="right")) - 1
        off, pos = start - int(self.seg_cum[k]), 0
        while pos < length:
            take = min(int(self.seg_len[k]) - off, length - pos)
            out[pos : pos + take] = self.store.read(int(self.seg_buf[k]), int(self.seg_start[k]) + off, take)
            pos, k, off = pos + take, k + 1, 0
        return out

    def sample(self, k: int, seq_len: int) -> np.ndarray:
        return self.read(k * seq_len, seq_len + 1)


class BlendSchedule:
    """Maps a global sample index to (source, index within source). See the blend rule above."""

    def __init__(self, weights: Sequence[float], period: int = BLEND_PERIOD):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights must be finite and > 0, got {list(weights)}")
        n = w.size
        period = max(period, n)
        raw = w / w.sum() * period
        counts = np.maximum(np.floor(raw).astype(np.int64), 1)
        while counts.sum() < period:  # largest remainder first (ties: lower index)
            counts[int(np.argmax(raw - counts))] += 1
        while counts.sum() > period:  # only after the >= 1 floor: take from the most over-served
            counts[int(np.argmax(np.where(counts > 1, counts - raw, -np.inf)))] -= 1
        sched = np.zeros(period, dtype=np.int64)
        if n > 1:
            cur = np.zeros(n, dtype=np.int64)
            for r in range(period):  # smooth weighted round robin
                cur += counts
                s = int(np.argmax(cur))
                sched[r] = s
                cur[s] -= period
        self.period, self.counts, self.sched = period, counts, sched
        onehot = np.zeros((period + 1, n), dtype=np.int64)
        onehot[np.arange(1, period + 1), sched] = 1
        self.prefix = np.cumsum(onehot, axis=0)  # prefix[r, s] = slots of s among the first r of a period
        self.rank = self.prefix[np.arange(period), sched]

    def locate(self, g: np.ndarray):
        """Vectorised: global indices → (source ids, per-source indices)."""
        g = np.asarray(g, dtype=np.int64)
        k, r = np.divmod(g, self.period)
        s = self.sched[r]
        return s, k * self.counts[s] + self.rank[r]

    def consumed_per_source(self, g: int) -> np.ndarray:
        """How many samples of each source the first ``g`` global samples use."""
        k, r = divmod(int(g), self.period)
        return k * self.counts + self.prefix[r]


class BlendedDataset:
    """Training samples of all sources, addressed by global sample index (blend + epoch rules)."""

    def __init__(
        self,
        streams: List[PackedStream],
        weights: Sequence[float],
        seq_len: int,
        seed: int,
        names: Sequence[str],
        salts: Optional[Sequence[int]] = None,
        perm_cache: int = 64,
    ):
        self.streams, self.seq_len, self.seed, self.names = streams, int(seq_len), int(seed), list(names)
        self.sizes = np.array([s.num_samples(seq_len) for s in streams], dtype=np.int64)
        for name, st, n in zip(self.names, streams, self.sizes):
            if n < 1:
                raise UserInputError(
                    f"source {name!r}: its training split has {st.num_tokens} tokens, fewer than seq_len + 1 = "
                    f"{seq_len + 1}; add data, lower data.seq_len, or lower data.val_fraction"
                )
        self.schedule = BlendSchedule(weights)
        self.salts = [int(x) for x in salts] if salts is not None else [stable_salt(n) for n in self.names]
        self._perms: "OrderedDict[tuple, FeistelPermutation]" = OrderedDict()
        self._perm_cache = max(1, perm_cache)
        self._lock = threading.Lock()

    @property
    def epoch_samples(self) -> int:
        """Samples in one pass over every source (informational; sources cycle independently)."""
        return int(self.sizes.sum())

    def _perm(self, s: int, epoch: int) -> FeistelPermutation:
        key = (s, epoch)
        with self._lock:  # prefetch threads share the cache (of round keys: a few bytes each)
            p = self._perms.get(key)
            if p is None:
                p = FeistelPermutation(int(self.sizes[s]), [self.seed, self.salts[s], s, epoch])
                self._perms[key] = p
                while len(self._perms) > self._perm_cache:
                    self._perms.popitem(last=False)
            else:
                self._perms.move_to_end(key)
            return p

    def locate(self, g: np.ndarray):
        """global indices → (source, epoch, sample index within the source's stream)."""
        s, j = self.schedule.locate(g)
        n = self.sizes[s]
        epoch, pos = np.divmod(j, n)
        k = np.empty(pos.shape, dtype=np.int64)
        for a, e in set(zip(s.tolist(), epoch.tolist())):  # one vectorised lookup per (source, epoch)
            m = (s == a) & (epoch == e)
            k[m] = self._perm(a, e)(pos[m])
        return s, epoch, k

    def get(self, g: Iterable[int]) -> np.ndarray:
        """Samples for global indices ``g`` as int64 ``[len(g), seq_len + 1]``."""
        g = np.asarray(list(g) if not isinstance(g, np.ndarray) else g, dtype=np.int64).reshape(-1)
        s, _, k = self.locate(g)
        out = np.empty((g.size, self.seq_len + 1), dtype=np.int64)
        for i in range(g.size):
            out[i] = self.streams[int(s[i])].sample(int(k[i]), self.seq_len)
        return out

    def source_epochs(self, consumed: int) -> List[int]:
        """Completed passes over each source after ``consumed`` global samples."""
        return [int(c // n) for c, n in zip(self.schedule.consumed_per_source(consumed), self.sizes)]
