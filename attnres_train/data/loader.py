"""From a ``DataConfig`` to batches: open/tokenize/cache every source, split, blend, and sample by global position.

Why global positions: a batch is a pure function of ``consumed_samples``, so the checkpointed state is one
integer and resuming on another number of data-parallel ranks or another global batch continues at exactly
the same token position (docs/data.md "Sampler and resume semantics"). No ``torch.distributed`` here: ranks
are plain ints handed in by the trainer. Raw-text sources are tokenized once into a cache keyed by source,
tokenizer and limits, a lock file serialising ranks that race to build it (docs/data.md "Cache").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from attnres_train.config.data import DataConfig, as_data_config, held_out_fraction, validate_data_config
from attnres_train.config.errors import ConfigError, UserInputError

from .cache_listing import dir_mtimes, entry_from_listing, listing_path, uses_listing, write_listing
from .cache_lock import cache_build_lock, remove_quietly
from .megatron import MegatronStore
from .packing import BlendedDataset, PackedStream, content_salt, split_streams, stable_salt, tokenize_to_shards
from .shards import ShardSet, TokenStore, make_staging_dir
from .sources import ResolvedSource, effective_limits, iter_documents, resolve_source
from .tokenizer import Tokenizer, load_tokenizer

CACHE_VERSION = 2  # 2: shard format v2 (offsets files + set index)
# Which global-index -> sample mapping a run used: 1 = full permutations per epoch and path-salted sources
# (before 2026-12); 2 = Feistel shuffles and name/content salts. A checkpoint's data position is only
# meaningful under the order that produced it, so a mismatch is refused (GlobalBatchSampler.load_state_dict).
ORDER_VERSION = 2


@dataclass
class SourceData:
    name: str
    kind: str
    weight: float
    store: TokenStore
    train: PackedStream
    val: PackedStream
    cache_path: Optional[str] = None
    salt: int = 0


def cache_key(rs: ResolvedSource, tokenizer: Tokenizer, max_docs: Optional[int], max_bytes: Optional[int]) -> str:
    material = {
        "v": CACHE_VERSION,
        "source": rs.fingerprint(),
        "tokenizer": tokenizer.fingerprint,
        "eos": tokenizer.eos_id,
        "max_docs": max_docs,
        "max_bytes": max_bytes,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenize_cached(
    rs: ResolvedSource, tokenizer: Tokenizer, cache_dir: str, max_docs=None, max_bytes=None, progress: bool = True
) -> ShardSet:
    """Shards for a raw-text source, from the cache or tokenized now (written atomically)."""
    max_docs, max_bytes = effective_limits(rs, max_docs, max_bytes)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(rs.name.rstrip("/")) or rs.kind)[:40]
    root = os.path.join(cache_dir, "tokenized")
    listing = dirs = None
    if uses_listing(rs):  # a warm start without a stat per file (docs/data.md "Cache")
        key = {"v": CACHE_VERSION, "tokenizer": tokenizer.fingerprint, "eos": tokenizer.eos_id}
        listing = listing_path(root, slug, rs, {**key, "max_docs": max_docs, "max_bytes": max_bytes})
        entry = entry_from_listing(listing, rs, root)
        if entry is not None:
            return ShardSet(entry)
        dirs = dir_mtimes(rs)  # before the files are stat'ed: a change in between is seen next time
    final = os.path.join(root, f"{slug}-{cache_key(rs, tokenizer, max_docs, max_bytes)}")
    store = _open_or_build(rs, tokenizer, root, final, max_docs, max_bytes, progress)
    if listing is not None:
        write_listing(listing, final, dirs)
    return store


def _open_or_build(rs, tokenizer, root: str, final: str, max_docs, max_bytes, progress: bool) -> ShardSet:
    if os.path.isdir(final):
        return ShardSet(final)
    with cache_build_lock(final + ".lock") as created:
        if os.path.isdir(final):  # another rank built it while we waited
            return ShardSet(final)
        try:
            _build(rs, tokenizer, root, final, max_docs, max_bytes, progress)
        except UserInputError:  # bad input (an empty or undecodable file): leave the cache as it was, and do it
            remove_quietly(created)  # while holding the lock (docs/data.md "Cache", data/cache_lock.py)
            raise
    return ShardSet(final)


def _build(rs, tokenizer, root: str, final: str, max_docs, max_bytes, progress: bool) -> None:
    """Tokenize into a staging directory next to ``final``, then rename it into place (the caller holds the lock)."""
    tmp = make_staging_dir(root, ".tmp-")
    try:
        with tqdm(desc=f"tokenizing {rs.name}", unit=" doc", disable=not progress, leave=False) as bar:
            w = tokenize_to_shards(
                iter_documents(rs, max_docs, max_bytes), tokenizer, tmp, source=rs.name, progress=bar
            )
        with open(os.path.join(tmp, "cache_key.json"), "w") as f:
            json.dump(
                {
                    "source": rs.name,
                    "kind": rs.kind,
                    "tokenizer": tokenizer.name,
                    "max_docs": max_docs,
                    "max_bytes": max_bytes,
                    "docs": w.num_docs,
                    "tokens": w.num_tokens,
                },
                f,
            )
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_source(
    src,
    where: str,
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    progress: bool = True,
    model_vocab_size: Optional[int] = None,
):
    """(TokenStore, kind, cache path or None) for one configured source."""
    rs = resolve_source(src, where)
    cache_path = None
    if rs.kind == "memmap":
        store: TokenStore = ShardSet(rs.files[0])
        if (store.vocab_size, store.eos_id) != (tokenizer.vocab_size, tokenizer.eos_id):
            raise UserInputError(
                f"{where}: shards in {rs.name!r} were tokenized with {store.tokenizer!r} (vocab {store.vocab_size}, "
                f"eos {store.eos_id}) but data.tokenizer is {tokenizer.name!r} (vocab {tokenizer.vocab_size}, eos "
                f"{tokenizer.eos_id}); set data.tokenizer to the tokenizer used by attnres-prepare"
            )
    elif rs.kind == "megatron":
        store = MegatronStore(rs.name, eos_id=tokenizer.eos_id)
    else:
        store = tokenize_cached(rs, tokenizer, cfg.cache_dir, cfg.max_docs, cfg.max_bytes, progress)
        cache_path = store.name
    store.check_vocab(model_vocab_size)
    return store, rs.kind, cache_path


class ValidationSet:
    """Held-out documents of every source, cut into samples; iterated in a fixed order (no shuffle).

    ``separate``: the streams are ``data.val_sources`` (each evaluated and logged on its own), not the held-out
    slice of the training sources (evaluated as one pool)."""

    def __init__(self, streams: List[PackedStream], names: List[str], seq_len: int, separate: bool = False):
        self.streams, self.names, self.seq_len = streams, list(names), int(seq_len)
        self.separate = bool(separate)
        self.sizes = np.array([s.num_samples(seq_len) for s in streams], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    def sample(self, v: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, v, side="right")) - 1
        return self.streams[s].sample(v - int(self.offsets[s]), self.seq_len)

    def batches(
        self,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        max_batches: Optional[int] = None,
        source: Optional[str] = None,
    ) -> Iterator[torch.Tensor]:
        """``[b, seq_len+1]`` LongTensors for this rank. Every rank gets the same number of batches: the last
        global batch is split evenly, dropping at most ``dp_size - 1`` samples. ``source`` limits to one source."""
        lo, hi = 0, self.num_samples
        if source is not None:
            if source not in self.names:
                raise UserInputError(f"no validation source named {source!r} (have: {', '.join(self.names)})")
            i = self.names.index(source)
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        gb, start, count = local_batch_size * dp_size, lo, 0
        while start < hi and (max_batches is None or count < max_batches):
            per_rank = min(local_batch_size, (hi - start) // dp_size)
            if per_rank == 0:
                break
            first = start + dp_rank * per_rank
            yield torch.from_numpy(np.stack([self.sample(v) for v in range(first, first + per_rank)]))
            start, count = start + min(gb, per_rank * dp_size), count + 1


class GlobalBatchSampler:
    """Deterministic, resumable training batches for one data-parallel rank (see module docstring)."""

    def __init__(
        self,
        dataset: BlendedDataset,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        consumed_samples: int = 0,
    ):
        for name, v, lo in (
            ("global_batch_size", global_batch_size, 1),
            ("dp_size", dp_size, 1),
            ("dp_rank", dp_rank, 0),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(name, f"must be an integer >= {lo}, got {v!r}")
        if dp_rank >= dp_size:
            raise ConfigError("dp_rank", f"must be < dp_size={dp_size}, got {dp_rank}")
        if global_batch_size % dp_size:
            raise ConfigError(
                "global_batch_size", f"{global_batch_size} is not divisible by the data-parallel size {dp_size}"
            )
        self.dataset, self.global_batch_size = dataset, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.local_batch_size = global_batch_size // dp_size
        self.consumed_samples = int(consumed_samples)
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="attnres-data") if num_workers > 0 else None
        self._depth = max(2, num_workers + 1)
        self._pending: Dict[int, object] = {}

    def indices_at(self, consumed: int) -> np.ndarray:
        return consumed + self.dp_rank * self.local_batch_size + np.arange(self.local_batch_size, dtype=np.int64)

    def batch_at(self, consumed: int) -> torch.Tensor:
        """This rank's batch when the job has consumed ``consumed`` samples: LongTensor [local, seq_len+1]."""
        return torch.from_numpy(self.dataset.get(self.indices_at(consumed)))

    def next_batch(self) -> torch.Tensor:
        pos, gb = self.consumed_samples, self.global_batch_size
        if self._pool is None:
            batch = self.batch_at(pos)
        else:
            fut = self._pending.pop(pos, None) or self._pool.submit(self.batch_at, pos)
            self._pending = {p: f for p, f in self._pending.items() if p > pos}
            for k in range(1, self._depth + 1):
                ahead = pos + k * gb
                if ahead not in self._pending:
                    self._pending[ahead] = self._pool.submit(self.batch_at, ahead)
            batch = fut.result()
        self.consumed_samples = pos + gb
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def fingerprint(self) -> dict:
        d = self.dataset
        return {
            "seq_len": d.seq_len,
            "salts": d.salts,
            "samples": d.sizes.tolist(),
            "blend": d.schedule.counts.tolist(),
        }

    def state_dict(self) -> dict:
        d = self.dataset
        per_source = d.source_epochs(self.consumed_samples)
        return {
            "consumed_samples": self.consumed_samples,
            "seed": d.seed,
            "epoch": min(per_source),
            "source_epochs": per_source,
            "order_version": ORDER_VERSION,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "consumed_samples" not in state:
            raise UserInputError("data sampler state has no 'consumed_samples' (not saved by GlobalBatchSampler?)")
        version = state.get("order_version", 1)
        if int(state["consumed_samples"]) > 0 and version != ORDER_VERSION:
            raise UserInputError(
                f"the checkpoint's data position ({state['consumed_samples']} samples) was taken under sample order "
                f"version {version}, but this version of attnres-train draws samples in order version "
                f"{ORDER_VERSION} (docs/data.md, 'Order versions'); resuming would silently train on other samples: "
                "resume with the attnres-train version that wrote the checkpoint, or start a new run"
            )
        if state.get("seed", self.dataset.seed) != self.dataset.seed:
            raise ConfigError(
                "data.seed",
                f"the checkpoint was trained with seed {state['seed']}, the config says "
                f"{self.dataset.seed}; resuming with another seed would change the data order",
            )
        if state.get("fingerprint", self.fingerprint()) != self.fingerprint():
            warnings.warn(
                "data changed since the checkpoint (sources, sizes, weights or seq_len); resuming at the "
                "same global sample index, but the samples it maps to differ",
                stacklevel=2,
            )
        self.consumed_samples = int(state["consumed_samples"])
        self._pending.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


@dataclass
class DataBundle:
    """Everything ``build_datasets`` produced."""

    config: DataConfig
    tokenizer: Tokenizer
    sources: List[SourceData]
    train: BlendedDataset
    val: ValidationSet

    def train_sampler(
        self, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, num_workers: Optional[int] = None
    ) -> GlobalBatchSampler:
        nw = self.config.num_workers if num_workers is None else num_workers
        return GlobalBatchSampler(self.train, global_batch_size, dp_rank, dp_size, num_workers=nw)

    def describe(self) -> str:
        lines = [f"tokenizer {self.tokenizer.name} (vocab {self.tokenizer.vocab_size}), seq_len {self.train.seq_len}"]
        for s, n in zip(self.sources, self.train.sizes):
            lines.append(
                f"  {s.kind:8s} {s.name}: weight {s.weight:g}, {s.train.num_tokens:,} train tokens "
                f"({n:,} samples), {s.val.num_tokens:,} val tokens"
            )
        if self.val.separate:
            for name, st, n in zip(self.val.names, self.val.streams, self.val.sizes):
                lines.append(f"  val      {name}: {st.num_tokens:,} tokens ({n:,} samples)")
        return "\n".join(lines)


def val_source_name(src) -> str:
    """A val source's name in logs and metric keys (``val/<name>/loss``): its ``name``, else the last part of
    its path or hub name (``valid.jsonl``, ``wikitext``)."""
    if src.name:
        return src.name
    where = (src.hf_name or src.path).rstrip("/")
    return os.path.basename(where) or where


def open_val_sources(
    cfg: DataConfig, tokenizer: Tokenizer, *, progress: bool = True, model_vocab_size: Optional[int] = None
) -> ValidationSet:
    """``data.val_sources``: every document of each source in its file order, back to back, one stream per
    source (opened and cached like a training source; no split, no shuffle). docs/data.md, "Validation"."""
    streams: List[PackedStream] = []
    names: List[str] = []
    for i, src in enumerate(cfg.val_sources):
        where = f"data.val_sources[{i}]"
        store, _, _ = open_source(src, where, cfg, tokenizer, progress=progress, model_vocab_size=model_vocab_size)
        name = val_source_name(src)
        if name in names:
            if src.name:
                raise ConfigError(f"{where}.name", f"{name!r} is already the name of another val source")
            name = f"{name}#{i}"
        stream = PackedStream(store, None)
        if stream.num_samples(cfg.seq_len) == 0:
            raise UserInputError(
                f"{where}: {name!r} holds {stream.num_tokens} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1} "
                "(one validation sample); add text to it or lower data.seq_len"
            )
        streams.append(stream)
        names.append(name)
    return ValidationSet(streams, names, cfg.seq_len, separate=True)


def build_datasets(cfg, *, model_vocab_size: Optional[int] = None, progress: bool = True) -> DataBundle:
    """Validate ``cfg`` (DataConfig, DictConfig or dict), open/tokenize every source, split, and build the blend."""
    cfg = validate_data_config(as_data_config(cfg))
    tokenizer = load_tokenizer(cfg.tokenizer)
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{model_vocab_size} is smaller than the vocabulary of tokenizer "
            f"{tokenizer.name!r} ({tokenizer.vocab_size})",
        )
    sources: List[SourceData] = []
    val_fraction = held_out_fraction(cfg)
    for i, src in enumerate(cfg.sources):
        where = f"data.sources[{i}]"
        store, kind, cache_path = open_source(
            src, where, cfg, tokenizer, progress=progress, model_vocab_size=model_vocab_size
        )
        name = src.name or src.hf_name or src.path
        if any(s.name == name for s in sources):
            if src.name:
                raise ConfigError(f"{where}.name", f"{src.name!r} is already the name of another source")
            name = f"{name}#{i}"
        salt = stable_salt(src.name) if src.name else content_salt(store)  # never the path (issue 14)
        train_s, val_s = split_streams(store, val_fraction, cfg.seed, salt, min_val_tokens=cfg.seq_len + 1)
        sources.append(SourceData(name, kind, float(src.weight), store, train_s, val_s, cache_path, salt))
    names = [s.name for s in sources]
    train = BlendedDataset(
        [s.train for s in sources],
        [s.weight for s in sources],
        cfg.seq_len,
        cfg.seed,
        names,
        salts=[s.salt for s in sources],
    )
    if cfg.val_sources:
        val = open_val_sources(cfg, tokenizer, progress=progress, model_vocab_size=model_vocab_size)
        return DataBundle(cfg, tokenizer, sources, train, val)
    val = ValidationSet([s.val for s in sources], names, cfg.seq_len)
    if val_fraction > 0 and val.num_samples == 0:
        if all(s.store.num_docs < 2 for s in sources):  # the split is per document: nothing can be held out
            raise UserInputError(
                f"data.val_fraction={val_fraction}: validation holds out whole documents, and every source has "
                f"a single document (e.g. one file with text_unit: file); split the text into several documents "
                f"(text_unit: paragraph, or several files) or set data.val_fraction=0"
            )
        raise UserInputError(
            f"data.val_fraction={val_fraction}: the held-out documents hold fewer than seq_len + 1 = "
            f"{cfg.seq_len + 1} tokens in every source; raise data.val_fraction or set it to 0"
        )
    return DataBundle(cfg, tokenizer, sources, train, val)
