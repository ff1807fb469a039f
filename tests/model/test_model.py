"""The reference model: residual modes, block semantics, zero-init equivalence, the cuttable forward."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attnres_train.config.model import block_starts
from attnres_train.model.depth import mix_direct

from .helpers import assert_rel_close, build, grads, randomize_queries, tiny_cfg

IDS = torch.randint(0, 1024, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "mode,nb,bs", [("full", None, None), ("block", 2, None), ("block", 1, None), ("block", None, 3)]
)
def test_zero_init_attnres_equals_prenorm_fp64(mode, nb, bs):
    # With w = 0 the mix is the uniform average = residual stream / n, and every consumer of a sublayer input
    # starts with an RMSNorm, so the function equals PreNorm up to the RMSNorm eps. eps -> 1e-30 makes it exact.
    base_cfg = tiny_cfg(num_layers=6, rms_norm_eps=1e-30)
    base = build(base_cfg)
    attn = build(tiny_cfg(mode, nb, bs, num_layers=6, rms_norm_eps=1e-30), seed=123)
    missing, unexpected = attn.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert missing and all("_res_" in k for k in missing), missing
    assert all(float(p.detach().abs().max()) == 0 for n, p in attn.named_parameters() if n.endswith("_res_proj.weight"))
    torch.testing.assert_close(attn(IDS), base(IDS), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "mode,nb,bs", [("block", 2, None), ("block", None, 3), ("block", 4, None), ("full", None, None)]
)
def test_two_phase_equals_direct_model_outputs_and_all_grads(mode, nb, bs):
    cfg = tiny_cfg(mode, nb, bs, num_layers=5)
    m1 = build(cfg)
    randomize_queries(m1)
    m2 = build(replace(cfg, residual=replace(cfg.residual, two_phase=False)))
    m2.load_state_dict(m1.state_dict())
    y1, y2 = m1(IDS), m2(IDS)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    g1, g2 = grads(m1), grads(m2)
    for name in g1:
        assert_rel_close(g1[name], g2[name], 1e-10, name)
    assert any(float(g.abs().sum()) > 0 for n, g in g1.items() if "_res_proj" in n)


def _k3_reference(model, ids, block_size):
    """Independent implementation of the Kimi-K3 / paper pseudocode (attnres.md §3) with direct softmax."""
    eps = model.eps
    bank, prefix = [], model.model.embed_tokens(ids)
    for idx, layer in enumerate(model.model.layers):
        q_attn, q_mlp = layer.queries()
        x = mix_direct(bank + [prefix], q_attn, eps) if bank else prefix
        if idx % block_size == 0:
            bank.append(prefix)
            prefix = None
        y = layer.self_attn(layer.input_layernorm(x))
        prefix = y if prefix is None else prefix + y
        x = mix_direct(bank + [prefix], q_mlp, eps)
        ffn = (
            layer.block_sparse_moe(layer.post_attention_layernorm(x))[0]
            if layer.is_moe
            else layer.mlp(layer.post_attention_layernorm(x))
        )
        prefix = prefix + ffn
    h = mix_direct(bank + [prefix], model.output_query(), eps)
    return model.lm_head(model.model.norm(h))


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_block_semantics_match_k3_pseudocode(block_size):
    model = build(tiny_cfg("block", block_size=block_size, num_layers=5))
    randomize_queries(model)
    torch.testing.assert_close(model(IDS), _k3_reference(model, IDS, block_size), rtol=1e-10, atol=1e-10)


def test_block_partition_rules():
    # num_blocks: exactly N blocks, the last one takes the remainder (paper); block_size: K3-style tail.
    assert block_starts(tiny_cfg("block", num_blocks=4, num_layers=10)) == [0, 4, 8, 12]
    assert block_starts(tiny_cfg("block", block_size=3, num_layers=10)) == [0, 6, 12, 18]
    assert block_starts(tiny_cfg("full", num_layers=3)) == [0, 1, 2, 3, 4, 5]
    assert block_starts(tiny_cfg("prenorm")) == []


def test_full_mode_output_sees_every_sublayer_and_embedding():
    model = build(tiny_cfg("full", num_layers=3))
    state = model.forward_layers(model.embed(IDS))
    assert len(state.blocks) + 1 == 2 * 3 + 1  # v_0 (embedding) ... v_L
    block = build(tiny_cfg("block", num_blocks=3, num_layers=3))
    assert len(block.forward_layers(block.embed(IDS)).blocks) == 3  # b_0, b_1, b_2; b_3 is the partial


@pytest.mark.parametrize("mode,nb", [("prenorm", None), ("block", 2), ("full", None)])
@pytest.mark.parametrize("cut", [1, 2, 3])
def test_forward_is_cuttable_between_any_layers(mode, nb, cut):
    model = build(tiny_cfg(mode, nb, num_layers=5))
    randomize_queries(model)
    s = model.forward_layers(model.embed(IDS), 0, cut)
    assert s.phase1 == {}
    # what a pipeline stage would receive: plain tensors, detached
    s = replace(s, blocks=[b.detach() for b in s.blocks], partial=None if s.partial is None else s.partial.detach())
    out = model.head(model.forward_layers(s, cut, None))
    torch.testing.assert_close(out, model(IDS), rtol=1e-12, atol=1e-12)


def test_moe_aux_loss_and_router_bias_update():
    cfg = tiny_cfg("block", num_blocks=2)
    cfg.moe.seq_aux_loss_coef = 1e-2
    model = build(cfg, dtype=torch.float32)
    labels = torch.roll(IDS, -1, 1)
    ce, aux = model.loss(IDS, labels)
    assert aux is not None and aux.item() > 0 and ce.item() > 0
    (ce + aux).backward()
    before = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    model.update_router_biases()
    after = [m.gate.e_score_correction_bias for m in model.moe_layers()]
    assert len(before) == 3 and any(not torch.equal(a, b) for a, b in zip(before, after))


def test_depth_attention_weights_sum_to_one_and_start_uniform():
    model = build(tiny_cfg("block", num_blocks=2), dtype=torch.float32)
    weights = model.depth_attention(IDS)
    assert len(weights) == 2 * 4 + 1
    for w in weights:
        torch.testing.assert_close(w.sum(0), torch.ones_like(w[0]))
        torch.testing.assert_close(w, torch.full_like(w, 1.0 / w.shape[0]))


def test_bf16_forward_is_finite():
    model = build(tiny_cfg("block", num_blocks=2), dtype=torch.bfloat16)
    randomize_queries(model)
    assert torch.isfinite(model(IDS).float()).all()


def test_model_package_has_no_distributed_imports():
    root = Path(__file__).resolve().parents[2] / "attnres_train" / "model"
    files = list(root.glob("*.py"))
    assert len(files) >= 8
    pattern = re.compile(r"^\s*(import torch\.distributed|from torch\.distributed|from torch import distributed)", re.M)
    assert [p.name for p in files if pattern.search(p.read_text())] == []
