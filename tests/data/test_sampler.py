"""The global-position sampler: determinism, resume, resume on another dp degree, prefetch, validation
iteration, the shard cache, and config validation."""

import json

import numpy as np
import pytest
import torch

from attnres_train.config.data import DataConfig, DataSourceConfig, as_data_config, validate_data_config
from attnres_train.config.errors import ConfigError, UserInputError
from attnres_train.data import loader
from attnres_train.data.loader import GlobalBatchSampler, build_datasets


def _corpus(tmp_path):
    d, j = tmp_path / "corpus", tmp_path / "extra.jsonl"
    if d.exists():  # written once per test: rewriting would change mtimes and so the cache key
        return d, j
    d.mkdir()
    for i in range(60):
        (d / f"doc{i:03d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * (3 + i % 7))
    j.write_text("".join(json.dumps({"text": f"json record {i} zzz"}) + "\n" for i in range(80)))
    return d, j


def _cfg(tmp_path, **kw):
    d, j = _corpus(tmp_path)
    base = dict(
        sources=[DataSourceConfig(path=str(d), weight=3.0), DataSourceConfig(path=str(j), weight=1.0)],
        seq_len=16,
        val_fraction=0.1,
        seed=11,
        cache_dir=str(tmp_path / "cache"),
        num_workers=0,
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def bundle(tmp_path):
    return build_datasets(_cfg(tmp_path), progress=False)


def _take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_batches_shape_dtype_and_deterministic_across_constructions(tmp_path, bundle):
    a = _take(bundle.train_sampler(8), 5)
    again = build_datasets(_cfg(tmp_path), progress=False)  # second construction (from the cache)
    b = _take(again.train_sampler(8), 5)
    assert a[0].shape == (8, 17) and a[0].dtype == torch.long
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])


def test_resume_continues_with_identical_batches(bundle):
    s = bundle.train_sampler(8)
    _take(s, 3)
    state = s.state_dict()
    assert state["consumed_samples"] == 24 and state["seed"] == 11 and "epoch" in state
    expected = _take(s, 4)
    fresh = bundle.train_sampler(8)
    fresh.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, _take(fresh, 4)))


