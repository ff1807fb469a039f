"""Invalid model configs fail at construction with one clear ConfigError naming the field."""

import pytest

from attnres_train.config.errors import ConfigError
from attnres_train.config.model import as_model_config
from attnres_train.model import build_model

from .helpers import set_path as _set
from .helpers import tiny_cfg

CASES = [
    ("kda.head_dim", None, "model.kda.num_heads", {"hidden_size": 130, "kda.num_heads": 4}),  # heads don't divide d
    ("residual.num_blocks", 9, "model.residual.num_blocks", {"residual.mode": "block"}),  # > num_layers
    ("residual.mode", "dense", "model.residual.mode", {}),
    ("moe.top_k", 9, "model.moe.top_k", {}),
    ("residual.block_size", 2, "model.residual.num_blocks", {"residual.mode": "block", "residual.num_blocks": 2}),
    ("residual.num_blocks", None, "model.residual.num_blocks", {"residual.mode": "block"}),
    ("hidden_size", 0, "model.hidden_size", {}),
    ("vocab_size", -5, "model.vocab_size", {}),
    ("mla_layers", [7], "model.mla_layers", {}),
    ("mla_layers", [1, 1], "model.mla_layers", {}),
    ("moe.num_experts", 0, "model.moe.num_experts", {}),
    ("moe.first_k_dense", 5, "model.moe.first_k_dense", {}),
    ("moe.bias_update_rule", "random", "model.moe.bias_update_rule", {}),
    ("mla.q_lora_rank", 32, "model.mla.q_lora_rank", {}),
    ("kda.impl", "cuda", "model.kda.impl", {}),
    ("residual.impl", "cuda", "model.residual.impl", {}),
    ("rms_norm_eps", -1.0, "model.rms_norm_eps", {}),
]


@pytest.mark.parametrize("path,value,field,extra", CASES, ids=[c[0] + "=" + repr(c[1]) for c in CASES])
def test_invalid_config_names_the_field(path, value, field, extra):
    cfg = tiny_cfg()
    for k, v in extra.items():
        _set(cfg, k, v)
    _set(cfg, path, value)
    with pytest.raises(ConfigError) as info:
        build_model(cfg)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")
    assert "\n" not in str(info.value)


def test_unknown_key_and_wrong_type_from_dict_name_the_field():
    with pytest.raises(ConfigError) as info:
        as_model_config({"residual": {"modee": "block"}})
    assert "modee" in info.value.field
    with pytest.raises(ConfigError) as info:
        as_model_config({"moe": {"top_k": "many"}})
    assert "top_k" in info.value.field


def test_head_dim_null_derives_from_hidden_size():
    cfg = tiny_cfg()
    cfg.kda.head_dim = None
    model = build_model(cfg)
    assert model.config.kda.head_dim == 128 // 2
