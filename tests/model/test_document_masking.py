"""Document masking: a packed sample computes every document exactly as if it were run alone (fp64, CPU).

The expected values come from the plain, unmasked model run on each document separately (no document ids
at all), so they share no code with the masks under test. Boundaries sit inside KDA chunks, exactly on chunk
edges, and a one-token document is included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnres_train.config.errors import ConfigError
from attnres_train.config.model import KDAConfig, MLAConfig, ModelConfig, MoEConfig, ResidualConfig
from attnres_train.model.doc_mask import document_ids
from attnres_train.model.kda import KimiDeltaAttention
from attnres_train.model.kda_ops import kda_chunked, kda_recurrent, l2norm, short_conv
from attnres_train.model.transformer import build_model

F64 = torch.float64
EOS = 63
CHUNK = 8
# Document lengths per row (each document's last token is its EOS, except a row's last, truncated document).
# Row 0: starts at 5 (inside chunk 0), 8 and 16 (chunk edges), 17 (a one-token document: just its EOS), 25.
# Row 1: starts at 13 and 15 (inside chunks), one long document across two chunk edges.
LENGTHS = [[5, 3, 8, 1, 8, 7], [13, 2, 17]]
T = 32


def packed_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lens in LENGTHS:
        assert sum(lens) == T
        docs = []
        for j, n in enumerate(lens):
            doc = torch.randint(0, EOS, (n,), generator=g)  # never EOS inside a document
            if j < len(lens) - 1:
                doc[-1] = EOS
            docs.append(doc)
        rows.append(docs)
    ids = torch.stack([torch.cat(docs) for docs in rows])
    return ids, rows


def tiny_model(mode: str = "block"):
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=4,
        mla_layers=[1, 3],
        lm_loss_chunk_tokens=0,
        kda=KDAConfig(num_heads=2, head_dim=8, conv_size=4, chunk_size=CHUNK, impl="torch"),
        mla=MLAConfig(num_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
        moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16, first_k_dense=2, dense_intermediate_size=32),
        residual=ResidualConfig(mode=mode, num_blocks=2 if mode == "block" else None),
    )
    model = build_model(cfg, dtype=F64, seed=3)
    with torch.no_grad():  # non-zero AttnRes queries, so depth mixing is not uniform
        for name, p in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.normal_(0, 0.5)
    return model


def doc_loss_sum(logits_TV: torch.Tensor, tokens_T: torch.Tensor) -> torch.Tensor:
    """Summed next-token CE over the targets inside one document (positions 0..n-2 predict 1..n-1)."""
    if tokens_T.numel() < 2:
        return logits_TV.sum() * 0
    return F.cross_entropy(logits_TV[:-1], tokens_T[1:], reduction="sum")


def test_document_ids_from_eos():
    ids, _ = packed_batch()
    want = torch.stack([torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)) for lens in LENGTHS])
    assert torch.equal(document_ids(ids, EOS), want)


@pytest.mark.parametrize("mode", ["block", "prenorm"])
def test_packed_equals_each_document_alone(mode):
    """Logits, per-document losses and parameter gradients of the packed batch equal separate runs."""
    model = tiny_model(mode)
    ids, rows = packed_batch()
    logits = model(ids, doc_ids=document_ids(ids, EOS))
    packed_losses, starts = [], []
    for b, docs in enumerate(rows):
        s = 0
        for doc in docs:
            packed_losses.append(doc_loss_sum(logits[b, s : s + len(doc)], doc))
            starts.append((b, s))
            s += len(doc)
    torch.stack(packed_losses).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    alone_losses, worst = [], 0.0
    for (b, s), doc in zip(starts, [d for docs in rows for d in docs]):
        alone = model(doc[None])[0]  # the plain model: no document ids, nothing else in the sample
        worst = max(worst, (alone - logits[b, s : s + len(doc)]).abs().max().item())
        alone_losses.append(doc_loss_sum(alone, doc))
    torch.stack(alone_losses).sum().backward()
    assert worst < 1e-10
    torch.testing.assert_close(torch.stack(packed_losses), torch.stack(alone_losses), rtol=0, atol=1e-10)
    alone_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) > 20
    for n in packed_grads:
        torch.testing.assert_close(packed_grads[n], alone_grads[n], rtol=0, atol=1e-10, msg=n)

    # Without masking the documents do mix (so the check above is not vacuous).
    unmasked = model(ids)
    b, s = starts[2]
    assert (unmasked[b, s : s + 8] - logits[b, s : s + 8]).abs().max() > 1e-4


def test_masking_off_is_todays_model():
    """doc_ids=None is bit-for-bit the call without the argument; one document everywhere equals no masking."""
    model = tiny_model()
    ids, _ = packed_batch(seed=1)
    plain = model(ids)
    assert torch.equal(model(ids, doc_ids=None), plain)
    one_doc = torch.zeros_like(ids)
    torch.testing.assert_close(model(ids, doc_ids=one_doc), plain, rtol=0, atol=1e-12)


def _core_inputs(B, T_, H=2, K=8, V=6, g_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    q, k = l2norm(rn(B, T_, H, K)), l2norm(rn(B, T_, H, K))
    return [
        q,
        k,
        rn(B, T_, H, V),
        -g_scale * torch.rand(B, T_, H, K, generator=g, dtype=F64),
        torch.rand(B, T_, H, generator=g, dtype=F64),
    ]


def naive_delta_rule(q, k, v, g, beta):
    """Per-token delta rule for one sequence ``[T,H,*]`` from zero state, written out per head."""
    T_, H, K = q.shape
    out = torch.zeros(T_, H, v.shape[-1], dtype=F64)
    for h in range(H):
        S = torch.zeros(K, v.shape[-1], dtype=F64)
        for t in range(T_):
            S = torch.diag(g[t, h].exp()) @ S
            S = S + torch.outer(k[t, h], beta[t, h] * (v[t, h] - S.T @ k[t, h]))
            out[t, h] = S.T @ q[t, h] * K**-0.5
    return out


@pytest.mark.parametrize("g_scale", [1.0, 60.0])
def test_kda_cores_reset_state_at_document_starts(g_scale):
    """Chunked and recurrent cores with doc ids equal a naive loop per document; grads finite and equal."""
    lens = LENGTHS
    inputs = [x.requires_grad_() for x in _core_inputs(2, T, g_scale=g_scale)]
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lens])
    o_chunk, S_chunk = kda_chunked(*inputs, chunk_size=CHUNK, doc_ids=doc, output_final_state=True)
    o_rec, S_rec = kda_recurrent(*inputs, doc_ids=doc, output_final_state=True)
    with torch.no_grad():
        for b, r in enumerate(lens):
            s = 0
            for n in r:
                want = naive_delta_rule(*(x[b, s : s + n] for x in inputs))
                torch.testing.assert_close(o_chunk[b, s : s + n], want, rtol=0, atol=1e-11)
                torch.testing.assert_close(o_rec[b, s : s + n], want, rtol=0, atol=1e-11)
                s += n
    torch.testing.assert_close(S_chunk, S_rec, rtol=0, atol=1e-11)
    w = torch.randn(o_chunk.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    gc = torch.autograd.grad((o_chunk * w).sum() + S_chunk.sum(), inputs)
    gr = torch.autograd.grad((o_rec * w).sum() + S_rec.sum(), inputs)
    for a, b in zip(gc, gr):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_short_conv_does_not_mix_documents():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, T, 5, generator=g, dtype=F64)
    w = torch.randn(5, 1, 4, generator=g, dtype=F64)
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in LENGTHS])
    y = short_conv(x, w, silu=False, doc_ids=doc)
    want = torch.zeros_like(x)
    for b in range(2):
        for t in range(T):
            for j in range(4):  # tap j reads x_{t-j} with weight w[:, 0, 3-j], same document only
                if t - j >= 0 and doc[b, t - j] == doc[b, t]:
                    want[b, t] += w[:, 0, 3 - j] * x[b, t - j]
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


def test_fla_core_with_document_masking_is_an_error():
    cfg = ModelConfig(hidden_size=32, kda=KDAConfig(num_heads=2, head_dim=8, chunk_size=CHUNK))
    layer = KimiDeltaAttention(cfg).double()
    with pytest.raises(ConfigError, match="model.kda.impl"):
        layer(torch.zeros(1, 4, 32, dtype=F64), core="fla", doc_ids=torch.zeros(1, 4, dtype=torch.long))


def test_train_module_passes_document_ids():
    """data.document_masking reaches the model through the train module (loss of a packed batch)."""
    from types import SimpleNamespace

    from attnres_train.config.data import DataConfig, validate_data_config
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.train import OptimConfig
    from attnres_train.parallel.mesh import single_process_context
    from attnres_train.train.train_module import TrainModule, document_masking_eos

    assert document_masking_eos(DataConfig(), SimpleNamespace(eos_id=EOS)) is None
    on = validate_data_config(DataConfig(document_masking=True))
    assert document_masking_eos(on, SimpleNamespace(eos_id=EOS)) == EOS
    with pytest.raises(ConfigError, match="data.document_masking"):
        document_masking_eos(on, SimpleNamespace(eos_id=None, name="no-eos"))
    with pytest.raises(ConfigError, match="data.document_masking"):
        validate_data_config(DataConfig(document_masking="yes"))

    ids, rows = packed_batch()
    batch = torch.cat([ids, torch.full((2, 1), 7)], dim=1)  # [B, T+1]: inputs and shifted targets
    model = tiny_model()
    tcfg = TrainerConfig(micro_batch_size=2, global_batch_size=2)
    module = TrainModule(model, OptimConfig(), tcfg, single_process_context(), 10, doc_eos_id=EOS)
    got = module.forward_backward(batch)["loss"]
    # Expected: mean CE of the per-document forward passes (each document alone), targets as in the batch.
    with torch.no_grad():
        logits = torch.cat([torch.cat([model(d[None])[0] for d in docs]) for docs in rows]).view(2, T, -1)
        want = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
        plain = model(ids, labels=batch[:, 1:]).loss.item()
    assert abs(got - want) < 1e-10 and abs(plain - want) > 1e-4


def test_depth_statistics_use_the_masked_forward():
    """The AttnRes depth weights (trainer diagnostics) of a packed sample equal each document's own."""
    model = tiny_model()
    ids, rows = packed_batch(seed=4)
    packed = model.depth_attention(ids[:1], doc_ids=document_ids(ids[:1], EOS))
    s = 0
    for doc in rows[0]:
        alone = model.depth_attention(doc[None])
        for w_packed, w_alone in zip(packed, alone, strict=True):
            torch.testing.assert_close(w_packed[:, 0, s : s + len(doc)], w_alone[:, 0], rtol=0, atol=1e-10)
        s += len(doc)
