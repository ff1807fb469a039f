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


# -- settings that would have no effect are rejected (issue 14 item 3) -------------------------------------------
NO_OPS = [
    ({"residual.num_blocks": 2}, "model.residual.num_blocks"),  # prenorm: the `-m num_blocks=1,2,4` trap
    ({"residual.block_size": 2}, "model.residual.block_size"),
    ({"residual.mode": "full", "residual.num_blocks": 2}, "model.residual.num_blocks"),
    ({"residual.mode": "full", "residual.block_size": 1}, "model.residual.block_size"),
    ({"residual.two_phase": False}, "model.residual.two_phase"),
    ({"residual.impl": "torch"}, "model.residual.impl"),
    ({"residual.impl": "reference"}, "model.residual.impl"),
    ({"residual.mode": "full", "residual.two_phase": False, "residual.impl": "torch"}, "model.residual.impl"),
    (
        {"residual.mode": "block", "residual.num_blocks": 2, "residual.two_phase": False, "residual.impl": "torch"},
        "model.residual.impl",
    ),
    ({"moe.first_k_dense": 4, "moe.seq_aux_loss_coef": 1e-4}, "model.moe.seq_aux_loss_coef"),
    ({"moe.first_k_dense": 4, "moe.bias_in_weights": True}, "model.moe.bias_in_weights"),
    ({"moe.bias_update_speed": 0.0, "moe.bias_update_rule": "centered"}, "model.moe.bias_update_rule"),
]


@pytest.mark.parametrize("settings,field", NO_OPS, ids=[",".join(f"{k}={v}" for k, v in c[0].items()) for c in NO_OPS])
def test_settings_without_effect_are_rejected_naming_the_field(settings, field):
    cfg = tiny_cfg()
    for k, v in settings.items():
        _set(cfg, k, v)
    with pytest.raises(ConfigError) as info:
        build_model(cfg, device="meta")
    assert info.value.field == field
    assert "no effect" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "settings",
    [
        {"residual.mode": "block", "residual.num_blocks": 2},
        {"residual.mode": "block", "residual.block_size": 3},
        {"residual.mode": "full", "residual.two_phase": False},
        {"residual.mode": "full", "residual.two_phase": False, "residual.impl": "reference"},
        {"residual.mode": "block", "residual.num_blocks": 2, "residual.impl": "torch"},
        {"moe.first_k_dense": 4},  # a dense model with MoE options left at their defaults
        {"moe.bias_update_speed": 0.0},
    ],
)
def test_settings_that_are_read_are_accepted(settings):
    cfg = tiny_cfg()
    for k, v in settings.items():
        _set(cfg, k, v)
    build_model(cfg, device="meta")


def test_sweeping_num_blocks_over_a_prenorm_preset_fails_on_the_cli_path():
    """What `-m model.residual.num_blocks=1,2,4` on `model=tiny` used to do: silently train baselines."""
    with pytest.raises(ConfigError) as info:
        build_model({"residual": {"mode": "prenorm", "num_blocks": 2}}, device="meta")
    assert info.value.field == "model.residual.num_blocks" and "mode='prenorm'" in str(info.value)
