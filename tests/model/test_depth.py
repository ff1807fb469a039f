"""Two-phase AttnRes (batched phase 1 + online-softmax phase 2) equals the direct softmax over all sources."""

import pytest
import torch

from attnres_train.model.depth import DepthState, depth_read, mix_direct, phase1, phase2


def _sources(n, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 5, 16, generator=g, dtype=dtype) * scale * (j + 1)).requires_grad_() for j in range(n)]


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("n_blocks", [1, 2, 5])
@pytest.mark.parametrize("with_partial", [False, True])
def test_two_phase_equals_direct_values_and_grads(n_blocks, with_partial, impl):
    blocks = _sources(n_blocks)
    partial = _sources(1, seed=7)[0] if with_partial else None
    q_sd = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    eps = 1e-6
    stats = phase1(blocks, q_sd, eps, impl)
    two = torch.stack([phase2(stats[s], partial, q_sd[s], eps, torch.float64, impl) for s in range(3)])
    srcs = blocks + ([partial] if partial is not None else [])
    direct = torch.stack([mix_direct(srcs, q_sd[s], eps) for s in range(3)])
    torch.testing.assert_close(two, direct, rtol=1e-12, atol=1e-12)

    w = torch.randn_like(direct)
    inputs = srcs + [q_sd]
    g_two = torch.autograd.grad((two * w).sum(), inputs)
    g_dir = torch.autograd.grad((direct * w).sum(), inputs)
    for a, b in zip(g_two, g_dir):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_two_phase_is_stable_for_huge_logits(impl):
    blocks = _sources(4, dtype=torch.float32)
    partial = _sources(1, dtype=torch.float32, seed=3)[0]
    q = torch.randn(16, generator=torch.Generator().manual_seed(5)) * 200.0  # logits ~1e3: naive exp overflows fp32
    stats = phase1(blocks, q[None], 1e-6, impl)[0]
    two = phase2(stats, partial, q, 1e-6, torch.float32, impl)
    direct = mix_direct(blocks + [partial], q, 1e-6)
    assert torch.isfinite(two).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(two.sum(), blocks + [partial]))
    # fp32 logits of magnitude ~1e3 carry ~6e-5 of rounding (one ulp), and the two paths round differently
    torch.testing.assert_close(two, direct, rtol=2e-4, atol=2e-4)


def test_zero_query_gives_uniform_average_and_values_stay_raw():
    blocks = _sources(3)
    q = torch.zeros(16, dtype=torch.float64)
    out = depth_read(DepthState(blocks=blocks, partial=None), 0, q, 1e-6, two_phase=True)
    torch.testing.assert_close(out, sum(blocks) / 3)


def test_single_source_read_is_identity():
    (emb,) = _sources(1)
    out = depth_read(DepthState(blocks=[emb], partial=None), 0, torch.randn(16, dtype=torch.float64), 1e-6, True)
    assert out is emb


def test_bf16_sources_mix_in_fp32():
    blocks = [b.detach().bfloat16() for b in _sources(3, dtype=torch.float32)]
    q = torch.randn(16)
    out = mix_direct(blocks, q, 1e-6)
    assert out.dtype == torch.bfloat16
    ref = mix_direct([b.float() for b in blocks], q, 1e-6)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


# -- implementation dispatch (model.residual.impl); the kernels themselves are tested in tests/kernels --------


def test_impl_resolution_on_cpu():
    from attnres_train.model.depth import resolve_impl

    x = torch.zeros(2, 3, 8)
    assert resolve_impl("torch", x) == "torch"
    assert resolve_impl("auto", x) == "torch"  # auto picks the kernels only for CUDA tensors
    assert resolve_impl("triton", x.double()) == "torch"  # the kernels accumulate in fp32: fp64 stays torch
    assert resolve_impl("reference", x) == "reference"
    # Tensor parallelism mixes local shards through its DepthViews seam: tests/parallel/test_tp_depth_memory.py


def test_triton_on_cpu_outside_the_interpreter_is_a_config_error(monkeypatch):
    import attnres_kernels

    from attnres_train.config.errors import ConfigError
    from attnres_train.model.depth import resolve_impl

    monkeypatch.setattr(attnres_kernels, "triton_importable", lambda: True)
    monkeypatch.setattr(attnres_kernels, "interpreted", lambda: False)
    blocks = [b.detach().float() for b in _sources(2)]
    with pytest.raises(ConfigError) as info:
        depth_read(DepthState(blocks=blocks, partial=None), 0, torch.randn(16), 1e-6, True, impl="triton")
    assert info.value.field == "model.residual.impl" and "TRITON_INTERPRET=1" in str(info.value)
    with pytest.raises(ConfigError):
        resolve_impl("cuda", blocks[0])


def test_triton_impl_without_the_package_fails_at_build(monkeypatch):
    import importlib.util

    from attnres_train.config.errors import ConfigError
    from attnres_train.config.model import ModelConfig, validate_model_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    cfg = ModelConfig()
    cfg.residual.impl = "triton"
    with pytest.raises(ConfigError) as info:
        validate_model_config(cfg)
    assert info.value.field == "model.residual.impl"
    cfg.residual.impl = "auto"
    validate_model_config(cfg)


def test_default_impl_is_auto():
    from attnres_train.config.model import ModelConfig

    assert ModelConfig().residual.impl == "auto"
