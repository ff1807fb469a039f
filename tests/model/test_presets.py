"""Presets compose through Hydra; the 48B preset builds on the meta device with the published counts."""

import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attnres_train.config.model import as_model_config
from attnres_train.config.schema import register_configs
from attnres_train.model import build_model
from attnres_train.model.flops import count_params

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
PRESETS = sorted(p.stem for p in (Path(CONFIGS) / "model").glob("*.yaml"))


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(config_name="config", overrides=overrides)


def _real_counts(model):
    total = sum(p.numel() for p in model.parameters())
    emb = model.model.embed_tokens.weight.numel() + (
        0 if model.config.tie_word_embeddings else model.lm_head.weight.numel()
    )
    attnres = sum(p.numel() for n, p in model.named_parameters() if "_res_" in n)
    return total, emb, attnres


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_validates_and_builds_on_meta(preset):
    cfg = as_model_config(_compose([f"model={preset}"]).model)
    assert cfg.name == preset
    model = build_model(cfg, device="meta")
    total, emb, _ = _real_counts(model)
    counts = count_params(cfg)
    assert counts.total == total and counts.embedding == emb


def test_hydra_override_switches_residual_mode():
    cfg = _compose(["model=f1", "model.residual.mode=block", "model.residual.num_blocks=3"])
    assert OmegaConf.select(cfg, "model.residual.num_blocks") == 3
    model = build_model(cfg.model, device="meta")
    assert model.mode == "block" and sum(model.model.layers[i].opens_block[0] for i in range(6)) == 3


def test_kimi_linear_48b_counts_match_the_spec():
    cfg = as_model_config(_compose(["model=kimi_linear_48b"]).model)
    model = build_model(cfg, device="meta")
    total, emb, attnres = _real_counts(model)
    counts = count_params(cfg)
    # kimi_linear.md §1.2: 48.37B total / 2.73B activated non-embedding, 0.755B embeddings + untied head.
    assert abs((total - emb) / 48.37e9 - 1) < 0.005
    assert abs(counts.active_non_embedding / 2.73e9 - 1) < 0.01
    assert abs(emb / 0.755e9 - 1) < 0.005
    assert 47e9 < total < 50e9 and 3.0e9 < counts.active < 3.6e9
    assert attnres == 0

    block = copy.deepcopy(cfg)
    block.residual.mode, block.residual.block_size = "block", 3
    bmodel = build_model(block, device="meta")
    btotal, _, battn = _real_counts(bmodel)
    d, n_sub = 2304, 2 * 27
    assert battn == 2 * d * (n_sub + 1) == btotal - total  # one (w, gamma) pair per sublayer + output
    assert sum(bmodel.model.layers[i].opens_block[0] for i in range(27)) == 9  # 9 blocks + embedding
    assert all(p.device == torch.device("meta") for p in bmodel.parameters())
