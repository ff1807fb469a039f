"""Static layout tables (which blocks each hop carries), the split rule, the stage wrapper, and the runtime on a
single process (P = 1: all hops local, every block goes through the cache and its gradient deposits)."""

from __future__ import annotations

import pytest
import torch

from attnres_train.config.errors import ConfigError
from attnres_train.parallel.pipeline import PipelineLayout, PipelineRuntime, balanced_split, build_stages
from attnres_train.parallel.pipeline.layout import aligned_closed_form, paper_volume
from attnres_train.parallel.pipeline.stage import materialize_stages
from tests.model.helpers import tiny_cfg

from .common import Case, make_microbatches, make_model, reference, run_case, small_cfg


def _layout(L, P, V, block_size=None, mode="block", cache=True, layers=None, num_blocks=None):
    return PipelineLayout.from_model_config(
        tiny_cfg(mode, num_blocks, block_size, num_layers=L), P, V, layers_per_stage=layers, block_cache=cache
    )


# ------------------------------------------------------------------------------------ block tables
def test_design_note_examples():
    # pipeline_cache.md §7: P=4, V=2, blocks of 2 layers, 2 layers per stage
    assert _layout(16, 4, 2, 2, cache=False).hop_tensors() == [2, 3, 4, 5, 6, 7, 8]
    assert _layout(16, 4, 2, 2).hop_tensors() == [2, 3, 4, 3, 3, 3, 3]
    # §6.6 worked examples: L=64, blocks of 8 layers: (total naive, total cached, peak naive, peak cached)
    for (P, V), want in {(8, 2): (79, 55, 9, 5), (4, 4): (79, 31, 9, 3), (8, 4): (167, 77, 9, 3)}.items():
        naive, cached = _layout(64, P, V, 8, cache=False), _layout(64, P, V, 8)
        got = (sum(naive.hop_tensors()), sum(cached.hop_tensors()), max(naive.hop_tensors()), max(cached.hop_tensors()))
        assert got == want, (P, V, got)


@pytest.mark.parametrize("P,V,N", [(2, 2, 4), (4, 2, 8), (4, 4, 16), (8, 2, 16), (2, 3, 12), (3, 2, 12)])
def test_aligned_closed_forms_and_paper_formula(P, V, N):
    L = N  # one layer per block, m = N/(PV) blocks per stage, blocks aligned with stages
    naive, cached = _layout(L, P, V, 1, cache=False), _layout(L, P, V, 1)
    cn, cc = aligned_closed_form(P, V, N)
    assert sum(naive.hop_tensors()) == cn and sum(cached.hop_tensors()) == cc
    # the paper's accounting counts only layer-blocks (no embedding, no partials): naive matches exactly, the
    # cached formula counts P·N_p per later hop where the exact count is (P-1)·N_p
    m = N // (P * V)
    paper_naive, paper_cached = paper_volume(P, V, m)
    embeds_naive, embeds_cached = P * V - 1, P - 1
    assert sum(naive.hop_tensors()) - embeds_naive == paper_naive
    assert sum(cached.hop_tensors()) - embeds_cached == paper_cached - (V - 1) * P * m


@pytest.mark.parametrize(
    "L,P,V,bs,mode,layers",
    [
        (16, 4, 2, 3, "block", None),
        (12, 2, 3, 5, "block", None),
        (10, 4, 2, 3, "block", [1, 2, 1, 1, 1, 2, 1, 1]),
        (8, 2, 2, None, "full", None),
        (9, 3, 3, 2, "block", None),
        (7, 2, 2, 3, "block", [0, 3, 2, 2]),
    ],
)
def test_layout_properties(L, P, V, bs, mode, layers):
    lay = _layout(L, P, V, bs, mode, layers=layers)
    C, N = lay.num_stages, lay.num_blocks
    shipped = [0] * N
    for s in range(C - 1):
        d = set(lay.delta(s))
        assert set(lay.commits(s)) <= d, "every produced block is shipped"
        if s > 0:
            assert d <= set(lay.delta(s - 1)) | set(lay.commits(s)), "no block is re-sent to a rank holding it"
        assert set(lay.inputs(s + 1)) == d | set(lay.have(s + 1)), "received + cached = everything needed"
        assert not d & set(lay.have(s + 1))
        for b in d:
            shipped[b] += 1
    assert max(shipped) <= P - 1, "each block crosses at most P-1 hops"
    assert lay.count(C - 1) == N and set(lay.inputs(C - 1)) | set(lay.commits(C - 1)) == set(range(N))
    for r in range(P):  # every block reaches every rank at most once, and readers come after the entry
        for b in range(N):
            e = lay.entry(r, b)
            assert all(e is not None and s > e for s in lay.readers(r, b))
    if mode == "full":
        assert all(lay.partial(s) == 0 for s in range(C - 1))


