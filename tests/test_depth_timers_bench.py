"""bench/depth_timers.py, the in-step clock of ``attnres_overhead.py``: it times the depth mixing and nothing else.

Why: the bench states the AttnRes cost inside real steps from these timers, so they must (1) leave the
numbers untouched (bitwise: the patched functions are the same functions), (2) put every class back on
exit, (3) count a nested call once (``SegmentLogits.phase1`` calls two timed functions inside), and (4) see
AttnRes work only: a PreNorm step times nothing. No time threshold is checked.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from attnres_train.config.model import as_model_config
from attnres_train.model import build_model, depth, depth_ops

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from depth_timers import DepthTimers  # noqa: E402  (bench/ is not a package)


def _model(mode: str):
    cfg = as_model_config(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    cfg = copy.deepcopy(cfg)
    cfg.residual.mode = mode
    cfg.residual.num_blocks = 2 if mode == "block" else None
    if mode != "prenorm":  # PreNorm reads no residual.impl: setting it is an error
        cfg.residual.impl = "torch"
    model = build_model(cfg, seed=0, dtype=torch.float64)
    with torch.no_grad():  # non-zero pseudo-queries: no zero-init shortcut anywhere
        for n, p in model.named_parameters():
            if n.endswith("_res_proj.weight"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model, cfg


def _step(model, cfg):
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    loss, aux = model.loss(ids[:, :-1], ids[:, 1:])
    (loss if aux is None else loss + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_timed_step_is_bitwise_the_untimed_step_and_classes_are_restored():
    originals = {
        (cls, name): cls.__dict__[name]
        for cls in (depth_ops._Combine, depth_ops._Phase2, depth_ops._SourceLogits)
        for name in ("forward", "backward")
    }
    phase1 = depth.SegmentLogits.__dict__["phase1"]
    for mode in ("block", "full"):
        model, cfg = _model(mode)
        loss0, grads0 = _step(model, cfg)
        with DepthTimers() as timers:
            loss1, grads1 = _step(model, cfg)
        assert timers.calls > 0 and timers.seconds > 0, mode
        assert torch.equal(loss0, loss1), mode
        assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[n], grads1[n]) for n in grads0), mode
    for (cls, name), fn in originals.items():
        assert cls.__dict__[name] is fn, (cls, name)
    assert depth.SegmentLogits.__dict__["phase1"] is phase1


def test_prenorm_step_times_nothing():
    model, cfg = _model("prenorm")
    with DepthTimers() as timers:
        _step(model, cfg)
    assert timers.calls == 0 and timers.seconds == 0.0


def test_nested_calls_count_once_and_inactive_timers_patch_nothing():
    blocks = [torch.randn(1, 5, 8, dtype=torch.float64) for _ in range(3)]
    q = torch.randn(4, 8, dtype=torch.float64)
    cache = depth.SegmentLogits(q, 0, 1e-6)
    with DepthTimers() as timers:
        cache.phase1(blocks, [1, 2])  # inside: three source_logits + one combine, all timed functions
    assert timers.calls == 1
    with DepthTimers(active=False) as idle:
        depth.SegmentLogits(q, 0, 1e-6).phase1(blocks, [0])
    assert idle.calls == 0 and idle.seconds == 0.0
