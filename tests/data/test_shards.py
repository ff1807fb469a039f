"""Token shard format: round trip, dtype choice, atomic writes, and every corruption the reader must name."""

import json
import os

import numpy as np
import pytest

from attnres_train.config.data import DataConfig, DataSourceConfig
from attnres_train.config.errors import UserInputError
from attnres_train.data.loader import build_datasets
from attnres_train.data.packing import tokenize_to_shards
from attnres_train.data.shards import ShardSet, ShardWriter
from attnres_train.data.tokenizer import ByteTokenizer


def _write(out, docs, vocab=300, eos=299, shard_tokens=10):
    w = ShardWriter(str(out), tokenizer="test-tok", vocab_size=vocab, eos_id=eos, shard_tokens=shard_tokens)
    for d in docs:
        w.add(np.asarray(d))
    w.close()
    return w


def test_round_trip_across_shards_and_header_fields(tmp_path):
    docs = [[1, 2, 3, 299], [4, 5, 299], list(range(10, 22)) + [299], [7, 299]]
    w = _write(tmp_path / "s", docs)
    # A shard is closed after the document that reaches shard_tokens: docs 0-2 (20 tokens), then doc 3.
    assert len(w.finished) == 2 and w.num_docs == 4 and w.num_tokens == sum(map(len, docs))
    assert sorted(os.listdir(tmp_path / "s")) == ["index.json"] + [
        f"shard_0000{i}.{e}" for i in range(2) for e in ("bin", "idx", "json")
    ]
    h = json.loads((tmp_path / "s" / "shard_00000.json").read_text())
    assert h["dtype"] == "uint16" and h["num_tokens"] == 20 and h["num_docs"] == 3 and h["version"] == 2
    assert (h["format"], h["tokenizer"], h["vocab_size"], h["eos_id"]) == ("attnres-tokens", "test-tok", 300, 299)
    offsets = np.frombuffer((tmp_path / "s" / "shard_00000.idx").read_bytes(), dtype="<i8")
    assert offsets.tolist() == [0, 4, 7, 20]  # raw little-endian int64 document offsets
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert [e["name"] for e in index["shards"]] == ["shard_00000", "shard_00001"]
    assert (index["num_docs"], index["num_tokens"], index["format"]) == (4, 22, "attnres-token-set")
    assert os.path.getsize(tmp_path / "s" / "shard_00000.bin") == 20 * 2
    store = ShardSet(str(tmp_path / "s"))
    assert store.num_docs == 4 and [store.document(i).tolist() for i in range(4)] == docs
    assert store.max_token_id() == 299 and store.eos_id == 299 and store.tokenizer == "test-tok"
    assert ShardSet(str(tmp_path / "s"), verify=True).num_tokens == w.num_tokens


def test_header_records_document_boundaries(tmp_path):
    _write(tmp_path / "s", [[1, 2], [3, 4, 5], [6]], shard_tokens=1000)
    h = json.loads((tmp_path / "s" / "shard_00000.json").read_text())
    assert np.fromfile(tmp_path / "s" / "shard_00000.idx", dtype="<i8").tolist() == [0, 2, 5, 6]
    assert h["num_docs"] == 3 and h["max_token_id"] == 6
    store = ShardSet(str(tmp_path / "s"))
    assert [store.doc_span(i) for i in range(3)] == [(0, 0, 2), (0, 2, 3), (0, 5, 1)]


def test_dtype_follows_vocab_size(tmp_path):
    _write(tmp_path / "small", [[1, 65535]], vocab=65536, eos=0)
    _write(tmp_path / "big", [[1, 70000]], vocab=70001, eos=0)
    assert ShardSet(str(tmp_path / "small"))._buffers[0].dtype == np.uint16
    big = ShardSet(str(tmp_path / "big"))
    assert big._buffers[0].dtype == np.uint32 and big.document(0).tolist() == [1, 70000]
    assert os.path.getsize(tmp_path / "big" / "shard_00000.bin") == 8


