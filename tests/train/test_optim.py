"""Parameter groups, Muon split and 3-D handling, LR schedules, clipping, and optimizer config validation.

Muon steps use small toy modules: bf16 Newton-Schulz is slow on CPUs without native bf16 matmuls.
"""

import math

import pytest
import torch
from torch import nn

from attnres_train.config.errors import ConfigError
from attnres_train.config.model import ModelConfig, ResidualConfig
from attnres_train.config.train import CheckpointConfig, OptimConfig, validate_checkpoint_config, validate_optim_config
from attnres_train.model import build_model
from attnres_train.parallel.train_step import clip_grad_norm_
from attnres_train.train.optim import (
    BatchedMuon,
    build_optimizers,
    lr_factor,
    param_groups,
    set_lr,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(residual=ResidualConfig(mode="block", num_blocks=2)))


def _membership(groups, model):
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert by_id[id(p)] not in out, f"{by_id[id(p)]} is in two groups"
            out[by_id[id(p)]] = g
    assert set(out) == set(by_id.values()), "every parameter must be in exactly one group"
    return out


class Toy(nn.Module):
    """Embedding, a 2-D hidden matrix, 3-D stacked experts, an AttnRes-like query, a gain and a head."""

    def __init__(self, vocab=16, d=8, experts=3):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d, bias=False)
        self.moe = nn.Module()
        self.moe.experts = nn.Module()
        self.moe.experts.w1 = nn.Parameter(torch.randn(experts, d, d) / math.sqrt(d))
        self.mlp_res_proj = nn.Linear(d, 1, bias=False)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        h = h + torch.tanh(self.proj(h))
        h = h + torch.tanh(torch.einsum("btd,eod->bto", h, self.moe.experts.w1)) / 3
        h = h * self.norm.weight + self.mlp_res_proj(h)
        return self.lm_head(h)


def _toy_loss(model, ids):
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def test_weight_decay_membership(model):
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    member = _membership(groups, model)
    decayed = {n for n, g in member.items() if g["weight_decay"] == 0.1}
    for n in member:
        leaf = n.split(".")[-2:]
        if n.endswith(("_res_proj.weight", "_res_norm.weight", "layernorm.weight", "norm.weight", "A_log", "dt_bias")):
            assert n not in decayed, n
        if "experts" in leaf or n.endswith(("q_proj.weight", "o_proj.weight", "gate.weight", "conv1d.weight")):
            assert n in decayed, n
    assert "model.embed_tokens.weight" not in decayed
    assert "lm_head.weight" in decayed
    assert "model.layers.1.block_sparse_moe.experts.w2" in decayed
    assert "model.output_attn_res_proj.weight" not in decayed
    assert all(g["base_lr"] == g["lr"] == OptimConfig().lr for g in groups)


def test_tied_embedding_is_not_decayed():
    torch.manual_seed(0)
    tied = build_model(ModelConfig(tie_word_embeddings=True))
    member = _membership(param_groups(tied, OptimConfig()), tied)
    assert member["model.embed_tokens.weight"]["weight_decay"] == 0.0


def test_muon_split(model):
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02)
    muon, adamw = build_optimizers(model, cfg)
    assert isinstance(muon, BatchedMuon) and isinstance(muon, torch.optim.Muon)
    assert isinstance(adamw, torch.optim.AdamW)
    member = _membership(muon.param_groups + adamw.param_groups, model)
    in_muon = {n for n, g in member.items() if g["group"] == "muon"}
    assert "model.layers.0.self_attn.q_proj.weight" in in_muon
    assert "model.layers.1.block_sparse_moe.experts.w1" in in_muon  # 3-D stacked experts
    assert "model.layers.1.block_sparse_moe.gate.weight" in in_muon  # router
    for n in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.mlp_res_proj.weight",
        "model.layers.0.self_attn.q_conv1d.weight",
        "model.layers.0.self_attn.A_log",
        "model.norm.weight",
    ):
        assert n not in in_muon, n
    assert member["lm_head.weight"]["weight_decay"] == cfg.weight_decay
    assert member["model.embed_tokens.weight"]["weight_decay"] == 0.0
    assert muon.param_groups[0]["base_lr"] == 0.02 and muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert all(g["base_lr"] == 1e-3 for g in adamw.param_groups)