def test_prenorm_sends_only_the_hidden_state():
    lay = _layout(8, 4, 2, mode="prenorm")
    assert lay.num_blocks == 0 and lay.hop_tensors() == [1] * 7
    assert all(lay.delta(s) == () and lay.partial(s) == 1 for s in range(7))


def test_straddling_blocks_carry_partials():
    lay = _layout(8, 2, 2, 3)  # blocks [0,3) [3,6) [6,8); stages of 2 layers
    assert [lay.partial(s) for s in range(3)] == [1, 1, 0]
    assert lay.commits(0) == (0,) and lay.commits(1) == (1,) and lay.commits(2) == (2,)
    assert lay.delta(2) == (2,) and lay.have(3) == (0, 1)


def test_balanced_split_rule():
    assert balanced_split(8, 4) == [2, 2, 2, 2]
    assert balanced_split(7, 4) == [2, 2, 2, 1]  # extra layers: inner stages first, then 0, last the head stage
    assert balanced_split(6, 4) == [1, 2, 2, 1]
    assert balanced_split(8, 4, embed_cost=1, head_cost=1) == [1, 3, 3, 1]  # max stage cost 3 (optimal)
    assert balanced_split(10, 4, head_cost=2) == [3, 3, 3, 1]
    assert sum(balanced_split(27, 8, 0.5, 1.5)) == 27


def test_layout_validation_names_the_field():
    cfg = tiny_cfg("block", None, 2, num_layers=8)
    with pytest.raises(ConfigError, match="layers_per_stage.*entries"):
        PipelineLayout.from_model_config(cfg, 2, 2, layers_per_stage=[4, 4])
    with pytest.raises(ConfigError, match="sums to 7"):
        PipelineLayout.from_model_config(cfg, 2, 2, layers_per_stage=[2, 2, 2, 1])
    with pytest.raises(ConfigError, match="pipeline.virtual_stages"):
        PipelineLayout.from_model_config(cfg, 4, 3)
    with pytest.raises(ConfigError, match="carry no tensor"):
        PipelineLayout.from_model_config(tiny_cfg("full", num_layers=4), 2, 3, layers_per_stage=[0, 0, 0, 0, 2, 2])


def test_fingerprint_changes_with_anything_that_changes_shapes():
    a = _layout(8, 2, 2, 2)
    assert a.fingerprint() == _layout(8, 2, 2, 2).fingerprint()
    assert (
        len(
            {
                a.fingerprint(),
                _layout(8, 2, 2, 4).fingerprint(),
                a.with_cache(False).fingerprint(),
                _layout(8, 2, 2, 2, layers=[1, 3, 2, 2]).fingerprint(),
            }
        )
        == 4
    )


# ------------------------------------------------------------------------------------ stage wrapper
def test_stage_modules_share_parameters_and_keep_names():
    cfg = small_cfg("block", 8, block_size=3, tie=True)
    model = make_model(cfg)
    lay = PipelineLayout.from_model_config(cfg, 2, 2)
    full = {id(p): n for n, p in model.named_parameters()}
    owners = {}
    for r in range(2):
        for st in build_stages(model, lay, r):
            for n, p in st.named_parameters():
                assert id(p) in full, "no copies"
                assert n == full[id(p)] or (n == "lm_head.weight" and full[id(p)] == "model.embed_tokens.weight")
                owners.setdefault(full[id(p)], []).append(st.stage)
    assert set(owners) == set(full.values())
    assert owners.pop("model.embed_tokens.weight") == [0, 3]  # tied: embedding on stage 0, head copy on stage 3
    assert all(len(v) == 1 for v in owners.values())


def test_materialize_only_this_ranks_stages_from_meta():
    cfg = small_cfg("block", 8, block_size=2)
    from attnres_train.model import build_model

    model = build_model(cfg).to("meta")  # (a ``torch.device("meta")`` build imports torch._dynamo: 5 s)
    lay = PipelineLayout.from_model_config(cfg, 2, 2)
    stages = build_stages(model, lay, 0)
    materialize_stages(model, stages, "cpu")
    mine = {id(p) for st in stages for p in st.parameters()}
    for p in model.parameters():
        assert (p.device.type == "cpu") == (id(p) in mine)
    assert all(torch.isfinite(p).all() for st in stages for p in st.parameters())
    assert (
        float(stages[0].model.layers["0"].self_attention_res_proj.weight.detach().abs().sum()) == 0
    )  # zero-init queries


