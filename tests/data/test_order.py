"""Data order at scale (issues 21.2 and 14.6): the Feistel epoch shuffle is a bijection and follows its
documented rule, the streamed split equals the split rule, start-up never builds per-document arrays,
a checkpoint from the old order is refused, and the order does not depend on where the files are."""

import shutil

import numpy as np
import pytest
import torch

from attnres_train.config.data import DataConfig, DataSourceConfig
from attnres_train.config.errors import ConfigError, UserInputError
from attnres_train.data.loader import build_datasets
from attnres_train.data.packing import BlendedDataset, PackedStream, split_streams, tokenize_to_shards
from attnres_train.data.shards import ShardSet, TokenStore
from attnres_train.data.shuffle import FeistelPermutation
from attnres_train.data.tokenizer import ByteTokenizer

EOS = ByteTokenizer.eos_id
MASK64 = (1 << 64) - 1


def _reference_perm(n, key, i):
    """The rule in attnres_train/data/shuffle.py's docstring, with Python ints and plain loops."""
    half = (max(2, (n - 1).bit_length()) + 1) // 2
    m = (1 << half) - 1
    keys = [int(k) for k in np.random.default_rng(list(key)).integers(0, 2**64, 6, dtype=np.uint64)]

    def mix(z):
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) & MASK64
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    x = i
    while True:
        left, right = x >> half, x & m
        for k in keys:
            left, right = right, left ^ (mix(right ^ k) & m)
        x = (left << half) | right
        if x < n:
            return x


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 255, 256, 257, 1000, 4099])
def test_feistel_is_a_bijection_of_0_to_n(n):
    got = FeistelPermutation(n, [7, n])(np.arange(n)).tolist()
    assert sorted(got) == list(range(n))


def test_feistel_follows_the_documented_rule_and_depends_on_the_key():
    for n, key in ((37, [1, 2, 3, 0]), (1000, [1234, 99, 0, 5])):
        want = [_reference_perm(n, key, i) for i in range(n)]
        assert FeistelPermutation(n, key)(np.arange(n)).tolist() == want
    a, b = FeistelPermutation(1000, [1, 0])(np.arange(1000)), FeistelPermutation(1000, [1, 1])(np.arange(1000))
    assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9


def test_each_epoch_visits_every_sample_once_in_a_new_order(tmp_path):
    tokenize_to_shards([f"doc {i} " * 5 for i in range(50)], ByteTokenizer(), str(tmp_path / "s"), shard_tokens=200)
    stream = PackedStream(ShardSet(str(tmp_path / "s")))
    ds = BlendedDataset([stream], [1.0], seq_len=8, seed=3, names=["s"], salts=[5])
    n = int(ds.sizes[0])
    _, ep, k = ds.locate(np.arange(2 * n))
    assert ep[:n].tolist() == [0] * n and ep[n:].tolist() == [1] * n
    assert sorted(k[:n].tolist()) == list(range(n)) and sorted(k[n:].tolist()) == list(range(n))
    assert k[:n].tolist() != k[n:].tolist()
    assert k[:n].tolist() == [_reference_perm(n, [3, 5, 0, 0], j) for j in range(n)]  # key (seed, salt, s, e)


def _docs(n=300):
    rng = np.random.default_rng(0)
    return [f"d{i}:" + "x" * int(rng.integers(0, 30)) for i in range(n)]


def test_streamed_split_equals_the_split_rule(tmp_path):
    docs = _docs()
    tokenize_to_shards(docs, ByteTokenizer(), str(tmp_path / "s"), shard_tokens=500)  # many shards
    store = ShardSet(str(tmp_path / "s"))
    assert len(store.headers) > 5
    u = np.random.default_rng([9, 77, 0x5EED]).random(len(docs))  # the documented draw, one per document
    want = {True: [], False: []}
    for d, ui in zip(docs, u):
        want[bool(ui < 0.1)] += list(d.encode()) + [EOS]
    for chunk in (7, 1 << 20):  # chunks that cut shards anywhere, and one chunk per shard
        train, val = split_streams(store, 0.1, seed=9, salt=77, chunk=chunk)
        assert train.read(0, train.num_tokens).tolist() == want[False]
        assert val.read(0, val.num_tokens).tolist() == want[True]
        assert train.num_docs + val.num_docs == len(docs) and val.num_docs == int((u < 0.1).sum())


class _ScatteredStore(TokenStore):
    """Documents stored back to front in one array: not contiguous in stream order (like some Megatron sets)."""

    def __init__(self, docs):
        toks = [list(d.encode()) + [EOS] for d in docs]
        self.buf = np.array([t for d in reversed(toks) for t in d], dtype=np.int64)
        self.doc_lengths = np.array([len(t) for t in toks], dtype=np.int64)
        self.doc_starts = self.buf.size - np.cumsum(self.doc_lengths)
        self.doc_buffer = np.zeros(len(toks), dtype=np.int32)
        self.name = "scattered"

    def read(self, buffer, start, length):
        return self.buf[start : start + length]


