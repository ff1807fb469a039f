"""AttnRes against an independent reference written straight from the paper's equations (issue 14 item 4).

Why this file exists next to ``test_model.py``'s K3 check: that check reuses the project's own ``mix_direct``
and ``layer.queries()``, so a bug inside them (the FFN reading the mixer's pseudo-query, the key-norm gain γ
dropped from the fold) is reproduced by the reference and goes unseen. Nothing here imports the code under test
beyond ``build_model`` and the module tree it returns: no ``depth``, ``depth_ops``, ``fold_query``,
``queries()``, ``block_starts`` or ``tests/model/helpers``. The reference

* reads every parameter raw, by name, from ``model.state_dict()`` (pseudo-query ``*_res_proj.weight[0]``, key
  gain ``*_res_norm.weight``, sublayer norm gains, embedding, final norm, LM head);
* has its own RMSNorm with gain and its own softmax, in fp64, with plain Python loops over sublayers and sources;
* builds each sublayer's sources from the definition (design/attnres.md §2–3, paper Eq. 2–6): sublayer l reads
  ``softmax_i(w_lᵀ RMSNorm_γl(s_i)) · s_i`` over s = [embedding] + [sum of the outputs of earlier sublayers in
  each block], where a block contributes only if one of its sublayers ran before l (so the first sublayer of a
  block sees no zero partial sum) and Full AttnRes is one block per sublayer; the output head reads all blocks;
* partitions with its own rules: ``partition=decoder_layer``: ``num_blocks=N`` → N blocks of
  ``num_layers // N`` decoder layers, the last taking the rest, ``block_size=S`` → S decoder layers per block;
  ``partition=sublayer`` (paper §3.2): N blocks of ``2·num_layers // N`` sublayers, the last taking the rest,
  so a block may open at an FFN.

Two drives: (1) every token mixer and FFN replaced by a test-owned function, so the reference recomputes the
whole network to the logits; (2) the real KDA / MLA / MoE sublayers, observed with hooks: the reference
recomputes every sublayer's input (and the head's) from the recorded sublayer outputs. Queries and every gain
are random and non-zero. Planted bugs, each made once by hand and reverted: (a) the FFN reading the mixer's
pseudo-query (``queries()``), (b) γ dropped from ``fold_query``, (c) no key norm (``depth_ops._rsqrt_ms`` → 1 and
the reference path's key normalisation removed) each failed every case here (logits off by 0.2–0.6) while
``test_model.py`` passes (a) and (b); a ceil instead of floor block size for ``num_blocks`` fails the 4 N=2/N=3
cases; the same ceil in the sublayer rule fails its 4 stand-in cases.
"""

import math

import pytest
import torch
from torch import nn

from attnres_train.config.model import ModelConfig
from attnres_train.model import build_model

D, LAYERS, B, T = 64, 5, 2, 7
EPS = 1e-6


# ---------------------------------------------------------------------------------------------- the reference
def rms_norm(x, gain, eps):
    """RMSNorm with a gain, over the last dim: ``gain ⊙ x / sqrt(mean(x²) + eps)``."""
    return gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def attnres_read(sources, w, gamma, eps):
    """Paper Eq. 2–3: ``Σ_i α_i s_i`` with ``α = softmax_i(w · RMSNorm_γ(s_i))`` per token (no temperature)."""
    logits = [(w * rms_norm(s, gamma, eps)).sum(-1) for s in sources]  # each [B, T]
    top = logits[0]
    for z in logits[1:]:
        top = torch.maximum(top, z)
    expo = [torch.exp(z - top) for z in logits]
    total = sum(expo)
    out = torch.zeros_like(sources[0])
    for e, s in zip(expo, sources):
        out = out + (e / total).unsqueeze(-1) * s
    return out, [e / total for e in expo]


