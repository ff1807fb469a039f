"""Pipeline settings in the root config are validated up front, with one error naming the field."""

import pytest

from attnres_train.config.errors import ConfigError
from attnres_train.config.schema import Config, validate_config


def _cfg(**parallel):
    cfg = Config()
    cfg.model.num_layers, cfg.model.mla_layers = 4, [3]
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    cfg.parallel.dp_shard = parallel.get("dp_shard", 1)
    return cfg


def test_valid_pipeline_config_passes():
    cfg = _cfg(pp=2, vpp=2)
    cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size = 8, 2  # 4 microbatches: a multiple of pp
    validate_config(cfg, dp_world_size=2)


@pytest.mark.parametrize(
    "parallel,trainer,pipeline,field,fragment",
    [
        (dict(pp=2, vpp=4), {}, {}, "parallel.vpp", "exceed model.num_layers=4"),
        (
            dict(pp=2, vpp=2),
            dict(global_batch_size=6, micro_batch_size=2),
            {},
            "trainer.global_batch_size",
            "multiple of parallel.pp=2",
        ),
        (dict(pp=2, vpp=2), {}, dict(schedule="1f1b"), "pipeline.schedule", "use interleaved_1f1b"),
        (dict(pp=2), {}, dict(layers_per_stage=[1, 2]), "pipeline.layers_per_stage", "model.num_layers=4"),
        (dict(pp=2), {}, dict(schedule="zb"), "pipeline.schedule", "unknown schedule"),
    ],
)
def test_bad_pipeline_settings_name_the_field(parallel, trainer, pipeline, field, fragment):
    _check(parallel, trainer, pipeline, field, fragment, world=2)


def test_split_backward_with_data_parallel_is_rejected():
    _check(dict(pp=2, dp_shard=2), {}, dict(split_backward=True), "pipeline.split_backward", "dp=2", world=4)


def test_zero_bubble_with_data_parallel_is_rejected_up_front():
    # the same rule parallelize_pipeline applies, now also at config validation (config.pipeline.check_pipeline_dp)
    _check(dict(pp=2, dp_shard=2), {}, dict(schedule="zb_h1"), "pipeline.schedule", "dp=2", world=4)


def _check(parallel, trainer, pipeline, field, fragment, world):
    cfg = _cfg(**parallel)
    cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size = 8, 2
    for k, v in trainer.items():
        setattr(cfg.trainer, k, v)
    for k, v in pipeline.items():
        setattr(cfg.pipeline, k, v)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, dp_world_size=world)
    assert err.value.field == field
    assert fragment in str(err.value)
