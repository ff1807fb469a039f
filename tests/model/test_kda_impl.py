"""KDA implementation choice on CUDA, proven on CPU with a simulated fla: nothing falls back or is ignored silently.

* ``impl=auto`` on CUDA without fla warns once (the torch chunked form is many times slower) and uses it;
* ``impl=fla`` without fla is a ConfigError naming ``model.kda.impl``;
* ``model.kda.chunk_size`` reaches fla's ``chunk_kda`` (which supports 32 / 64 only); other sizes, or a
  non-default size with an fla whose ``chunk_kda`` takes no ``chunk_size``, are a ConfigError naming the field.
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from attnres_train.config.errors import ConfigError
from attnres_train.config.model import KDAConfig, ModelConfig
from attnres_train.model import kda as kda_mod
from attnres_train.model.kda import KimiDeltaAttention

CUDA = torch.device("cuda")  # resolve_core only reads the device type: no GPU is needed


def _layer(impl, chunk_size=64):
    cfg = ModelConfig(hidden_size=32)
    cfg.kda = KDAConfig(num_heads=2, head_dim=16, chunk_size=chunk_size, impl=impl)
    return KimiDeltaAttention(cfg)


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(kda_mod, "_CORE_CACHE", {})
    monkeypatch.setattr(kda_mod, "_warned_fallback", False)
    return monkeypatch


def _no_fla(mp):
    for name in ("fla", "fla.ops", "fla.ops.kda"):
        mp.setitem(sys.modules, name, None)  # "import fla.ops.kda" raises ImportError


def _fake_fla(mp, with_chunk_size=True):
    calls = []
    if with_chunk_size:

        def chunk_kda(
            q,
            k,
            v,
            g,
            beta,
            scale=None,
            initial_state=None,
            output_final_state=False,
            use_qk_l2norm_in_kernel=False,
            chunk_size=64,
        ):
            calls.append(chunk_size)
            return v, None
    else:

        def chunk_kda(
            q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False
        ):
            calls.append(None)
            return v, None

    pkg = types.ModuleType("fla")
    ops = types.ModuleType("fla.ops")
    mod = types.ModuleType("fla.ops.kda")
    mod.chunk_kda = chunk_kda
    pkg.ops, ops.kda = ops, mod
    for name, m in (("fla", pkg), ("fla.ops", ops), ("fla.ops.kda", mod)):
        mp.setitem(sys.modules, name, m)
    return calls


def test_auto_without_fla_warns_once_and_falls_back(fresh):
    _no_fla(fresh)
    with pytest.warns(RuntimeWarning, match="fla's chunk_kda is unavailable.*falls back"):
        assert _layer("auto").resolve_core(CUDA) == "chunk"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second layer, another chunk size, another call: silent
        assert _layer("auto").resolve_core(CUDA) == "chunk"
        assert _layer("auto", chunk_size=16).resolve_core(CUDA) == "chunk"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _layer("auto").resolve_core(torch.device("cpu")) == "chunk"  # CPU: expected, no warning


def test_fla_requested_but_unavailable_is_a_config_error(fresh):
    _no_fla(fresh)
    with pytest.raises(ConfigError) as e:
        _layer("fla").resolve_core(CUDA)
    assert e.value.field == "model.kda.impl"


@pytest.mark.parametrize("impl", ["auto", "fla"])
def test_chunk_size_is_validated_and_passed_to_fla(fresh, impl):
    calls = _fake_fla(fresh)
    with pytest.raises(ConfigError) as e:
        _layer(impl, chunk_size=16).resolve_core(CUDA)
    assert e.value.field == "model.kda.chunk_size" and "32 or 64" in str(e.value)
    assert _layer(impl, chunk_size=32).resolve_core(CUDA) == "fla"
    x = torch.zeros(1, 4, 2, 16)
    kda_mod._run_fla(
        32,
        q=x,
        k=x,
        v=x,
        g=x,
        beta=x[..., 0],
        scale=0.25,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=True,
    )
    assert calls == [32]


def test_fla_without_chunk_size_argument_accepts_only_its_default(fresh):
    calls = _fake_fla(fresh, with_chunk_size=False)
    assert _layer("fla", chunk_size=64).resolve_core(CUDA) == "fla"
    with pytest.raises(ConfigError) as e:
        _layer("fla", chunk_size=32).resolve_core(CUDA)
    assert e.value.field == "model.kda.chunk_size" and "no chunk_size argument" in str(e.value)
    x = torch.zeros(1, 4, 2, 16)
    kda_mod._run_fla(64, q=x, k=x, v=x, g=x, beta=x[..., 0])
    assert calls == [None]
