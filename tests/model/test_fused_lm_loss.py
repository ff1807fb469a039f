"""The fused, chunked LM head + cross entropy (``attnres_train.model.lm_loss``) equals the plain head.

Reference everywhere: ``F.linear`` then ``F.cross_entropy`` written here (or, for the whole model, the same model
with ``lm_loss_chunk_tokens=0``), in fp64 to 1e-10: loss, hidden-state gradient, head-weight gradient (tied: the
embedding gradient), ignored labels, chunk sizes that do not divide the token count, a non-unit upstream
gradient, the pipeline's last stage, and the all-ignored batch (nan loss, zero gradients, as torch). Under bf16
autocast the matmuls run in bf16 (observed at the ATen level) and the loss is fp32 and close to the plain
autocast loss. A dispatch mode checks that no tensor with ``tokens * vocab`` elements is ever created.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from attnres_train.config.errors import ConfigError
from attnres_train.config.model import validate_model_config
from attnres_train.model.lm_loss import fused_linear_cross_entropy

from .helpers import build, randomize_queries, tiny_cfg

TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _inputs(B=3, T=7, d=16, V=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, d, generator=g, dtype=torch.float64) * 2).to(dtype)
    w = torch.randn(V, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 2:5] = -100
    y[2, 0] = -100
    return h, w, y


def _plain(h, w, y, scale=1.0):
    """Loss and gradients of the unfused head: F.linear -> fp32/fp64 logits -> F.cross_entropy."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = F.linear(h, w)
    loss = F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1), y.flatten(), ignore_index=-100
    )
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def _fused(h, w, y, chunk, scale=1.0):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, y, chunk)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 4, 5, 21, 1000])  # 21 tokens: 5 and 4 do not divide it, 1000 > tokens
def test_loss_and_gradients_equal_the_plain_head_fp64(chunk):
    h, w, y = _inputs()
    want = _plain(h, w, y, scale=2.5)
    got = _fused(h, w, y, chunk, scale=2.5)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        assert a.dtype == b.dtype == torch.float64, name
        assert _rel(a, b) <= TOL, f"chunk {chunk}: {name} rel err {_rel(a, b):.2e}"


def test_tied_head_gives_the_embedding_gradient():
    """One matrix as embedding and head: its gradient sums both uses, as with the plain head."""
    g = torch.Generator().manual_seed(1)
    V, d = 30, 8
    emb = torch.randn(V, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 9), generator=g)
    y = torch.roll(ids, -1, dims=1)
    y[:, -1] = -100

    def run(fused):
        e = emb.clone().requires_grad_()
        h = torch.tanh(e[ids] @ mix)
        if fused:
            loss = fused_linear_cross_entropy(h, e, y, 4)
        else:
            loss = F.cross_entropy(F.linear(h, e).flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        return loss.detach(), e.grad

    (l_f, g_f), (l_p, g_p) = run(True), run(False)
    assert _rel(l_f, l_p) <= TOL
    assert _rel(g_f, g_p) <= TOL


def test_all_labels_ignored_behaves_as_torch():
    h, w, y = _inputs()
    y[:] = -100
    loss, gh, gw = _fused(h, w, y, 5)
    ref, rh, rw = _plain(h, w, y)
    assert torch.isnan(loss) and torch.isnan(ref)
    assert torch.equal(gh, rh) and torch.equal(gw, rw) and not gh.any() and not gw.any()


def test_backward_twice_with_retain_graph():
    """The zero-bubble pipeline schedule back-propagates through the loss twice (inputs, then weights)."""
    h, w, y = _inputs()
    _, rh, rw = _plain(h, w, y)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, y, 5)
    (gh,) = torch.autograd.grad(loss, [h], retain_graph=True)
    (gw,) = torch.autograd.grad(loss, [w])
    assert _rel(gh, rh) <= TOL and _rel(gw, rw) <= TOL


def test_no_grad_pass_is_loss_only():
    h, w, y = _inputs()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h.requires_grad_(), w, y, 5)
    assert loss.grad_fn is None
    assert _rel(loss, _plain(h.detach(), w, y)[0]) <= TOL


class _Biggest(TorchDispatchMode):
    """Largest number of elements of any new tensor (not a view, e.g. of ``weight.t()``) with last dim ``vocab``
    that an ATen op returns (logits-like), and the dtypes ``mm``-like ops see."""

    def __init__(self, vocab: int = -1):
        super().__init__()
        self.vocab, self.numel, self.mm_dtypes = vocab, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == self.vocab and not func.is_view:
                self.numel = max(self.numel, t.numel())
        if func.__name__.split(".")[0] in ("mm", "addmm", "matmul", "linear"):
            self.mm_dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return out