def block_of_sublayer(mode, num_layers, num_blocks=None, block_size=None, partition="decoder_layer"):
    """Block id of each of the 2·num_layers sublayers (mixer 2i, FFN 2i+1) under ``partition``'s rule."""
    if mode == "full":
        return list(range(2 * num_layers))
    if partition == "sublayer":  # the paper: S = L'/N sublayers per block, the last block takes the remainder
        per_block = [2 * num_layers // num_blocks] * num_blocks
        per_block[-1] += 2 * num_layers - sum(per_block)
        return [b for b, size in enumerate(per_block) for _ in range(size)]
    if block_size is not None:
        per_layer = [i // block_size for i in range(num_layers)]
    else:
        size = num_layers // num_blocks
        per_layer = [min(i // size, num_blocks - 1) for i in range(num_layers)]
    return [per_layer[i // 2] for i in range(2 * num_layers)]


def sources_before(sub, outputs, blocks, emb):
    """[embedding] + one sum per block over the outputs of sublayers j < sub in it (blocks in order)."""
    sums = {}
    for j in range(sub):
        sums[blocks[j]] = outputs[j] if blocks[j] not in sums else sums[blocks[j]] + outputs[j]
    return [emb] + [sums[b] for b in sorted(sums)]


def query_names(sub):
    """State-dict prefixes of sublayer sub's pseudo-query / key gain, and of the sublayer's own pre-norm."""
    i, ffn = divmod(sub, 2)
    res = f"model.layers.{i}.{'mlp' if ffn else 'self_attention'}_res"
    return res, f"model.layers.{i}.{'post_attention_layernorm' if ffn else 'input_layernorm'}.weight"


def read_of(sd, sub, num_layers, sources, eps):
    """The AttnRes input of sublayer sub (sub = 2·num_layers: the output head), from raw parameters."""
    res = "model.output_attn_res" if sub == 2 * num_layers else query_names(sub)[0]
    return attnres_read(sources, sd[f"{res}_proj.weight"][0], sd[f"{res}_norm.weight"], eps)


# ------------------------------------------------------------------------------------------------ the model
def make_cfg(
    mode, num_blocks=None, block_size=None, two_phase=True, impl="auto", dense=False, partition="decoder_layer"
) -> ModelConfig:
    cfg = ModelConfig(hidden_size=D, num_layers=LAYERS, mla_layers=[3], rms_norm_eps=EPS)
    cfg.residual.mode, cfg.residual.num_blocks, cfg.residual.block_size = mode, num_blocks, block_size
    cfg.residual.partition = partition
    cfg.residual.two_phase, cfg.residual.impl = two_phase, impl
    cfg.moe.num_experts, cfg.moe.intermediate_size, cfg.moe.dense_intermediate_size = 4, 32, 96
    if dense:
        cfg.moe.first_k_dense = LAYERS
    return cfg


def random_model(cfg, seed=0):
    """fp64 model whose pseudo-queries and every RMSNorm gain are random and non-zero (γ ≠ 1)."""
    model = build_model(cfg, seed=seed).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
    return model


class Sublayer(nn.Module):
    """Test-owned stand-in for a token mixer or FFN: ``scale · tanh(x @ A)``; scales differ per sublayer."""

    def __init__(self, a, scale):
        super().__init__()
        self.a, self.scale = a, scale

    def forward(self, x):
        return self.scale * torch.tanh(x @ self.a)


def stand_ins(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D),
            0.3 + 2.0 * float(torch.rand(1, generator=g)),
        )
        for _ in range(2 * LAYERS)
    ]


def ids(seed=3):
    return torch.randint(0, 1024, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_logits(sd, tokens, blocks, subs, eps):
    """The whole network from raw parameters with the stand-in sublayers ``subs[sub] = (A, scale)``."""
    emb = sd["model.embed_tokens.weight"][tokens]
    outputs, weights = [], []
    for sub in range(2 * LAYERS):
        h, alpha = read_of(sd, sub, LAYERS, sources_before(sub, outputs, blocks, emb), eps)
        weights.append(alpha)
        x = rms_norm(h, sd[query_names(sub)[1]], eps)
        a, scale = subs[sub]
        outputs.append(scale * torch.tanh(x @ a))
    h, alpha = read_of(sd, 2 * LAYERS, LAYERS, sources_before(2 * LAYERS, outputs, blocks, emb), eps)
    weights.append(alpha)
    return rms_norm(h, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].t(), weights


CASES = [  # (mode, num_blocks, block_size, two_phase, impl, partition)
    ("full", None, None, True, "auto", "decoder_layer"),
    ("full", None, None, False, "auto", "decoder_layer"),
    ("block", 2, None, True, "auto", "decoder_layer"),  # decoder layers [0,1] [2,3,4]
    ("block", 3, None, True, "auto", "decoder_layer"),  # [0] [1] [2,3,4]
    ("block", None, 2, True, "auto", "decoder_layer"),  # [0,1] [2,3] [4]
    ("block", None, 2, True, "reference", "decoder_layer"),
    ("block", 2, None, False, "auto", "decoder_layer"),
    ("block", 1, None, True, "auto", "decoder_layer"),  # one block: the paper's "embedding isolated as b_0"
    ("block", None, 1, True, "auto", "decoder_layer"),  # a block per decoder layer (not Full: 2 sublayers each)
    ("block", 3, None, True, "auto", "sublayer"),  # sublayers [0-2] [3-5] [6-9]: block 2 opens at L1's FFN
    ("block", 3, None, True, "reference", "sublayer"),
    ("block", 3, None, False, "auto", "sublayer"),
    ("block", 4, None, True, "auto", "sublayer"),  # [0-1] [2-3] [4-5] [6-9]: the remainder in the last block
]
IDS = [
    f"{m}-N{n}-S{s}-{'2phase' if tp else 'direct'}-{i}{'-sub' if p == 'sublayer' else ''}"
    for m, n, s, tp, i, p in CASES
]


@pytest.mark.parametrize("mode,nb,bs,two_phase,impl,partition", CASES, ids=IDS)
def test_logits_match_the_paper_equations_with_stand_in_sublayers(mode, nb, bs, two_phase, impl, partition):
    model = random_model(make_cfg(mode, nb, bs, two_phase, impl, dense=True, partition=partition))
    subs = stand_ins()
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = Sublayer(*subs[2 * i])
        layer.mlp = Sublayer(*subs[2 * i + 1])
    tokens = ids()
    with torch.no_grad():
        got = model(tokens)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    blocks = block_of_sublayer(mode, LAYERS, nb, bs, partition)
    want, weights = reference_logits(sd, tokens, blocks, subs, EPS)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # The check has teeth: the depth weights are far from uniform, and another partition gives other logits.
    assert max(float((a[0] - 1 / len(a)).abs().max()) for a in weights[1:] if len(a) > 1) > 0.2
    other = block_of_sublayer("full", LAYERS) if mode == "block" else block_of_sublayer("block", LAYERS, 2)
    assert float((reference_logits(sd, tokens, other, subs, EPS)[0] - want).abs().max()) > 1e-3


@pytest.mark.parametrize(
    "mode,nb,bs,partition",
    [
        ("full", None, None, "decoder_layer"),
        ("block", 2, None, "decoder_layer"),
        ("block", None, 2, "decoder_layer"),
        ("block", 2, None, "sublayer"),  # sublayers [0-4] [5-9]: block 2 opens at L2's (MoE) FFN
    ],
    ids=["full", "block-N2", "block-S2", "block-N2-sub"],
)
def test_every_sublayer_input_of_the_real_network_matches_the_paper_equations(mode, nb, bs, partition):
    """Real KDA / MLA / dense / MoE sublayers, observed: each recorded input is recomputed from recorded outputs."""
    model = random_model(make_cfg(mode, nb, bs, partition=partition), seed=7)
    inputs, outputs, hooks = {}, {}, []

    def keep_input(sub):
        return lambda mod, args: inputs.__setitem__(sub, args[0].detach())

    def keep_output(sub):
        return lambda mod, args, out: outputs.__setitem__(sub, (out[0] if isinstance(out, tuple) else out).detach())

    for i, layer in enumerate(model.model.layers):
        ffn = layer.block_sparse_moe if hasattr(layer, "block_sparse_moe") else layer.mlp
        hooks += [
            layer.input_layernorm.register_forward_pre_hook(keep_input(2 * i)),
            layer.post_attention_layernorm.register_forward_pre_hook(keep_input(2 * i + 1)),
            layer.self_attn.register_forward_hook(keep_output(2 * i)),
            ffn.register_forward_hook(keep_output(2 * i + 1)),
        ]
    hooks.append(model.model.norm.register_forward_pre_hook(keep_input(2 * LAYERS)))
    assert {type(layer.self_attn).__name__ for layer in model.model.layers} == {
        "KimiDeltaAttention",
        "MultiLatentAttention",
    }
    assert any(hasattr(layer, "block_sparse_moe") for layer in model.model.layers)
    tokens = ids(4)
    with torch.no_grad():
        logits = model(tokens)
    for h in hooks:
        h.remove()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    emb = sd["model.embed_tokens.weight"][tokens]
    blocks = block_of_sublayer(mode, LAYERS, nb, bs, partition)
    recorded = [outputs[sub] for sub in range(2 * LAYERS)]
    for sub in range(2 * LAYERS + 1):
        want, _ = read_of(sd, sub, LAYERS, sources_before(sub, recorded, blocks, emb), EPS)
        torch.testing.assert_close(
            inputs[sub], want, rtol=1e-9, atol=1e-9, msg=lambda m, sub=sub: f"sublayer {sub}: {m}"
        )
    want_logits = rms_norm(inputs[2 * LAYERS], sd["model.norm.weight"], EPS) @ sd["lm_head.weight"].t()
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)