def test_no_temporary_files_remain(tmp_path):
    tokenize_to_shards(["alpha", "beta"], ByteTokenizer(), str(tmp_path / "s"))
    assert not [f for f in os.listdir(tmp_path / "s") if "tmp" in f]


def test_truncated_shard_names_the_file(tmp_path):
    _write(tmp_path / "s", [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    binf = tmp_path / "s" / "shard_00000.bin"
    binf.write_bytes(binf.read_bytes()[:-6])
    with pytest.raises(UserInputError, match=r"shard_00000\.bin: shard is truncated: expected 22 bytes .* found 16"):
        ShardSet(str(tmp_path / "s"))


def test_missing_shard_and_corrupt_index_are_named(tmp_path):
    _write(tmp_path / "s", [[1] * 10, [2] * 10, [3] * 10])
    os.remove(tmp_path / "s" / "shard_00001.idx")
    with pytest.raises(UserInputError, match=r"shard_00001\.idx: shard file is missing"):
        ShardSet(str(tmp_path / "s"))
    (tmp_path / "s" / "shard_00001.idx").write_bytes(b"\0" * 8)
    with pytest.raises(UserInputError, match=r"shard_00001\.idx: shard is truncated: expected 16 bytes"):
        ShardSet(str(tmp_path / "s"))
    (tmp_path / "s" / "index.json").write_text("{not json")
    with pytest.raises(UserInputError, match=r"index\.json: shard set index is not valid JSON"):
        ShardSet(str(tmp_path / "s"))
    os.remove(tmp_path / "s" / "index.json")
    with pytest.raises(UserInputError, match="incomplete shard set .*no index.json"):
        ShardSet(str(tmp_path / "s"))
    with pytest.raises(UserInputError, match="no token shards"):
        os.makedirs(tmp_path / "empty")
        ShardSet(str(tmp_path / "empty"))


def test_writer_rejects_ids_outside_the_vocab(tmp_path):
    w = ShardWriter(str(tmp_path / "s"), tokenizer="t", vocab_size=10, eos_id=9)
    with pytest.raises(UserInputError, match=r"id 12 outside 0\.\.9"):
        w.add(np.array([1, 12]))


def test_token_id_at_or_above_model_vocab_is_an_error(tmp_path):
    _write(tmp_path / "s", [[1, 2, 3], [250, 299]])
    store = ShardSet(str(tmp_path / "s"))
    store.check_vocab(300)
    with pytest.raises(UserInputError, match=r"contains token id 299 >= model vocab size 299 .*test-tok"):
        store.check_vocab(299)


def test_memmap_source_in_training(tmp_path):
    docs = [f"shard text {i} " * 4 for i in range(40)]
    tokenize_to_shards(docs, ByteTokenizer(), str(tmp_path / "s"), shard_tokens=300)
    cfg = DataConfig(
        sources=[DataSourceConfig(path=str(tmp_path / "s"))],
        seq_len=32,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "c"),
        num_workers=0,
    )
    bundle = build_datasets(cfg, model_vocab_size=258, progress=False)
    assert bundle.sources[0].kind == "memmap" and bundle.sources[0].cache_path is None
    batch = bundle.train_sampler(4).next_batch()
    assert batch.shape == (4, 33) and int(batch.max()) <= 256
    assert not os.path.exists(tmp_path / "c")  # pre-tokenized data is never re-cached


def test_memmap_source_with_another_tokenizer_is_refused(tmp_path):
    _write(tmp_path / "s", [[1, 2, 299]] * 50, shard_tokens=1000)
    cfg = DataConfig(
        sources=[DataSourceConfig(path=str(tmp_path / "s"), kind="memmap")],
        seq_len=8,
        val_fraction=0.0,
        cache_dir=str(tmp_path / "c"),
    )
    with pytest.raises(
        UserInputError, match=r"tokenized with 'test-tok' \(vocab 300, eos 299\) but data.tokenizer is 'byte'"
    ):
        build_datasets(cfg, progress=False)
