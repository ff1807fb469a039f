"""Full AttnRes on the segment logits cache (issue 17 item 2): each source's logits once, exact in fp64.

Every sublayer of Full AttnRes opens a block, so without the cache each read recomputed the logits of every
earlier source (O(L²) key passes). ``forward_layers`` now computes a source's logits once for all later
queries and each layer merges its open partial by phase 2. Checked here: the number of logit computations, and
logits and every gradient against test_attnres_reference's paper-equation reference (raw parameters, plain
loops, fp64), also with the network cut into two segments as pipeline stages run it.
"""

import torch

from attnres_train.model import depth_ops
from tests.model.test_attnres_reference import (
    EPS,
    LAYERS,
    Sublayer,
    block_of_sublayer,
    ids,
    make_cfg,
    random_model,
    reference_logits,
    stand_ins,
)


def _model_with_stand_ins():
    model = random_model(make_cfg("full", dense=True))
    subs = stand_ins()
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = Sublayer(*subs[2 * i])
        layer.mlp = Sublayer(*subs[2 * i + 1])
    return model, subs


def test_each_source_logits_are_computed_once(monkeypatch):
    model, _ = _model_with_stand_ins()
    logit_calls, fused_calls = [], []
    real_logits, real_phase1 = depth_ops.source_logits, depth_ops.phase1
    monkeypatch.setattr(depth_ops, "source_logits", lambda v, q, eps: logit_calls.append(v) or real_logits(v, q, eps))
    monkeypatch.setattr(depth_ops, "phase1", lambda b, q, eps: fused_calls.append(len(b)) or real_phase1(b, q, eps))
    with torch.no_grad():
        model(ids())
    # once each: the embedding and the outputs of sublayers 0 .. 2L-3 (the last mixer's output is merged by
    # phase 2 as the open partial, the last FFN's read by the head only)
    assert len(logit_calls) == 2 * LAYERS - 1
    assert len({id(v) for v in logit_calls}) == 2 * LAYERS - 1
    assert fused_calls == [2 * LAYERS]  # only the output head reads through the one-call phase 1


def _leaf_state_dict(model):
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def test_logits_and_grads_match_the_paper_reference_fp64():
    model, subs = _model_with_stand_ins()
    tokens = ids()
    w = torch.randn(*tokens.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(9))
    w = w.double()
    sd = _leaf_state_dict(model)
    want, _ = reference_logits(sd, tokens, block_of_sublayer("full", LAYERS), subs, EPS)
    (want * w).sum().backward()

    got = model(tokens)
    (got * w).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for n, p in model.named_parameters():
        if sd[n].grad is None:
            continue  # not read by the reference (the stand-ins replace the sublayers' own weights)
        g = torch.zeros_like(p) if p.grad is None else p.grad  # layer 0's mixer reads the embedding alone
        torch.testing.assert_close(g, sd[n].grad, rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")
    assert float(sd["model.layers.2.mlp_res_proj.weight"].grad.abs().max()) > 1e-4  # the queries learn

    # cut after layer 2 (a pipeline stage boundary): a fresh cache per segment, same logits
    with torch.no_grad():
        state = model.forward_layers(model.embed(tokens), 0, 2)
        cut = model.head(model.forward_layers(state, 2, None))
    torch.testing.assert_close(cut, want.detach(), rtol=1e-9, atol=1e-9)
