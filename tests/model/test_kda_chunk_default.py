"""``model.kda.chunk_size: null`` (the default and the tiny / demo presets): each KDA core uses its own chunk.

The presets used to pin 16, which fla's kernel refuses, so the default ``make train`` stopped with a ConfigError
on a GPU with fla. With null, fla (simulated here on CPU, as in ``test_kda_impl.py``) is chosen without error and
gets its default 64, while the torch chunked form keeps 16: CPU results are bitwise those of ``chunk_size=16``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from attnres_train.config.errors import ConfigError
from attnres_train.config.model import KDAConfig, ModelConfig, as_model_config, validate_model_config
from attnres_train.model import kda as kda_mod
from attnres_train.model.flops import forward_flops_per_token
from attnres_train.model.kda import KimiDeltaAttention
from tests.model.test_kda_impl import CUDA, _fake_fla, fresh  # noqa: F401  (fixture)

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "model"


def _layer(chunk_size, impl="auto"):
    cfg = ModelConfig(hidden_size=32)
    cfg.kda = KDAConfig(num_heads=2, head_dim=16, chunk_size=chunk_size, impl=impl)
    return KimiDeltaAttention(cfg)


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_small_presets_pick_fla_on_cuda_without_a_config_error(fresh, name):  # noqa: F811
    cfg = validate_model_config(as_model_config(OmegaConf.load(PRESETS / f"{name}.yaml")))
    assert cfg.kda.chunk_size is None
    _fake_fla(fresh)
    assert KimiDeltaAttention(cfg).resolve_core(CUDA) == "fla"


def test_null_chunk_gives_fla_its_default(fresh):  # noqa: F811
    calls = _fake_fla(fresh)
    assert _layer(None, impl="fla").resolve_core(CUDA) == "fla"
    x = torch.zeros(1, 4, 2, 16)
    kda_mod._run_fla(_layer(None).chunk_size or kda_mod.FLA_DEFAULT_CHUNK, q=x, k=x, v=x, g=x, beta=x[..., 0])
    assert calls == [64]


def test_null_chunk_keeps_the_cpu_path_at_16(monkeypatch):
    seen = []
    chunked = kda_mod.kda_chunked
    monkeypatch.setattr(kda_mod, "kda_chunked", lambda *a, **kw: seen.append(kw["chunk_size"]) or chunked(*a, **kw))
    torch.manual_seed(0)
    auto, pinned = _layer(None), _layer(16)
    pinned.load_state_dict(auto.state_dict())
    x = torch.randn(2, 40, 32)
    assert torch.equal(auto(x), pinned(x))  # bitwise: the CPU results of the old presets
    assert seen == [16, 16]


def test_null_chunk_validates_and_counts_fla_flops():
    cfg = ModelConfig()
    assert cfg.kda.chunk_size is None
    validate_model_config(cfg)
    bad = ModelConfig()
    bad.kda.chunk_size = 0
    with pytest.raises(ConfigError) as e:
        validate_model_config(bad)
    assert e.value.field == "model.kda.chunk_size"
    pinned = ModelConfig()
    pinned.kda.chunk_size = 64
    assert forward_flops_per_token(cfg, 128) == forward_flops_per_token(pinned, 128)  # MFU: the GPU path's chunk


def test_null_chunk_is_32_on_the_cpu_path_for_wide_heads(monkeypatch):
    """head_dim >= 128 (f1-f5, f1/f2 use null): the torch core runs chunk 32 (its CPU optimum), fla keeps 64."""
    seen = []
    chunked = kda_mod.kda_chunked
    monkeypatch.setattr(kda_mod, "kda_chunked", lambda *a, **kw: seen.append(kw["chunk_size"]) or chunked(*a, **kw))
    cfg = ModelConfig(hidden_size=32)
    cfg.kda = KDAConfig(num_heads=1, head_dim=128, chunk_size=None)
    auto = KimiDeltaAttention(cfg)
    cfg.kda = KDAConfig(num_heads=1, head_dim=128, chunk_size=32)
    pinned = KimiDeltaAttention(cfg)
    pinned.load_state_dict(auto.state_dict())
    x = torch.randn(1, 40, 32)
    assert torch.equal(auto(x), pinned(x))
    assert seen == [32, 32]
    for name in ("f1", "f2"):
        preset = validate_model_config(as_model_config(OmegaConf.load(PRESETS / f"{name}.yaml")))
        assert preset.kda.chunk_size is None and preset.kda.head_dim == 128
