"""``TrainModule.eval_loss`` (written once for both step engines) is the token-weighted mean loss over every
batch of every data-parallel rank: checked on 2 gloo ranks with the local engine (dp=2, each rank its own
batches) and the pipeline engine (pp=2), against a plain cross entropy over the reference model's logits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.parallel.test_equivalence import T, build_reference, model_cfg

IGNORED = -100  # the label value every loss skips (written here on purpose, not imported)


def _cfg(mode, nb):
    cfg = model_cfg(mode, nb)
    cfg.num_layers, cfg.mla_layers = 4, [1, 3]
    return cfg


def _batches():
    """4 eval batches of 2 rows (one microbatch each); the last label of both rows of batch 1 and of row 0 of
    batch 2 is ignored (only labels: inputs stay tokens), so the batches weigh differently."""
    g = torch.Generator().manual_seed(5)
    out = [torch.randint(0, 64, (2, T + 1), generator=g) for _ in range(4)]
    out[1][:, -1] = IGNORED
    out[2][0, -1] = IGNORED
    return out


def _expected(ref, batches) -> float:
    """Sum of -log p(label) over every supervised token / their number, with plain loops."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = ref(b[:, :-1])  # [rows, T, V] (no labels: the plain logits)
            for r in range(b.shape[0]):
                for t in range(T):
                    label = int(b[r, t + 1])
                    if label == IGNORED:
                        continue
                    row = logits[r, t].double()
                    total += float(torch.logsumexp(row, 0) - row[label])
                    count += 1
    return total / count


def _body(parallel_kw):
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.pipeline import PipelineConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.train import OptimConfig
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.train.train_module import TrainModule

    ref = build_reference("block", 2, _cfg).eval()
    pctx = build_parallel_context(
        ParallelConfig(**parallel_kw), ref.config, seq_len=T, world_size=dist.get_world_size()
    )
    tcfg = TrainerConfig(micro_batch_size=2, global_batch_size=4, precision="fp32")
    module = TrainModule(copy.deepcopy(ref), OptimConfig(), tcfg, pctx, 10, pipeline_cfg=PipelineConfig())
    batches = _batches()
    mine = batches[pctx.dp_rank :: pctx.dp_size]
    return {"got": module.eval_loss(mine), "want": _expected(ref, batches)}


@pytest.mark.parametrize(
    "layout", [dict(dp_replicate=2, dp_shard=1), dict(pp=2, dp_shard=1)], ids=["local_dp2", "pipeline_pp2"]
)
def test_eval_loss_is_the_token_weighted_mean_over_every_rank(layout):
    for r in run_distributed(_body, 2, layout, timeout=240):
        got, want = r["got"], r["want"]
        assert abs(got["val_loss"] - want) <= 1e-9 * want, (layout, got, want)
        assert abs(got["val_ppl"] - math.exp(want)) <= 1e-6 * math.exp(want)  # exp taken in fp32
