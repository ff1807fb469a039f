"""bench/vs_deepspeed.py's own half (our FSDP2, dp=2) trains exactly the inputs and optimizer it claims to.

Why: the DeepSpeed side only runs where the optional extra is installed (never in CI), so this keeps the part
every engine shares from rotting: the saved initial weights and token batches are what the ranks train on
(each rank its half of every global batch), with AdamW at the given lr / betas / weight decay, clipping and the
router-bias step. Checked in float64 against a plain single-process loop written here (own AdamW, own
clipping, own decay rule), 3 steps so that the betas matter. No timing is checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from attnres_train.config.model import as_model_config
from attnres_train.model import build_model
from tests import subproc

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "vs_deepspeed.py"
STEPS, BATCH, SEQ = 3, 4, 32
LR, WD, BETAS, EPS, CLIP = 1e-2, 5.0, (0.9, 0.95), 1e-8, 1.0  # a large decay, so a wrong decay rule shows


def _reference(init: dict, batches: torch.Tensor):
    """Losses and pre-clip grad norms of a plain float64 loop on the whole global batch of every step."""
    cfg = as_model_config(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    model = build_model(cfg, seed=123, dtype=torch.float64)
    model.load_state_dict(init)
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in model.named_parameters()}
    losses, norms = [], []
    for t in range(1, batches.shape[0] + 1):
        ids = batches[t - 1]
        loss, aux = model.loss(ids[:, :-1], ids[:, 1:])
        (loss if aux is None else loss + aux).backward()
        with torch.no_grad():
            live = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
            norm = math.sqrt(sum(float((p.grad**2).sum()) for _, p in live))
            coef = min(1.0, CLIP / (norm + 1e-6))
            for n, p in live:
                g = p.grad * coef
                decay = WD if p.ndim >= 2 and "embed_tokens" not in n else 0.0  # gains, biases, embedding: none
                m, v = moments[n]
                p.mul_(1.0 - LR * decay)
                m.mul_(BETAS[0]).add_((1 - BETAS[0]) * g)
                v.mul_(BETAS[1]).add_((1 - BETAS[1]) * g * g)
                m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
                p.sub_(LR * m_hat / (v_hat.sqrt() + EPS))
                p.grad = None
        model.update_router_biases()  # one process holds every token: these are the global loads
        losses.append(float(loss.detach()))
        norms.append(norm)
    return losses, norms


def test_ours_half_trains_the_saved_inputs_with_the_given_optimizer(tmp_path):
    work = tmp_path / "work"
    args = [f"--steps={STEPS}", "--warmup=1", "--rounds=1", f"--batch={BATCH}", f"--seq={SEQ}", "--engines=ours"]
    args += [f"--lr={LR}", f"--weight-decay={WD}", "--dtype=float64", f"--workdir={work}"]
    proc = subproc.run([sys.executable, BENCH, *args, f"--json={tmp_path / 's.json'}"], tmp_path, "bench", cwd=REPO)
    subproc.check(proc)
    assert "RESULT ours_step_time" in proc.stdout
    got = json.loads((tmp_path / "s.json").read_text())["ours"]
    batches = torch.load(work / "batches.pt", weights_only=True)
    assert batches.shape == (STEPS, BATCH, SEQ + 1) and int(batches.max()) < 1024
    init = torch.load(work / "init.pt", weights_only=True)
    ref_losses, ref_norms = _reference(init, batches)
    assert ref_losses[-1] < ref_losses[0] - 0.01  # it learns: the later steps depend on the optimizer
    for i in range(STEPS):
        assert got["loss"][i] == pytest.approx(ref_losses[i], rel=1e-9), f"loss at step {i}"
        assert got["grad_norm"][i] == pytest.approx(ref_norms[i], rel=1e-9), f"grad norm at step {i}"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed installed: would run")
def test_without_deepspeed_one_skip_line_and_exit_0(tmp_path):
    proc = subproc.check(subproc.run([sys.executable, BENCH, "--steps=3"], tmp_path, "skip", cwd=REPO, timeout=120))
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("SKIP vs_deepspeed: deepspeed is not installed"), proc.stdout
