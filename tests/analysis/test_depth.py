"""Depth-attention extraction, per-layer diagnostics and checkpoint loading of attnres_train.analysis.depth."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_state_dict

from attnres_train.analysis import depth as D
from attnres_train.analysis.loading import load_run_model
from attnres_train.analysis.runs import load_run
from attnres_train.checkpoint import CheckpointManager
from attnres_train.config.model import ModelConfig
from attnres_train.model import build_model
from attnres_train.model.flops import attnres_sources

from ..model.helpers import randomize_queries
from .helpers import make_config, write_run

VARIANTS = [("block", 1, 4), ("block", 2, 4), ("block", 8, 8), ("full", None, 4)]


def _model(mode, num_blocks, num_layers, seed=0):
    cfg = ModelConfig(num_layers=num_layers, mla_layers=[i for i in range(num_layers) if i % 4 == 3])
    cfg.residual.mode, cfg.residual.num_blocks = mode, num_blocks
    torch.manual_seed(seed)
    return build_model(cfg).eval(), cfg


def _ids(cfg, b=2, t=24, seed=0):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode,num_blocks,num_layers", VARIANTS)
def test_fresh_model_weights_sum_to_one_and_are_uniform(mode, num_blocks, num_layers):
    model, cfg = _model(mode, num_blocks, num_layers)
    weights = D.depth_weights(model, _ids(cfg))
    counts = attnres_sources(cfg)  # the FLOP counter's independent source bookkeeping
    assert [w.shape[0] for w in weights] == counts
    assert len(weights) == 2 * num_layers + 1 == len(D.reader_labels(cfg))
    for w in weights:
        n = w.shape[0]
        assert w.shape[1:] == (2, 24)
        torch.testing.assert_close(w.sum(0), torch.ones(2, 24), atol=1e-6, rtol=0)
        torch.testing.assert_close(w, torch.full_like(w, 1.0 / n), atol=1e-6, rtol=0)  # zero queries: uniform
    mat = D.depth_matrix(weights)
    assert mat.shape == (2 * num_layers + 1, len(D.source_labels(cfg)))
    for row, n in zip(mat, counts):
        np.testing.assert_allclose(row[:n], 1.0 / n, atol=1e-6)
        assert np.isnan(row[n:]).all()
    ent = D.depth_entropy(weights)
    np.testing.assert_allclose(ent, np.log(counts), atol=1e-5)  # uniform over n sources = ln n


@pytest.mark.parametrize("mode,num_blocks,num_layers", VARIANTS)
def test_trained_queries_weights_sum_to_one_and_are_not_uniform(mode, num_blocks, num_layers):
    model, cfg = _model(mode, num_blocks, num_layers)
    randomize_queries(model, scale=0.5)
    weights = D.depth_weights(model, _ids(cfg))
    nonuniform = 0
    for w in weights:
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(0), torch.ones(2, 24), atol=1e-5, rtol=0)
        if w.shape[0] > 1:
            nonuniform += int(float((w - 1.0 / w.shape[0]).abs().max()) > 1e-2)
    assert nonuniform == sum(1 for w in weights if w.shape[0] > 1)
    mat = D.depth_matrix(weights)
    np.testing.assert_allclose(np.nansum(mat, axis=1), 1.0, atol=1e-5)


def test_prenorm_has_no_depth_attention_but_has_a_layer_profile():
    model, cfg = _model("prenorm", None, 4)
    assert D.depth_weights(model, _ids(cfg)) == []
    assert D.source_labels(cfg) == [] and D.layer_block_boundaries(cfg) == []
    diag = D.layer_diagnostics(model, _ids(cfg, t=25))
    assert len(diag["output_rms"]) == len(diag["grad_norm"]) == 4
    assert all(v > 0 and np.isfinite(v) for v in diag["output_rms"] + diag["grad_norm"])
    # the PreNorm stream only accumulates: with an untrained model its RMS grows with depth
    assert diag["output_rms"][-1] > diag["output_rms"][0]
    assert diag["moe_layers"] == [1, 2, 3]  # first_k_dense = 1
    for row in diag["expert_load"]:
        assert len(row) == cfg.moe.num_experts and sum(row) == pytest.approx(1.0)


def test_labels_and_block_boundaries():
    _, cfg = _model("block", 2, 4)
    assert D.reader_labels(cfg) == [
        "L0.kda",
        "L0.mlp",
        "L1.kda",
        "L1.moe",
        "L2.kda",
        "L2.moe",
        "L3.mla",
        "L3.moe",
        "out",
    ]
    assert D.source_labels(cfg) == ["emb", "b1", "b2"]
    assert D.layer_block_boundaries(cfg) == [0, 2]
    cfg.residual.partition = "sublayer"  # 4 layers, N=2 -> sublayer blocks of 4: the same boundaries
    assert D.layer_block_boundaries(cfg) == [0, 2]
    cfg.residual.num_blocks = 3  # 8 // 3 = 2 sublayers per block: [0-1] [2-3] [4-7]
    assert D.layer_block_boundaries(cfg) == [0, 1, 2] and D.source_labels(cfg) == ["emb", "b1", "b2", "b3"]
    cfg.residual.num_blocks = 5  # blocks of 1 sublayer, the last of 4: blocks open at L0's and L1's FFN
    assert D.layer_block_boundaries(cfg) == [0, 0.5, 1, 1.5, 2]
    _, full = _model("full", None, 4)
    assert D.source_labels(full) == ["emb"] + D.reader_labels(full)[:-1]


def test_analysis_loads_a_trainer_format_checkpoint(tmp_path):
    """Weights come back exactly from a checkpoint saved like Trainer.save (get_state_dict(model, optimizers))."""
    cfg = make_config("block", 2)
    run_dir = write_run(tmp_path / "run", cfg)
    torch.manual_seed(3)
    model = build_model(cfg.model)
    randomize_queries(model, seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(_ids(cfg.model, t=9), _ids(cfg.model, t=9, seed=1))[0].backward()
    opt.step()
    msd, osd = get_state_dict(model, [opt])
    CheckpointManager(run_dir / "checkpoints", keep_last=1).save(
        5,
        {"model": msd, "optim": osd},
        config_text=OmegaConf.to_yaml(OmegaConf.structured(cfg)),
        meta={"tokens_seen": 320},
    )
    loaded, path, meta = load_run_model(load_run(run_dir))
    assert path.name == "step_00000005" and meta["step"] == 5
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ids = _ids(cfg.model)
    for a, b in zip(D.depth_weights(model.eval(), ids), D.depth_weights(loaded, ids)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
