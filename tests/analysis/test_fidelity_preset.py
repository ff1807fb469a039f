"""``experiment=fidelity`` (issue 14 item 7) expands into 4 variants x 3 seeds of valid runs that differ only in
the residual variant and the seed, with the paper's block partition and a held-out validation split.

Composition only (no training); the block sizes are written by hand from the paper's rule (docs/model.md).
"""

from attnres_train.analysis.runs import variant_label
from attnres_train.config.model import as_model_config, block_starts

from .test_presets import _jobs


def _without(c, *keys):
    c = {k: v for k, v in c.items() if k not in ("run_dir", *keys)}
    c["model"] = {k: v for k, v in c["model"].items() if k != "residual"}
    return c


def test_fidelity_grid():
    jobs = _jobs("fidelity")  # every job passes validate_config
    got = sorted((variant_label(j["model"]), j["seed"]) for j in jobs)
    variants = ["baseline", "block N=4 (sublayer)", "block N=8 (sublayer)", "full"]
    assert got == sorted((v, s) for v in variants for s in (0, 1, 2))
    same = _without(jobs[0], "seed")
    assert all(_without(j, "seed") == same for j in jobs), "only the residual variant and the seed differ"
    assert jobs[0]["data"]["val_fraction"] > 0 and jobs[0]["trainer"]["val_every"] > 0
    assert jobs[0]["trainer"]["val_batches"] is not None, "a fixed evaluation set for every run"
    sizes = {}
    for j in jobs:
        cfg = as_model_config(j["model"])
        if cfg.residual.mode == "block":
            starts = block_starts(cfg)
            sizes[cfg.residual.num_blocks] = [b - a for a, b in zip(starts, starts[1:] + [2 * cfg.num_layers])]
    assert as_model_config(jobs[0]["model"]).num_layers == 6
    assert sizes == {4: [3, 3, 3, 3], 8: [1] * 7 + [5]}
