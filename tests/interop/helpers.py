"""Models shared by the export tests: tiny random AttnRes models whose depth attention is far from uniform."""

import torch

from attnres_train.config.model import ModelConfig
from attnres_train.model import build_model

MODES = {
    "block2": {"mode": "block", "num_blocks": 2},
    "block_size3": {"mode": "block", "block_size": 3},  # 4 layers: blocks of 3 + 1
    "full": {"mode": "full"},
    # the paper's sublayer rule, 4 layers, N=5: blocks of 1 sublayer, the last of 4; blocks open at L0's, L1's MLP
    "block5_sublayer": {"mode": "block", "num_blocks": 5, "partition": "sublayer"},
}


def random_model(residual: dict, seed: int = 0, **model_fields):
    cfg = ModelConfig(**model_fields)
    for k, v in residual.items():
        setattr(cfg.residual, k, v)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.normal_(0.0, 0.5)  # non-uniform depth attention
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model, cfg