def test_never_builds_the_full_logits():
    h, w, y = _inputs(B=4, T=32, d=8, V=64)  # 128 tokens x 64 vocab; chunks of 16 tokens
    h.requires_grad_()
    w.requires_grad_()
    with _Biggest(64) as probe:
        fused_linear_cross_entropy(h, w, y, 16).backward()
    assert probe.numel <= 16 * 64, probe.numel  # one chunk of logits at most (never 128 x 64)
    with _Biggest(64) as probe:
        F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten()).backward()
    assert probe.numel == 128 * 64  # the probe does see the plain head's full logits


def test_bf16_autocast_matmuls_in_bf16_loss_in_fp32():
    h, w, y = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _Biggest() as probe:
            loss, gh, gw = _fused(h, w, y, 5)
        ref, rh, rw = _plain(h, w, y)
    assert probe.mm_dtypes == {torch.bfloat16}, probe.mm_dtypes
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    # Same bf16 logits; the gradients differ by bf16 rounding (fp32 accumulation over chunks here).
    assert _rel(loss, ref) <= 1e-3
    assert _rel(gh, rh) <= 3e-2 and _rel(gw, rw) <= 3e-2


def test_bf16_gradients_have_the_plain_heads_scale():
    """bf16 matmuls: the gradients' overall scale matches the plain head's (autograd scales (softmax - onehot) by
    1/n_valid in fp32, then casts to bf16). With 255 valid labels a bf16-rounded 1/n_valid is 0.39% off and the
    bf16 cast of the scaled vs unscaled buffer differs systematically (~0.7% here); per-element noise is < 0.1%."""
    g = torch.Generator().manual_seed(3)
    n, d, v = 260, 64, 1000
    h = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.05).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[:5] = -100  # 255 valid labels
    from attnres_train.model.lm_loss import chunked_linear_cross_entropy

    _, gh, gw = chunked_linear_cross_entropy(h.detach(), w.detach(), y, 128, True)
    F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100).backward()
    for got, ref in ((gh, h.grad), (gw, w.grad)):
        got, ref = got.double(), ref.double()
        ratio = (got * ref).sum() / (ref * ref).sum()  # overall scale of the fused gradient against the plain one
        assert abs(ratio.item() - 1.0) < 1.5e-3, ratio.item()


# -------------------------------------------------------------------------------------- whole model
def _model_pair(tie: bool, chunk: int = 5):
    # vocab 104: no other tensor of the model has a last dim of that size (the logits probe below)
    cfg = tiny_cfg("block", block_size=2, num_layers=3, tie_word_embeddings=tie, vocab_size=104, hidden_size=32)
    cfg.lm_loss_chunk_tokens = 0
    plain = build(cfg)
    randomize_queries(plain)
    fused = copy.deepcopy(plain)
    fused.config.lm_loss_chunk_tokens = chunk
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)
    labels[1, :4] = -100
    return plain, fused, ids, labels


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_whole_model_fused_equals_unfused_fp64(tie):
    plain, fused, ids, labels = _model_pair(tie)
    out_p, out_f = plain(ids, labels=labels), fused(ids, labels=labels)
    assert out_f.logits is None and out_p.logits is not None
    (out_p.loss + out_p.aux_loss if out_p.aux_loss is not None else out_p.loss).backward()
    (out_f.loss + out_f.aux_loss if out_f.aux_loss is not None else out_f.loss).backward()
    assert _rel(out_f.loss.detach(), out_p.loss.detach()) <= TOL
    ref = dict(plain.named_parameters())
    n = 0
    for name, p in fused.named_parameters():
        assert (p.grad is None) == (ref[name].grad is None), name
        if p.grad is not None:
            assert _rel(p.grad, ref[name].grad) <= TOL, f"{name}: rel err {_rel(p.grad, ref[name].grad):.2e}"
            n += 1
    assert n > 20


def test_pipeline_last_stage_uses_the_fused_loss():
    """Two stages in one process (layers split 2 + 1): the last stage's fused loss equals the unfused model's."""
    from attnres_train.parallel.pipeline.layout import PipelineLayout
    from attnres_train.parallel.pipeline.stage import build_stages

    plain, fused, ids, labels = _model_pair(tie=True, chunk=4)
    s0, s1 = build_stages(fused, PipelineLayout.from_model_config(fused.config, 1, 2), 0)
    with _Biggest(fused.config.vocab_size) as probe:
        out = s1(state=s0(input_ids=ids).state, labels=labels)
        out.loss.backward()
    assert 0 < probe.numel <= 4 * fused.config.vocab_size  # chunks of 4 tokens' logits, never all 22 tokens'.
    ref = plain(ids, labels=labels)
    ref.loss.backward()
    assert _rel(out.loss.detach(), ref.loss.detach()) <= TOL
    for name, p in fused.named_parameters():
        if p.grad is not None:
            q = dict(plain.named_parameters())[name]
            assert _rel(p.grad, q.grad) <= TOL, name


def test_config_rejects_a_negative_chunk():
    cfg = tiny_cfg()
    cfg.lm_loss_chunk_tokens = -1
    with pytest.raises(ConfigError, match="model.lm_loss_chunk_tokens"):
        validate_model_config(cfg)
