"""Packing rules: EOS after every document, seq_len+1 samples overlapping by one token, document-level
train/val split, the blend schedule's ratios over arbitrary windows, and per-epoch permutations."""

import numpy as np
import pytest

from attnres_train.config.errors import UserInputError
from attnres_train.data.packing import (
    BlendedDataset,
    BlendSchedule,
    PackedStream,
    split_documents,
    tokenize_to_shards,
)
from attnres_train.data.shards import ShardSet
from attnres_train.data.tokenizer import ByteTokenizer

EOS = ByteTokenizer.eos_id


def _store(tmp_path, docs, shard_tokens=1 << 20, name="s"):
    out = tmp_path / name
    tokenize_to_shards(docs, ByteTokenizer(), str(out), shard_tokens=shard_tokens)
    return ShardSet(str(out))


def test_eos_follows_every_document(tmp_path):
    store = _store(tmp_path, ["ab", "cde", "f"])
    stream = PackedStream(store)
    assert stream.read(0, stream.num_tokens).tolist() == [97, 98, EOS, 99, 100, 101, EOS, 102, EOS]
    assert store.doc_lengths.tolist() == [3, 4, 2]  # EOS is stored with its document


def test_samples_are_seq_len_plus_one_and_overlap_by_one_token(tmp_path):
    store = _store(tmp_path, ["abcdefgh", "ijklmnop"])  # 18 tokens with EOSes
    stream = PackedStream(store)
    seq_len = 4
    assert stream.num_samples(seq_len) == (18 - 1) // seq_len == 4
    flat = stream.read(0, 18)
    for k in range(4):
        s = stream.sample(k, seq_len)
        assert s.shape == (seq_len + 1,)
        assert s.tolist() == flat[k * seq_len : k * seq_len + seq_len + 1].tolist()
        if k:
            assert s[0] == stream.sample(k - 1, seq_len)[-1]  # the one-token overlap
    with pytest.raises(IndexError):
        stream.sample(4, seq_len)  # the incomplete tail is dropped


def test_stream_over_document_subset_and_shard_boundaries(tmp_path):
    docs = [chr(ord("a") + i) * (i + 1) for i in range(10)]  # "a", "bb", "ccc", ...
    store = _store(tmp_path, docs, shard_tokens=7)  # forces many shards
    assert len(store.headers) > 3
    pick = [1, 2, 3, 7, 9]
    stream = PackedStream(store, np.array(pick))
    want = []
    for i in pick:
        want += list(docs[i].encode()) + [EOS]
    assert stream.read(0, stream.num_tokens).tolist() == want
    assert stream.read(3, 9).tolist() == want[3:12]  # a read crossing documents and shards
    assert len(stream.seg_len) < len(pick) + 1  # adjacent documents in a shard were merged


def test_split_by_document_is_disjoint_deterministic_and_prefix_stable():
    tr, va = split_documents(2000, 0.1, seed=7, salt=3)
    assert np.intersect1d(tr, va).size == 0 and np.union1d(tr, va).tolist() == list(range(2000))
    assert 0.07 < va.size / 2000 < 0.13
    tr2, va2 = split_documents(2000, 0.1, seed=7, salt=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split_documents(2000, 0.1, seed=8, salt=3)[1])
    _, va_more = split_documents(2500, 0.1, seed=7, salt=3)  # appending documents keeps old assignments
    assert np.array_equal(va_more[va_more < 2000], va)
    tr0, va0 = split_documents(3, 0.0, seed=1)
    assert tr0.tolist() == [0, 1, 2] and va0.size == 0
    _, va_tiny = split_documents(5, 0.001, seed=1)
    assert va_tiny.size == 1  # tiny corpora still get a validation document


def test_split_tops_up_small_validation_sets_to_one_sample():
    lengths = np.full(100, 10)
    tr, va = split_documents(100, 0.01, seed=3, doc_lengths=lengths, min_val_tokens=65)
    assert lengths[va].sum() >= 65 and va.size == 7  # 7 documents of 10 tokens hold one 65-token sample
    assert np.isin(split_documents(100, 0.01, seed=3)[1], va).all()  # the drawn ones stay in validation
    _, capped = split_documents(10, 0.01, seed=3, doc_lengths=np.full(10, 10), min_val_tokens=10_000)
    assert capped.size == 5  # never more than half of the documents


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1], [10, 1, 1, 3], [0.999, 0.001]])
def test_blend_ratios_hold_over_any_window(weights):
    sch = BlendSchedule(weights)
    w = np.asarray(weights, dtype=float) / sum(weights)
    assert sch.counts.sum() == sch.period
    assert np.all(np.abs(sch.counts / sch.period - w) <= 1.0 / sch.period + 1e-12)  # quantisation
    rng = np.random.default_rng(0)
    for _ in range(40):
        start, length = int(rng.integers(0, 10 * sch.period)), int(rng.integers(1, 3 * sch.period))
        src, _ = sch.locate(np.arange(start, start + length))
        got = np.bincount(src, minlength=len(weights))
        assert np.all(np.abs(got - length * sch.counts / sch.period) <= 2.0), (start, length, got)


def test_blend_schedule_per_source_indices_are_consecutive():
    sch = BlendSchedule([3, 1])
    src, j = sch.locate(np.arange(5 * sch.period + 17))
    for s in range(2):
        assert j[src == s].tolist() == list(range(int((src == s).sum())))  # each source read in order
    assert sch.consumed_per_source(5 * sch.period + 17).tolist() == np.bincount(src).tolist()


def test_blended_dataset_draws_from_the_right_sources(tmp_path):
    a = PackedStream(_store(tmp_path, ["a" * 50] * 40, name="a"))
    b = PackedStream(_store(tmp_path, ["b" * 50] * 40, name="b"))
    ds = BlendedDataset([a, b], [3, 1], seq_len=16, seed=0, names=["A", "B"])
    x = ds.get(range(400))
    from_a = np.isin(x, [ord("a"), EOS]).all(axis=1)
    from_b = np.isin(x, [ord("b"), EOS]).all(axis=1)
    assert np.all(from_a ^ from_b)
    assert abs(from_a.sum() - 300) <= 2


def test_epochs_are_permutations_with_fresh_order(tmp_path):
    store = _store(tmp_path, [f"doc {i} " * 5 for i in range(30)])
    ds = BlendedDataset([PackedStream(store)], [1.0], seq_len=8, seed=5, names=["only"])
    n = int(ds.sizes[0])
    s, epoch, k = ds.locate(np.arange(2 * n))
    assert sorted(k[:n].tolist()) == list(range(n)) and sorted(k[n:].tolist()) == list(range(n))
    assert epoch[:n].max() == 0 and epoch[n:].min() == 1
    assert k[:n].tolist() != k[n:].tolist()
    assert ds.source_epochs(2 * n + 1) == [2]
    other = BlendedDataset([PackedStream(store)], [1.0], seq_len=8, seed=6, names=["only"])
    assert other.locate(np.arange(n))[2].tolist() != k[:n].tolist()  # the seed drives the order


def test_source_too_small_for_one_sample_is_a_clear_error(tmp_path):
    stream = PackedStream(_store(tmp_path, ["tiny"]))
    with pytest.raises(UserInputError, match="fewer than seq_len"):
        BlendedDataset([stream], [1.0], seq_len=64, seed=0, names=["tiny-source"])
