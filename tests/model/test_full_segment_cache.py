"""Full AttnRes on the segment logits cache (issue 17 item 2): each source's logits once, exact in fp64.

The output head reads through the same cache in Full and Block mode (its query is the last row).

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


def _model_with_stand_ins(mode="full", **kw):
    model = random_model(make_cfg(mode, dense=True, **kw))
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
    # once each: the embedding and the outputs of sublayers 0 .. 2L-2 (the last mixer's output for the head's
    # phase 1 only; the last FFN's output is the head's open partial, merged by phase 2)
    assert len(logit_calls) == 2 * LAYERS
    assert len({id(v) for v in logit_calls}) == 2 * LAYERS
    assert fused_calls == []  # the output head's phase 1 comes from the same cached logits


def test_block_mode_output_head_reads_through_the_cache_too(monkeypatch):
    """Block AttnRes (N=3, block per layer partition): each block's logits once, the head's included, and the
    output equals the paper-equation reference."""
    model, subs = _model_with_stand_ins("block", num_blocks=LAYERS)
    logit_calls, fused_calls = [], []
    real_logits, real_phase1 = depth_ops.source_logits, depth_ops.phase1
    monkeypatch.setattr(depth_ops, "source_logits", lambda v, q, eps: logit_calls.append(v) or real_logits(v, q, eps))
    monkeypatch.setattr(depth_ops, "phase1", lambda b, q, eps: fused_calls.append(len(b)) or real_phase1(b, q, eps))
    tokens = ids()
    with torch.no_grad():
        got = model(tokens)
    assert len({id(v) for v in logit_calls}) == len(logit_calls) == LAYERS  # the embedding + L-1 closed blocks
    assert fused_calls == []
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    want, _ = reference_logits(sd, tokens, block_of_sublayer("block", LAYERS, LAYERS), subs, EPS)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


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
