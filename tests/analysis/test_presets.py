"""The Hydra experiment presets expand into the intended grid of valid runs (composition only, no training).

The sweep is expanded the way Hydra's basic sweeper does it: the cartesian product of ``hydra.sweeper.params``.
"""

import itertools

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from attnres_train.analysis.runs import variant_label
from attnres_train.config.paths import CONFIG_DIR
from attnres_train.config.schema import as_config, register_configs, validate_config
from attnres_train.model.flops import count_params

from .helpers import experiment_override


def _jobs(experiment, extra=()):
    """Resolved configs (plain dicts) of every job of ``-m experiment=<experiment>``."""
    register_configs()
    base = [experiment_override(experiment), *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        params = compose("config", overrides=base, return_hydra_config=True).hydra.sweeper.params
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
        out = []
        for combo in itertools.product(*axes):
            cfg = compose("config", overrides=base + list(combo))
            validate_config(as_config(cfg))  # every job passes the trainer's own validation
            out.append(OmegaConf.to_container(cfg, resolve=False))
    return out


def _without_residual(c):
    c = {k: v for k, v in c.items() if k != "run_dir"}
    c["model"] = {k: v for k, v in c["model"].items() if k != "residual"}
    return c


def test_block_sweep_grid():
    jobs = _jobs("block_sweep")
    assert [variant_label(j["model"]) for j in jobs] == [
        "baseline",
        "block N=1",
        "block N=2",
        "block N=4",
        "block N=8",
        "full",
    ]
    assert jobs[0]["model"]["num_layers"] >= 8
    same = _without_residual(jobs[0])
    for j in jobs[1:]:  # same model, data, optimizer and token budget: only the residual differs
        assert _without_residual(j) == same
    assert jobs[0]["checkpoint"]["interval"] == 0 and jobs[0]["trainer"]["val_every"] > 0


def test_block_sweep_accepts_another_model():
    jobs = _jobs("block_sweep", ["model=tiny"])
    assert {j["model"]["name"] for j in jobs} == {"tiny"} and {j["model"]["num_layers"] for j in jobs} == {8}


def test_scaling_grid_budgets_grow_with_size():
    jobs = _jobs("scaling")
    assert len(jobs) == 9
    sizes = {}
    for j in jobs:
        tokens = j["trainer"]["max_steps"] * j["trainer"]["global_batch_size"] * j["data"]["seq_len"]
        sizes.setdefault(j["model"]["name"], []).append((variant_label(j["model"]), tokens, _without_residual(j)))
    assert len(sizes) == 3
    rows = []
    for name, runs in sizes.items():
        assert sorted(v for v, _, _ in runs) == ["baseline", "block N=8 (sublayer)", "full"]  # the paper's rule
        assert len({t for _, t, _ in runs}) == 1 and all(r[2] == runs[0][2] for r in runs)
        params = count_params(next(j["model"] for j in jobs if j["model"]["name"] == name)).active_non_embedding
        rows.append((params, runs[0][1]))
    rows.sort()
    assert [t for _, t in rows] == sorted(t for _, t in rows) and rows[0][1] < rows[-1][1]
    for params, tokens in rows:  # about 20 tokens per active non-embedding parameter
        assert 15 < tokens / params < 25