# ------------------------------------------------------------------------------------ runtime, one process
@pytest.mark.parametrize(
    "case",
    [
        Case("p1-v2-block", 1, 2, 2, L=4, block_size=3),
        Case("p1-v3-straddle-naive", 1, 3, 3, L=6, block_size=4, cache=False),
        Case("p1-v2-iw", 1, 2, 2, L=4, block_size=1, split_iw=True),
        Case("p1-v2-full-tied", 1, 2, 2, L=4, mode="full", tie=True),
        # sublayer partition, blocks [0-2] [3-5] [6-9] of the 10 sublayers: block 2 opens at L1's FFN inside
        # stage 1 (sublayers 2-5), block 1 straddles the first stage boundary, block 3 opens at the second
        Case("p1-v3-sublayer", 1, 3, 2, L=5, num_blocks=3, partition="sublayer", layers=[1, 2, 2]),
    ],
    ids=lambda c: c.name,
)
def test_single_process_pipeline_matches_model(case):
    got = run_case(case, 0)
    ref = reference(case.cfg(), case.dtype, case.M)
    assert abs(got["loss"] - ref["loss"]) <= 1e-12 * ref["loss"]
    for name, g in ref["grads"].items():
        err = float((got["grads"][name] - g).abs().max()) / max(float(g.abs().max()), 1e-30)
        assert err <= 1e-12, (name, err)


def test_failing_step_frees_everything_and_the_next_step_is_clean():
    case = Case("p1-fail", 1, 2, 2, L=4, block_size=1)
    cfg = case.cfg()
    model = make_model(cfg)
    lay = case.layout()
    stages = build_stages(model, lay, 0)
    rt = PipelineRuntime(stages, lay)
    mbs = make_microbatches(2)
    layer = stages[1].model.layers["2"]
    orig = layer.forward
    calls = {"n": 0}

    def boom(state):
        calls["n"] += 1
        if calls["n"] == 2:  # second microbatch of stage 1: the cache holds blocks and saved graphs by now
            raise RuntimeError("injected failure")
        return orig(state)

    layer.forward = boom
    with pytest.raises(RuntimeError, match="injected"):
        rt.step(mbs)
    assert rt._cache is None and not rt._saved and rt._tx.is_empty()
    layer.forward = orig
    model.zero_grad(set_to_none=True)
    res = rt.step(mbs)
    ref = reference(cfg, case.dtype, 2)
    assert abs(float(res.loss) - ref["loss"]) <= 1e-12 * ref["loss"]
    for n, p in model.named_parameters():
        # the failed step left partial gradients: compare the clean step after zeroing
        g = ref["grads"][n]
        assert float((p.grad - g).abs().max()) <= 1e-12 * max(float(g.abs().max()), 1e-30), n


def test_eval_mode_runs_forward_only():
    case = Case("p1-eval", 1, 2, 2, L=4, block_size=2)
    model = make_model(case.cfg())
    lay = case.layout()
    rt = PipelineRuntime(build_stages(model, lay, 0), lay)
    res = rt.step(make_microbatches(2), eval_mode=True)
    assert all(p.grad is None for p in model.parameters())
    assert abs(float(res.loss) - reference(case.cfg(), case.dtype, 2)["loss"]) <= 1e-12 * float(res.loss)


def test_pipeline_config_validation():
    from attnres_train.config.pipeline import PipelineConfig, validate_pipeline_config

    validate_pipeline_config(PipelineConfig(), pp=4, vpp=2, num_layers=16, microbatches=8)
    with pytest.raises(ConfigError, match="trainer.global_batch_size.*multiple of parallel.pp=4"):
        validate_pipeline_config(PipelineConfig(), pp=4, vpp=2, num_layers=16, microbatches=6)
    with pytest.raises(ConfigError, match="pipeline.layers_per_stage"):
        validate_pipeline_config(PipelineConfig(layers_per_stage=[8, 8]), pp=2, vpp=2, num_layers=16)
    with pytest.raises(ConfigError, match="pipeline.schedule"):
        validate_pipeline_config(PipelineConfig(schedule="1f1b"), pp=2, vpp=2)
    with pytest.raises(ConfigError, match="pipeline.comm_dtype"):
        validate_pipeline_config(PipelineConfig(comm_dtype="int8"))
