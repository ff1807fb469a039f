"""Documents → one token stream per source → fixed-length samples, and the weighted blend across sources.

Why these rules (all deterministic, all O(1) per sample, nothing depends on the number of workers/ranks):

* **EOS rule.** Every document is followed by exactly one EOS before the next one starts (the EOS is stored
  in the shard, so the stream is just the documents back to back). Samples ignore document boundaries.
* **Sample rule.** A stream of N tokens gives ``(N - 1) // seq_len`` samples; sample ``k`` is tokens
  ``[k*seq_len, k*seq_len + seq_len + 1)``. Consecutive samples overlap by exactly one token (the last
  target of sample k is the first input of sample k+1), so every token is predicted once per epoch.
  The tail that does not fill a sample is dropped.
* **Split rule.** The validation split is chosen per *document* by a seeded uniform draw (``u < val_fraction``),
  so no validation text leaks into training through a shared sample. Draws are made in document order from
  one generator, so adding documents at the end keeps earlier assignments. A source with >= 2 documents
  gets at least one validation document, and at least ``seq_len + 1`` validation tokens if moving up to
  half of its documents (smallest draws first) achieves that.
* **Blend rule.** Weights are quantised to integer counts ``c_s`` over a period of ``BLEND_PERIOD`` samples
  (largest remainder, every source >= 1). Within a period, slots are dealt by smooth weighted round robin,
  so in every prefix of the period each source is within one sample of its exact share; the period repeats.
  Global sample ``g`` lands in slot ``g % P`` of period ``g // P`` and becomes source ``s``'s
  ``j``-th sample, ``j = (g // P) * c_s + (rank of the slot among s's slots)``. Hence over *any* window of
  W samples source s gets ``W * c_s / P`` samples, ±2.
* **Epoch rule.** Source s's ``j``-th sample is sample ``perm_{s,e}[j % n_s]`` with ``e = j // n_s``, where
  ``perm_{s,e}`` is a permutation seeded by (seed, source, e). Small sources simply cycle more epochs.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence

import numpy as np

from attnres_train.config.errors import UserInputError

from .shards import DEFAULT_SHARD_TOKENS, ShardWriter, TokenStore
from .tokenizer import Tokenizer

BLEND_PERIOD = 4096


def stable_salt(name: str) -> int:
    """A per-source integer that does not depend on Python's randomized str hash."""
    return zlib.crc32(name.encode("utf-8"))


def tokenize_to_shards(docs: Iterable[str], tokenizer: Tokenizer, out_dir: str, *, source: str = "",
                       shard_tokens: int = DEFAULT_SHARD_TOKENS, progress=None, batch_chars: int = 1 << 20,
                       prefix: str = "shard") -> ShardWriter:
    """Tokenize ``docs`` in batches, append EOS to each, write shards into ``out_dir``. Returns the writer."""
    writer = ShardWriter(out_dir, tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size,
                         eos_id=tokenizer.eos_id, source=source, shard_tokens=shard_tokens, prefix=prefix)
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


def split_documents(num_docs: int, val_fraction: float, seed: int, salt: int = 0,
                    doc_lengths: Optional[np.ndarray] = None, min_val_tokens: int = 0):
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


class PackedStream:
    """The chosen documents of a store, back to back, as one virtual token array.

    Physically adjacent documents are merged into segments, so a read touches few memmap slices.
    """

    def __init__(self, store: TokenStore, doc_ids: Optional[np.ndarray] = None):
        self.store = store
        sel = np.arange(store.num_docs, dtype=np.int64) if doc_ids is None else np.sort(np.asarray(doc_ids, dtype=np.int64))
        lens = store.doc_lengths[sel]
        sel, lens = sel[lens > 0], lens[lens > 0]
        self.num_docs = int(sel.size)
        if sel.size == 0:
            self.seg_buf = self.seg_start = self.seg_len = np.zeros(0, dtype=np.int64)
        else:
            buf, st = store.doc_buffer[sel], store.doc_starts[sel]
            brk = np.ones(sel.size, dtype=bool)
            brk[1:] = (buf[1:] != buf[:-1]) | (st[1:] != st[:-1] + lens[:-1])
            heads = np.flatnonzero(brk)
            self.seg_buf, self.seg_start = buf[heads], st[heads]
            self.seg_len = np.add.reduceat(lens, heads)
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

    def __init__(self, streams: List[PackedStream], weights: Sequence[float], seq_len: int, seed: int,
                 names: Sequence[str], perm_cache: int = 2):
        self.streams, self.seq_len, self.seed, self.names = streams, int(seq_len), int(seed), list(names)
        self.sizes = np.array([s.num_samples(seq_len) for s in streams], dtype=np.int64)
        for name, st, n in zip(self.names, streams, self.sizes):
            if n < 1:
                raise UserInputError(
                    f"source {name!r}: its training split has {st.num_tokens} tokens, fewer than seq_len + 1 = "
                    f"{seq_len + 1}; add data, lower data.seq_len, or lower data.val_fraction"
                )
        self.schedule = BlendSchedule(weights)
        self.salts = [stable_salt(n) for n in self.names]
        self._perms: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
        self._perm_cache = max(1, perm_cache) * len(streams)
        self._lock = threading.Lock()

    @property
    def epoch_samples(self) -> int:
        """Samples in one pass over every source (informational; sources cycle independently)."""
        return int(self.sizes.sum())

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        with self._lock:  # prefetch threads share the cache
            p = self._perms.get(key)
            if p is None:
                p = np.random.default_rng([self.seed, self.salts[s], s, epoch]).permutation(int(self.sizes[s]))
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
        k = np.array([self._perm(int(a), int(e))[int(p)] for a, e, p in zip(s, epoch, pos)], dtype=np.int64)
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