def test_torch_muon_rejects_3d_and_batched_muon_matches_per_slice():
    w = torch.randn(3, 12, 8)
    with pytest.raises(ValueError):
        torch.optim.Muon([nn.Parameter(w.clone())])
    for nesterov, adjust in ((True, "match_rms_adamw"), (False, "original")):
        p3 = nn.Parameter(w.clone())
        slices = [nn.Parameter(w[e].clone()) for e in range(3)]
        kw = dict(lr=0.05, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
        opt3, ref = BatchedMuon([p3], **kw), torch.optim.Muon(slices, **kw)
        for _ in range(2):  # second step exercises the momentum buffer
            g = torch.randn(3, 12, 8)
            p3.grad = g.clone()
            for e, s in enumerate(slices):
                s.grad = g[e].clone()
            opt3.step()
            ref.step()
        torch.testing.assert_close(p3.detach(), torch.stack([s.detach() for s in slices]), atol=1e-6, rtol=0)
        assert not torch.equal(p3.detach(), w)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_one_step_decreases_toy_loss(name):
    torch.manual_seed(0)
    toy = Toy()
    ids = torch.randint(0, 16, (4, 12))
    opts = build_optimizers(toy, OptimConfig(name=name, lr=2e-2, weight_decay=0.0))
    assert [type(o) for o in opts] == ([torch.optim.AdamW] if name == "adamw" else [BatchedMuon, torch.optim.AdamW])
    before = _toy_loss(toy, ids)
    before.backward()
    for o in opts:
        o.step()
    with torch.no_grad():
        after = _toy_loss(toy, ids)
    assert after < before - 1e-3, (before.item(), after.item())


def test_cosine_schedule():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(4, cfg, 110) == pytest.approx(0.5)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)  # last warmup step reaches the peak
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.55)  # halfway: (1 + min) / 2
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(500, cfg, 110) == pytest.approx(0.1)
    steps = [lr_factor(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_wsd_and_constant_schedules():
    cfg = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 100) == 1.0 and lr_factor(79, cfg, 100) == 1.0  # plateau
    assert lr_factor(80, cfg, 100) == pytest.approx(1.0)  # decay starts at max_steps - 20
    assert lr_factor(90, cfg, 100) == pytest.approx(0.5)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.0)
    const = OptimConfig(schedule="constant", warmup_steps=4)
    assert lr_factor(1, const, 100) == pytest.approx(0.5) and lr_factor(99, const, 100) == 1.0
    assert lr_factor(0, OptimConfig(schedule="constant", warmup_steps=0), 100) == 1.0


def test_set_lr_uses_each_groups_base_lr():
    toy = Toy()
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=2e-2, warmup_steps=10)
    opts = build_optimizers(toy, cfg)
    factor = set_lr(opts, 4, cfg, 100)
    assert factor == pytest.approx(0.5)
    assert opts[0].param_groups[0]["lr"] == pytest.approx(1e-2)
    assert all(g["lr"] == pytest.approx(5e-4) for g in opts[1].param_groups)
    plain = torch.optim.SGD(toy.parameters(), lr=0.3)  # a group without base_lr records its current lr
    set_lr([plain], 0, cfg, 100)
    assert plain.param_groups[0]["base_lr"] == 0.3 and plain.param_groups[0]["lr"] == pytest.approx(0.03)


def test_clip_grad_norm():
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 0.0, 0.0])
    q.grad = torch.tensor([0.0, 4.0])
    assert clip_grad_norm_([p, q], 0).item() == pytest.approx(5.0)  # 0 = measure only
    assert p.grad[0].item() == 3.0
    assert clip_grad_norm_([p, q, nn.Parameter(torch.zeros(1))], 1.0).item() == pytest.approx(5.0)
    assert torch.cat([p.grad, q.grad]).norm().item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"name": "sgd"}, "optim.name"),
        ({"lr": 0.0}, "optim.lr"),
        ({"betas": [0.9]}, "optim.betas"),
        ({"grad_clip": -1.0}, "optim.grad_clip"),
        ({"muon_adjust_lr": "none"}, "optim.muon_adjust_lr"),
        ({"muon_ns_steps": 100}, "optim.muon_ns_steps"),
        ({"schedule": "linear"}, "optim.schedule"),
        ({"warmup_steps": 200}, "optim.warmup_steps"),
        ({"schedule": "wsd", "warmup_steps": 60, "decay_fraction": 0.5}, "optim.decay_fraction"),
    ],
)
def test_optim_config_errors_name_the_field(override, field):
    validate_optim_config(OptimConfig(), max_steps=100)
    with pytest.raises(ConfigError) as err:
        validate_optim_config(OptimConfig(**override), max_steps=100)
    assert err.value.field == field


def test_checkpoint_config_errors():
    validate_checkpoint_config(CheckpointConfig())
    for override, field in (
        ({"keep_last": -1}, "keep_last"),
        ({"interval": -5}, "interval"),
        ({"resume": ""}, "resume"),
    ):
        with pytest.raises(ConfigError) as err:
            validate_checkpoint_config(CheckpointConfig(**override))
        assert err.value.field == f"checkpoint.{field}"
    validate_checkpoint_config(CheckpointConfig(async_save=True))  # accepted: DCP async_save
