"""torch.compile of the whole model (not per layer) on CPU: same loss and gradients as eager.

Backend ``aot_eager`` (dynamo capture + AOT autograd, no code generation): inductor on CPU compiles for many
minutes, too slow for CI (docs/kernels.md has the timings). Two levels:
* the full tiny model (KDA + MLA + MoE, Block AttnRes) compiles as one ``torch.compile`` call; graph breaks
  remain where the layers need them (``kda_chunked`` runs eagerly under ``torch.compiler.disable``, the MoE
  dispatch has data-dependent shapes and host-side expert counts);
* with those two layer kinds swapped out (MLA-only token mixers, dense FFNs) the model — embedding, two-phase
  AttnRes depth mixing over the ``DepthState``, output aggregation, head, loss — is one graph (``fullgraph=True``);
* the trainer's path (``trainer.compile``: ``parallelize_model`` -> ``wrap.apply_compile``, sublayer modules) on
  12 layers stays compiled: no recompile-limit hit, nothing compiled after the first of 5 steps.
"""

from __future__ import annotations

import copy

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


def _deep_cfg(num_layers=12):
    """A 12-layer (f3's depth) tiny model: KDA, MLA every 4th layer, dense layer 0 then MoE, 4 AttnRes blocks."""
    from attnres_train.config.model import KDAConfig, MLAConfig, MoEConfig

    cfg = tiny_cfg("block", num_blocks=4, num_layers=num_layers, vocab_size=64, hidden_size=32)
    cfg.kda = KDAConfig(num_heads=2, head_dim=16, chunk_size=8)
    cfg.mla = MLAConfig(num_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    cfg.moe = MoEConfig(
        num_experts=8, top_k=2, intermediate_size=16, num_shared_experts=1, first_k_dense=1, dense_intermediate_size=32
    )
    return cfg


def test_trainer_compile_stays_compiled_over_depth_and_steps():
    """``trainer.compile`` (``parallelize_model`` -> ``wrap.apply_compile``) on 12 layers: no recompile-limit hit
    (dynamo would otherwise run the layers past the 8th eagerly), no compilation after the first step, and
    fewer frame compilations than layers (compiled once per layer kind, not once per layer)."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from attnres_train.parallel.mesh import single_process_context
    from attnres_train.parallel.parallelize import parallelize_model

    cfg = _deep_cfg()
    eager = build(cfg, dtype=torch.float32)
    randomize_queries(eager)
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    parallelize_model(model, single_process_context(), SimpleNamespace(compile=True, compile_backend="aot_eager"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    frames = []
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for step in range(5):
            ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)  # new tokens: new expert counts
            if step == 0:
                ref = _step(eager, ids)
            loss = _step(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            frames.append(counters["frames"]["total"])
            if step == 0:
                torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert 0 < frames[0] < cfg.num_layers, frames  # per kind (KDA, MLA, FFN, MoE, norm), not per layer
    assert frames == [frames[0]] * 5, frames  # nothing compiled after the first step
    assert counters["frames"]["ok"] == frames[0], dict(counters["frames"])


def test_grouped_gemm_moe_compiles_once_under_bf16_autocast():
    """The MoE's grouped-GEMM path (the CUDA one; on CPU only reachable by forcing ``impl``) compiles with
    device-side expert offsets: new routing every step, no recompilation, the same bf16 result as eager."""
    from torch._dynamo.utils import counters

    from attnres_train.config.model import ModelConfig, MoEConfig
    from attnres_train.model.moe import MoE

    cfg = ModelConfig(hidden_size=32, moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=64))
    torch.manual_seed(0)
    eager = MoE(cfg)
    eager.experts.impl = "grouped_mm"
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile(dynamic=False, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    frames = []
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for _ in range(4):
            x = torch.randn(2, 16, 32, generator=g)
            outs = []
            for m in (eager, compiled):
                m.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y, _ = m(x)
                y.float().square().sum().backward()
                outs.append((y.detach().float(), m.experts.w1.grad.clone()))
            frames.append(counters["frames"]["total"])
            torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)  # same ops, same bf16 rounding
            torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-7)
    assert frames[0] > 0 and frames == [frames[0]] * 4, frames