def test_streamed_split_of_a_store_whose_documents_are_not_back_to_back():
    docs = _docs(120)
    u = np.random.default_rng([2, 5, 0x5EED]).random(len(docs))
    want = [t for d, ui in zip(docs, u) if ui >= 0.2 for t in list(d.encode()) + [EOS]]
    train, _ = split_streams(_ScatteredStore(docs), 0.2, seed=2, salt=5, chunk=16)
    assert train.read(0, train.num_tokens).tolist() == want


def _cfg(path, cache, **kw):
    src = {k: kw.pop(k) for k in ("name",) if k in kw}
    return DataConfig(
        sources=[DataSourceConfig(path=str(path), **src)],
        seq_len=16,
        val_fraction=0.05,
        seed=4,
        cache_dir=str(cache),
        num_workers=0,
        **kw,
    )


def _corpus(root):
    root.mkdir(parents=True)
    for i in range(40):
        (root / f"f{i:02d}.txt").write_text(f"file {i} " + "lorem ipsum " * (2 + i % 5))
    return root


def test_start_up_builds_no_per_document_arrays(tmp_path, monkeypatch):
    tokenize_to_shards(_docs(), ByteTokenizer(), str(tmp_path / "s"), shard_tokens=500)

    def per_document(self):
        raise AssertionError("start-up materialised an array with one entry per document")

    monkeypatch.setattr(ShardSet, "_materialise", per_document)
    b = build_datasets(_cfg(tmp_path / "s", tmp_path / "c"), progress=False)
    assert b.val.num_samples > 0 and b.train_sampler(4).next_batch().shape == (4, 17)


def test_same_corpus_under_two_directories_gives_identical_batches(tmp_path):
    a = _corpus(tmp_path / "one" / "corpus")
    b = tmp_path / "elsewhere" / "deeper" / "copy"
    shutil.copytree(a, b)
    first = [build_datasets(_cfg(p, tmp_path / f"cache{i}"), progress=False) for i, p in enumerate((a, b))]
    batches = [[bd.train_sampler(8).next_batch() for _ in range(3)] for bd in first]
    assert all(torch.equal(x, y) for x, y in zip(*batches))
    assert torch.equal(torch.cat(list(first[0].val.batches(4))), torch.cat(list(first[1].val.batches(4))))
    # the same for token shards prepared into two directories
    for d in ("s1", "s2"):
        tokenize_to_shards(_docs(), ByteTokenizer(), str(tmp_path / d), shard_tokens=700)
    shard_batches = [
        build_datasets(_cfg(tmp_path / d, tmp_path / "c"), progress=False).train_sampler(8).next_batch()
        for d in ("s1", "s2")
    ]
    assert torch.equal(*shard_batches)
    # a configured name seeds the order instead of the content: same name, same order; other name, other order
    named = [
        build_datasets(_cfg(p, tmp_path / "c", name=n), progress=False).train_sampler(8).next_batch()
        for p, n in ((a, "web"), (b, "web"), (a, "code"))
    ]
    assert torch.equal(named[0], named[1]) and not torch.equal(named[0], named[2])


def test_duplicate_source_names_and_empty_names_are_config_errors(tmp_path):
    a = _corpus(tmp_path / "c")
    cfg = _cfg(a, tmp_path / "cache")
    cfg.sources = [DataSourceConfig(path=str(a), name="x"), DataSourceConfig(path=str(a), name="x")]
    with pytest.raises(ConfigError, match=r"data.sources\[1\].name"):
        build_datasets(cfg, progress=False)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].name"):
        build_datasets(_cfg(a, tmp_path / "cache", name=" "), progress=False)


def test_a_checkpoint_from_another_sample_order_is_refused(tmp_path):
    bundle = build_datasets(_cfg(_corpus(tmp_path / "c"), tmp_path / "cache"), progress=False)
    s = bundle.train_sampler(8)
    s.next_batch()
    state = s.state_dict()
    assert state["order_version"] == 2
    old = {k: v for k, v in state.items() if k != "order_version"}  # written before order versions existed
    with pytest.raises(UserInputError, match="order version 1.*order version 2"):
        bundle.train_sampler(8).load_state_dict(old)
    fresh = bundle.train_sampler(8)
    fresh.load_state_dict({"consumed_samples": 0})  # nothing consumed yet (e.g. an imported init): any order
    fresh.load_state_dict(state)
    assert fresh.consumed_samples == 8
