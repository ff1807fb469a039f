"""data.val_sources: every document of each held-out source, packed to seq_len, instead of the val_fraction slice.

The expected samples are built here from the files' bytes (byte tokenizer: one id per byte, EOS 256 after each
document, files in sorted order), not from the loader's streams.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnres_train.config.errors import ConfigError, UserInputError
from attnres_train.config.run import TrainerConfig, validate_trainer_config
from attnres_train.data.loader import build_datasets
from attnres_train.data.packing import tokenize_to_shards
from attnres_train.data.tokenizer import ByteTokenizer
from tests.train.conftest import write_corpus

SEQ = 32
EOS = 256


def stream_of(files) -> np.ndarray:
    ids = []
    for f in files:
        ids += list(Path(f).read_bytes()) + [EOS]
    return np.array(ids, dtype=np.int64)


def expected_samples(files) -> np.ndarray:
    s = stream_of(files)
    n = (s.size - 1) // SEQ  # the tail after the last full sample is not evaluated
    return np.stack([s[k * SEQ : k * SEQ + SEQ + 1] for k in range(n)])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_sources")
    return write_corpus(root / "train", docs=12), write_corpus(root / "valid", docs=3, seed=5), root


def data_cfg(corpora, **extra):
    train, valid, root = corpora
    cfg = {
        "sources": [{"path": str(train), "kind": "text"}],
        "val_sources": [{"path": str(valid)}, {"path": str(valid / "doc_001.txt"), "name": "one"}],
        "seq_len": SEQ,
        "cache_dir": str(root / "cache"),
        "num_workers": 0,
    }
    cfg.update(extra)
    return cfg


def test_every_document_in_full_and_the_first_k_batches(corpora):
    train, valid, _ = corpora
    data = build_datasets(data_cfg(corpora), progress=False)
    val = data.val
    assert val.separate and val.names == ["valid", "one"]
    want = {"valid": expected_samples(sorted(valid.glob("*.txt"))), "one": expected_samples([valid / "doc_001.txt"])}
    for name, exp in want.items():
        full = np.concatenate([b.numpy() for b in val.batches(4, source=name)])
        assert full.shape == exp.shape and np.array_equal(full, exp), name
        first = np.concatenate([b.numpy() for b in val.batches(3, max_batches=2, source=name)])
        assert np.array_equal(first, exp[:6]), name
    # the training sources keep every document: val_fraction defaults to 0 with val_sources
    assert data.sources[0].train.num_tokens == stream_of(sorted(train.glob("*.txt"))).size
    assert data.sources[0].val.num_tokens == 0


def test_a_prepared_shard_set_as_val_source(corpora):
    _, valid, root = corpora
    files = sorted(valid.glob("*.txt"))
    shards = root / "shards"
    tokenize_to_shards((f.read_text() for f in files), ByteTokenizer(), str(shards), shard_tokens=500)  # 2+ shards
    val = build_datasets(data_cfg(corpora, val_sources=[{"path": str(shards), "name": "prepared"}]), progress=False).val
    got = np.concatenate([b.numpy() for b in val.batches(5, source="prepared")])
    assert np.array_equal(got, expected_samples(files))


def test_val_fraction_default_and_explicit(corpora):
    plain = {k: v for k, v in data_cfg(corpora).items() if k != "val_sources"}
    default = build_datasets(plain, progress=False)
    explicit = build_datasets({**plain, "val_fraction": 0.01}, progress=False)
    assert not default.val.separate and default.val.num_samples > 0  # null = 0.01 without val_sources
    assert default.sources[0].val.num_tokens == explicit.sources[0].val.num_tokens > 0
    assert build_datasets(data_cfg(corpora, val_fraction=0.0), progress=False).val.separate
    with pytest.raises(ConfigError, match=r"data\.val_fraction.*val_sources"):
        build_datasets(data_cfg(corpora, val_fraction=0.05), progress=False)


def test_bad_val_sources(corpora):
    _, valid, root = corpora
    cfg = data_cfg(corpora)
    with pytest.raises(ConfigError, match=r"data\.val_sources\[0\]\.weight"):
        build_datasets({**cfg, "val_sources": [{"path": str(valid), "weight": 2.0}]}, progress=False)
    with pytest.raises(ConfigError, match=r"data\.val_sources\[1\]\.name"):
        two = [{"path": str(valid), "name": "a"}, {"path": str(valid), "name": "a"}]
        build_datasets({**cfg, "val_sources": two}, progress=False)
    with pytest.raises(UserInputError, match=r"data\.val_sources\[0\]\.path.*does not exist"):
        build_datasets({**cfg, "val_sources": [{"path": str(root / "missing.txt")}]}, progress=False)
    short = root / "short.txt"
    short.write_text("tiny")
    with pytest.raises(UserInputError, match=r"data\.val_sources\[0\].*fewer than seq_len \+ 1"):
        build_datasets({**cfg, "val_sources": [{"path": str(short)}]}, progress=False)


def test_trainer_val_batches_null_means_all():
    validate_trainer_config(TrainerConfig(val_batches=None))
    with pytest.raises(ConfigError, match=r"trainer\.val_batches"):
        validate_trainer_config(TrainerConfig(val_batches=0))
