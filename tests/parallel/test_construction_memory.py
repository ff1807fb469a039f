"""Construction memory: with ``parallel.pp=4`` a rank's peak RSS (build + first step) is at most half of one
process building and stepping the whole model.

Preset ``f1`` (~120M parameters, fp32, AdamW): one process holds ~0.5 GB of weights, the same again in gradients and
twice that in optimizer state. Every run goes through the real path (meta build -> ``TrainModule`` /
``PipelineTrainModule`` -> materialise this rank's stages -> one ``train_batch``) in a fresh process forked from the
same forkserver (``tests.distributed``), so the torch baseline is the same in both; peak RSS is the kernel's
``ru_maxrss`` of that process. The pipeline ranks' held parameter bytes must also sum to the whole model (nothing
is lost or duplicated) while each holds well under half of it.
"""

from __future__ import annotations

import resource

import pytest
import torch

from tests.distributed import run_distributed

PRESET, SEQ, M = "f1", 16, 4


def _cfg():
    from omegaconf import OmegaConf

    from attnres_train.config.model import as_model_config
    from attnres_train.config.schema import Config
    from tests.train.conftest import REPO

    cfg = Config()
    cfg.model = as_model_config(OmegaConf.load(REPO / "configs" / "model" / f"{PRESET}.yaml"))
    cfg.data.seq_len = SEQ
    cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = 1, M
    cfg.trainer.precision = "fp32"
    cfg.pipeline.schedule = "1f1b"
    cfg.seed = 3
    return cfg


def _body(pp):
    import torch.distributed as dist

    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.model import build_model
    from attnres_train.parallel.init import local_bytes
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.train.train_module import build_train_module

    cfg = _cfg()
    cfg.parallel = ParallelConfig(pp=pp, dp_shard=1) if pp > 1 else ParallelConfig()
    ws = dist.get_world_size()
    pctx = build_parallel_context(cfg.parallel, cfg.model, SEQ, ws)
    module = build_train_module(build_model(cfg.model, device="meta"), cfg, pctx, max_steps=2)
    batch = torch.randint(0, cfg.model.vocab_size, (M, SEQ + 1), generator=torch.Generator().manual_seed(0))
    stats = module.train_batch(batch, step=0)
    return {
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "param_bytes": local_bytes(module.model, include_buffers=False),
        "loss": stats["loss"],
    }


@pytest.mark.slow
def test_pp4_rank_peak_rss_is_at_most_half_of_one_process():
    single = run_distributed(_body, 1, 1, timeout=900)[0]
    ranks = run_distributed(_body, 4, 4, timeout=900)
    whole = single["param_bytes"]
    assert whole > 4 * 100e6  # >= 100M fp32 parameters
    assert sum(r["param_bytes"] for r in ranks) == whole  # each parameter on exactly one stage
    assert max(r["param_bytes"] for r in ranks) < 0.5 * whole
    ratios = [r["rss"] / single["rss"] for r in ranks]
    print(
        f"peak RSS: single {single['rss'] / 2**20:.0f} MiB; pp4 ranks "
        f"{[round(r['rss'] / 2**20) for r in ranks]} MiB; ratios {[round(x, 3) for x in ratios]}"
    )
    assert max(ratios) <= 0.5, ratios
    assert abs(ranks[-1]["loss"] - single["loss"]) < 1e-4 * single["loss"]  # same model, same first loss