@pytest.mark.parametrize("dp_size", [2, 4])
def test_resume_on_another_dp_degree_keeps_the_global_position(bundle, dp_size):
    single = bundle.train_sampler(8, dp_rank=0, dp_size=1)
    _take(single, 3)
    state = single.state_dict()
    want = _take(single, 2)
    ranks = [bundle.train_sampler(8, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for r in ranks:
        r.load_state_dict(state)
    for step in range(2):
        parts = [r.next_batch() for r in ranks]
        assert all(p.shape == (8 // dp_size, 17) for p in parts)
        assert torch.equal(torch.cat(parts), want[step])  # union of ranks == the single-rank batch
    assert all(r.state_dict()["consumed_samples"] == single.state_dict()["consumed_samples"] for r in ranks)


def test_prefetch_workers_give_the_same_batches(bundle):
    sync = _take(bundle.train_sampler(4, num_workers=0), 6)
    pre = bundle.train_sampler(4, num_workers=2)
    try:
        got = _take(pre, 3)
        st = pre.state_dict()
        assert st["consumed_samples"] == 12  # prefetched batches are not counted as consumed
        pre.load_state_dict({**st, "consumed_samples": 4})  # jump back: stale prefetches are dropped
        got += _take(pre, 3)
    finally:
        pre.close()
    assert all(torch.equal(x, y) for x, y in zip(got[:3], sync[:3]))
    assert all(torch.equal(x, y) for x, y in zip(got[3:], sync[1:4]))


def test_blend_ratio_and_epoch_bookkeeping(bundle):
    s = bundle.train_sampler(32)
    batches = torch.cat(_take(s, 20))
    # Only jsonl records contain 'z', and every 17-token window of the jsonl stream contains one.
    from_json = (batches == ord("z")).any(dim=1).float().mean().item()
    assert abs(from_json - 0.25) <= 2 / 640  # weight 1 of 4, exact up to the schedule's ±2
    st = s.state_dict()
    assert st["source_epochs"] == bundle.train.source_epochs(640) and st["epoch"] == min(st["source_epochs"])


def test_seed_mismatch_on_resume_is_a_config_error(tmp_path, bundle):
    state = bundle.train_sampler(8).state_dict()
    other = build_datasets(_cfg(tmp_path, seed=12), progress=False)
    with pytest.raises(ConfigError, match="data.seed"):
        other.train_sampler(8).load_state_dict(state)


def test_sampler_argument_errors(bundle):
    with pytest.raises(ConfigError, match="not divisible"):
        GlobalBatchSampler(bundle.train, 10, dp_rank=0, dp_size=4)
    with pytest.raises(ConfigError, match="dp_rank"):
        GlobalBatchSampler(bundle.train, 8, dp_rank=2, dp_size=2)


def test_validation_split_is_held_out_and_sharded_evenly(bundle):
    for src in bundle.sources:
        train_docs = {
            bytes(src.store.document(i).astype(np.uint8)[:-1])
            for i in range(src.store.num_docs)
            if src.store.document(i).size
        }
        assert src.val.num_docs >= 1 and src.train.num_docs + src.val.num_docs == src.store.num_docs
        assert src.val.num_tokens + src.train.num_tokens == src.store.num_tokens
        assert len(train_docs) == src.store.num_docs  # documents are distinct, so the split is by document
    val = bundle.val
    assert val.num_samples > 0
    full = torch.cat(list(val.batches(4)))
    halves = [list(val.batches(2, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(halves[0]) == len(halves[1])  # equal batch counts on every rank
    interleaved = torch.cat([torch.cat([a, b]) for a, b in zip(*halves)])
    assert torch.equal(interleaved, full[: interleaved.shape[0]])
    assert torch.equal(torch.cat(list(val.batches(4))), full)  # a fresh iterator repeats the same set


def test_cache_makes_the_second_build_skip_tokenization(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    first = build_datasets(cfg, progress=False)
    assert all(s.cache_path and s.cache_path.startswith(str(tmp_path / "cache")) for s in first.sources)

    def boom(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(loader, "tokenize_to_shards", boom)
    second = build_datasets(cfg, progress=False)
    assert [s.cache_path for s in second.sources] == [s.cache_path for s in first.sources]
    with pytest.raises(AssertionError, match="tokenized again"):  # other limits → other cache entry
        build_datasets(_cfg(tmp_path, max_docs=10), progress=False)


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data.seq_len"):
        validate_data_config(DataConfig(seq_len=0))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight"):
        validate_data_config(DataConfig(sources=[DataSourceConfig(path="x", weight=-1.0)]))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].kind"):
        validate_data_config(DataConfig(sources=[DataSourceConfig(path="x", kind="csv")]))
    with pytest.raises(ConfigError, match="data.val_fraction"):
        validate_data_config(DataConfig(val_fraction=1.0))
    with pytest.raises(ConfigError, match="data.sources"):
        validate_data_config(DataConfig(sources=[]))
    cfg = as_data_config({"sources": [{"path": "stdlib", "weight": 2}], "seq_len": 32})
    assert isinstance(cfg.sources[0], DataSourceConfig) and cfg.sources[0].weight == 2.0


def test_model_vocab_smaller_than_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_datasets(_cfg(tmp_path), model_vocab_size=100, progress=False)


def test_val_fraction_without_enough_val_tokens_is_an_error(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("x" * 500)
    cfg = DataConfig(sources=[DataSourceConfig(path=str(f))], seq_len=16, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserInputError, match="val_fraction"):
        build_datasets(cfg, progress=False)
    cfg.val_fraction = 0.0
    assert build_datasets(cfg, progress=False).val.num_samples == 0
