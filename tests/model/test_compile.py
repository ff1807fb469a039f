"""torch.compile of the whole model (not per layer) on CPU: same loss and gradients as eager.

Backend ``aot_eager`` (dynamo capture + AOT autograd, no code generation): inductor on CPU compiles for many
minutes, too slow for CI (docs/kernels.md has the timings). Two levels:
* the full tiny model (KDA + MLA + MoE, Block AttnRes) compiles as one ``torch.compile`` call; graph breaks
  remain where the layers need them (``kda_chunked`` runs eagerly under ``torch.compiler.disable``, the MoE
  dispatch has data-dependent shapes and host-side expert counts);
* with those two layer kinds swapped out (MLA-only token mixers, dense FFNs) the model — embedding, two-phase
  AttnRes depth mixing over the ``DepthState``, output aggregation, head, loss — is one graph (``fullgraph=True``).
"""

from __future__ import annotations

import pytest
import torch

from .helpers import assert_rel_close, build, grads, randomize_queries, tiny_cfg

pytestmark = pytest.mark.slow


def _step(model, ids):
    loss, aux = model.loss(ids[:, :-1], ids[:, 1:])
    return loss + aux if aux is not None else loss


def _compare(cfg, fullgraph):
    model = build(cfg, dtype=torch.float32)
    randomize_queries(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    loss_e = _step(model, ids)
    loss_e.backward()
    g_e = grads(model)
    torch._dynamo.reset()
    compiled = torch.compile(_step, backend="aot_eager", fullgraph=fullgraph)
    model.zero_grad(set_to_none=True)
    loss_c = compiled(model, ids)
    loss_c.backward()
    g_c = grads(model)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for name in g_e:
        assert_rel_close(g_c[name], g_e[name], 1e-5, name)


def test_whole_model_compiles_and_matches_eager():
    _compare(tiny_cfg("block", num_blocks=2, num_layers=2), fullgraph=False)


def test_attnres_model_is_one_graph():
    cfg = tiny_cfg("block", num_blocks=2, num_layers=3)
    cfg.mla_layers = list(range(cfg.num_layers))  # no KDA (its chunked core runs eagerly)
    cfg.moe.first_k_dense = cfg.num_layers  # no MoE (data-dependent dispatch)
    _compare(cfg, fullgraph=True)
