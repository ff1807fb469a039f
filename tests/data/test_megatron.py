"""Megatron .bin/.idx interop: files written by megatron-core's own IndexedDatasetBuilder read back exactly,
train through the normal loader, and fail clearly when truncated or when megatron-core is missing."""

import importlib.util
import sys

import numpy as np
import pytest

from attnres_train.config.data import DataConfig, DataSourceConfig
from attnres_train.config.errors import UserInputError
from attnres_train.data import megatron as mg

EOS = 256


def _docs():
    rng = np.random.default_rng(0)
    return [np.append(rng.integers(0, 256, size=int(n)), EOS) for n in rng.integers(5, 60, size=40)]


def _write(prefix, docs, dtype=np.uint16):
    import torch

    IndexedDataset = mg.import_indexed_dataset()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_item(torch.from_numpy(d.astype(np.int64)))
        b.end_document()
    b.finalize(prefix + ".idx")
    return IndexedDataset


# find_spec is instant; importing megatron-core takes seconds, so only the tests that need it pay for it.
def _installed() -> bool:
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ImportError:  # no 'megatron' parent package
        return False


needs_mcore = pytest.mark.skipif(not _installed(), reason="megatron-core not installed ([megatron] extra)")


@needs_mcore
def test_reads_what_megatron_core_wrote(tmp_path):
    docs = _docs()
    prefix = str(tmp_path / "corpus_text_document")
    IndexedDataset = _write(prefix, docs)
    store = mg.MegatronStore(prefix + ".bin", eos_id=EOS)  # prefix or either file name works
    assert store.num_docs == len(docs)
    assert all(store.document(i).tolist() == d.tolist() for i, d in enumerate(docs))
    ref = IndexedDataset(prefix)
    assert ref[7].tolist() == store.document(7).tolist()
    assert store.max_token_id() == max(int(d.max()) for d in docs)


@needs_mcore
def test_megatron_source_trains_through_the_loader(tmp_path):
    from attnres_train.data.loader import build_datasets

    docs = _docs()
    prefix = str(tmp_path / "mg")
    _write(prefix, docs, dtype=np.int32)
    cfg = DataConfig(
        sources=[DataSourceConfig(path=prefix)],
        seq_len=16,
        val_fraction=0.0,
        cache_dir=str(tmp_path / "c"),
        num_workers=0,
    )
    bundle = build_datasets(cfg, model_vocab_size=258, progress=False)
    assert bundle.sources[0].kind == "megatron"
    stream = np.concatenate(docs)  # used as-is: the documents already end with EOS
    batch = bundle.train_sampler(4).next_batch().numpy()
    _, _, k = bundle.train.locate(np.arange(4))
    for row, kk in zip(batch, k):
        assert row.tolist() == stream[kk * 16 : kk * 16 + 17].tolist()
    with pytest.raises(UserInputError, match=r"mg: contains token id 256 >= model vocab size 256"):
        mg.MegatronStore(prefix).check_vocab(256)


@needs_mcore
def test_truncated_megatron_bin_is_named(tmp_path):
    prefix = str(tmp_path / "t")
    _write(prefix, _docs())
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserInputError, match=r"t\.bin: truncated Megatron data file"):
        mg.MegatronStore(prefix)
    with pytest.raises(UserInputError, match=r"missing\.idx: Megatron dataset file not found"):
        mg.MegatronStore(str(tmp_path / "missing"))


def test_missing_megatron_core_tells_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.indexed_dataset", None)  # import now fails
    with pytest.raises(UserInputError, match=r"pip install 'attnres-train\[megatron\]'"):
        mg.import_indexed_dataset()


@needs_mcore
def test_vocab_check_scans_once_and_is_cached_next_to_the_data(tmp_path, monkeypatch):
    docs = _docs()
    prefix = str(tmp_path / "cached")
    _write(prefix, docs)
    want = max(int(d.max()) for d in docs)
    assert mg.MegatronStore(prefix).max_token_id() == want  # first start: one pass over the .bin
    real_read = mg.MegatronStore.read

    def no_scan(self, buffer, start, length):
        raise AssertionError("scanned the .bin again")

    monkeypatch.setattr(mg.MegatronStore, "read", no_scan)
    assert mg.MegatronStore(prefix).max_token_id() == want  # later starts: the cached range
    _write(prefix, docs[:5] + [np.array([300, EOS])])  # the data changed: the stamp no longer matches
    monkeypatch.setattr(mg.MegatronStore, "read", real_read)
    assert mg.MegatronStore(prefix).max_token_id() == 300
