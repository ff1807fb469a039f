"""Kimi-Linear with Attention Residuals for ``transformers`` (``trust_remote_code=True``): forward and generate.

Shipped inside exports written by attnres-train (``attnres-convert to-hf`` of a Block/Full AttnRes model).
Self-contained: plain torch + transformers' ``PreTrainedModel`` / ``GenerationMixin``; it never imports
attnres-train. Tensor names are the released Kimi-Linear checkpoint names (per-expert ``w1/w2/w3``, separate
``q/k/v_conv1d``, ``A_log [1,1,H,1]``) plus the Kimi-K3 AttnRes names (``*_res_norm.weight``,
``*_res_proj.weight``), so the files load without any renaming.

What it computes (the same function as attnres-train's model, up to float rounding):
* token mixers: KDA (short causal conv + SiLU on q/k/v, per-channel forget gate, delta rule; a pure-torch
  chunked core for prompts and a recurrent step for decoding) or NoPE MLA (full-rank q, latent kv, one
  un-rotated key slice shared by all heads);
* FFN: dense SwiGLU for the first layers, then a sigmoid-routed MoE (top-k on score + correction bias, weights
  from the unbiased scores, renormalised, scaled) plus the shared expert;
* residuals: ``attnres_mode`` prenorm (``h + f(norm(h))``), full or block AttnRes: every sublayer input is a
  per-token softmax over the embedding, completed block sums and the open block's partial sum, keyed by the
  RMS-normalised sources and a learned pseudo-query (``proj.weight[0] * norm.weight``), in fp32.
Decoding keeps a cache per layer (KDA conv tails and recurrent state; MLA keys/values); AttnRes needs no cache
(it mixes over depth, per token). Greedy and sampled generation are supported, beam search is not.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_attnres import KimiLinearAttnResConfig

# transformers 5.24 renamed the decoding cache from ``past_key_values`` to ``cache``, both as the forward argument
# that ``generate()`` passes and as the output field it reads back (the old names are deprecated until 6.0). Follow
# whichever name the installed version declares, so one file serves every supported version.
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"

KV_A_LAYERNORM_EPS = 1e-6  # Kimi-Linear's MLA latent norm uses the class default eps, not rms_norm_eps


def _cdt(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_cdt(x.dtype))
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AttnResCache:
    """Per-layer decoding state: KDA ``{"q","k","v": conv tails [B,C,W-1], "S": [B,H,K,V]}``, MLA ``(k, v)``."""

    def __init__(self, num_layers: int):
        self.layers: List[Optional[object]] = [None] * num_layers
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


# ---------------------------------------------------------------------------------------------------- KDA
def _l2norm(x, eps=1e-6):
    xf = x.to(_cdt(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _short_conv(x_btc, weight, tail):
    """Causal depthwise conv + SiLU; ``tail`` holds the previous W-1 inputs ``[B,C,W-1]`` (None: zeros)."""
    W = weight.shape[-1]
    x_bct = x_btc.transpose(1, 2)
    x_bct = F.pad(x_bct, (W - 1, 0)) if tail is None else torch.cat([tail.to(x_bct.dtype), x_bct], dim=-1)
    y = F.conv1d(x_bct, weight.to(x_btc.dtype), groups=weight.shape[0]).transpose(1, 2)
    return F.silu(y), x_bct[..., x_bct.shape[-1] - (W - 1) :]


def kda_recurrent(q, k, v, g, beta, scale, state):
    """Per-token delta rule: ``S <- diag(exp g) S; S += k (beta (v - S^T k))^T; o = S^T q * scale``."""
    B, T, H, K = q.shape
    dt = _cdt(torch.promote_types(q.dtype, g.dtype))
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if state is None else state.to(dt)
    q, k, v, g, beta = (t.to(dt) for t in (q, k, v, g, beta))
    outs = []
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)
        pred = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        S = S + k[:, t].unsqueeze(-1) * (beta[:, t].unsqueeze(-1) * (v[:, t] - pred)).unsqueeze(-2)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(outs, dim=1), S


def kda_chunked(q, k, v, g, beta, scale, chunk, state):
    """Chunkwise (WY/UT) form of :func:`kda_recurrent`: exact up to rounding; tail zero-padded (state-neutral)."""
    B, T, H, K = q.shape
    V, C = v.shape[-1], chunk
    dt = _cdt(torch.promote_types(q.dtype, g.dtype))
    N = -(-T // C)
    pad = N * C - T

    def chunks(x):
        x = x.to(dt)
        x = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        return x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q_c, k_c, g_c, v_c = chunks(q) * scale, chunks(k), chunks(g), chunks(v)
    beta_c = chunks(beta.unsqueeze(-1)).squeeze(-1)
    G = g_c.cumsum(-2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = (G.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~causal[:, :, None], float("-inf"))
    Dk = diff.exp() * k_c.unsqueeze(-3)  # [B,H,N,r,i,K]
    P = (Dk * q_c.unsqueeze(-2)).sum(-1)
    L = ((Dk * k_c.unsqueeze(-2)).sum(-1) * beta_c.unsqueeze(-1)).tril(-1)
    eG = G.exp()
    rhs = beta_c.unsqueeze(-1) * torch.cat((eG * k_c, v_c), dim=-1)
    WU = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    Wm, U = WU[..., :K], WU[..., K:]
    q_eff, o_intra = eG * q_c - P @ Wm, P @ U
    G_last = G[..., -1:, :]
    Kd_t = ((G_last - G).exp() * k_c).transpose(-1, -2)
    trans = torch.diag_embed(G_last.squeeze(-2).exp()) - Kd_t @ Wm
    write = Kd_t @ U
    S = q.new_zeros(B, H, K, V, dtype=dt) if state is None else state.to(dt)
    outs = []
    for n in range(N):
        outs.append(q_eff[:, :, n] @ S + o_intra[:, :, n])
        S = trans[:, :, n] @ S + write[:, :, n]
    o = torch.stack(outs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o, S


class KimiDeltaAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        lac = config.linear_attn_config
        d, H, K, W = config.hidden_size, lac["num_heads"], lac["head_dim"], lac["short_conv_kernel_size"]
        self.layer_idx, self.H, self.K = layer_idx, H, K
        self.chunk = config.kda_chunk_size or 16  # null: the torch chunked form's default
        HK = H * K
        self.q_proj = nn.Linear(d, HK, bias=False)
        self.k_proj = nn.Linear(d, HK, bias=False)
        self.v_proj = nn.Linear(d, HK, bias=False)
        self.q_conv1d = nn.Conv1d(HK, HK, W, groups=HK, bias=False)
        self.k_conv1d = nn.Conv1d(HK, HK, W, groups=HK, bias=False)
        self.v_conv1d = nn.Conv1d(HK, HK, W, groups=HK, bias=False)
        self.f_a_proj = nn.Linear(d, K, bias=False)
        self.f_b_proj = nn.Linear(K, HK, bias=False)
        self.A_log = nn.Parameter(torch.zeros(1, 1, H, 1))
        self.dt_bias = nn.Parameter(torch.zeros(HK))
        self.b_proj = nn.Linear(d, H, bias=False)
        self.g_a_proj = nn.Linear(d, K, bias=False)
        self.g_b_proj = nn.Linear(K, HK, bias=False)
        self.o_norm = RMSNorm(K, config.rms_norm_eps)
        self.o_proj = nn.Linear(HK, d, bias=False)

    def forward(self, x, cache: Optional[AttnResCache], mask):
        B, T, _ = x.shape
        H, K = self.H, self.K
        if mask is not None:  # padded positions contribute nothing to the state
            x = x * mask[:, -T:, None].to(x.dtype)
        st = cache.layers[self.layer_idx] if cache is not None else None
        q, tq = _short_conv(self.q_proj(x), self.q_conv1d.weight, st and st["q"])
        k, tk = _short_conv(self.k_proj(x), self.k_conv1d.weight, st and st["k"])
        v, tv = _short_conv(self.v_proj(x), self.v_conv1d.weight, st and st["v"])
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, K)
        cdt = _cdt(x.dtype)
        raw = self.f_b_proj(self.f_a_proj(x)).view(B, T, H, K).to(cdt) + self.dt_bias.to(cdt).view(H, K)
        g = -self.A_log.to(cdt).reshape(H, 1).exp() * F.softplus(raw)
        beta = torch.sigmoid(self.b_proj(x).to(cdt))
        q, k = _l2norm(q), _l2norm(k)
        S0 = st["S"] if st is not None else None
        if S0 is not None and T == 1:
            o, S = kda_recurrent(q, k, v, g, beta, K**-0.5, S0)
        else:
            o, S = kda_chunked(q, k, v, g, beta, K**-0.5, self.chunk, S0)
        if cache is not None:
            cache.layers[self.layer_idx] = {"q": tq, "k": tk, "v": tv, "S": S}
        gate = torch.sigmoid(self.g_b_proj(self.g_a_proj(x))).view(B, T, H, K)
        y = self.o_norm(o.to(v.dtype)) * gate
        return self.o_proj(y.reshape(B, T, -1).to(x.dtype))


# ---------------------------------------------------------------------------------------------------- MLA
class MultiLatentAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d, H = config.hidden_size, config.num_attention_heads
        self.layer_idx, self.H = layer_idx, H
        self.nope, self.rope, self.vdim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        self.scale = (self.nope + self.rope) ** -0.5
        self.q_proj = nn.Linear(d, H * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, KV_A_LAYERNORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(H * self.vdim, d, bias=False)

    def forward(self, x, cache: Optional[AttnResCache], mask):
        B, T, _ = x.shape
        H = self.H
        q = self.q_proj(x).view(B, T, H, self.nope + self.rope).transpose(1, 2)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c)).view(B, T, H, self.nope + self.vdim)
        k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.rope)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            past = cache.layers[self.layer_idx]
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            cache.layers[self.layer_idx] = (k, v)
        P = k.shape[2] - T
        if P == 0 and mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            pos = torch.arange(P + T, device=x.device)
            allowed = pos[None, :] <= (P + torch.arange(T, device=x.device))[:, None]  # [T, P+T]
            allowed = allowed[None, None]
            if mask is not None:
                allowed = allowed & mask[:, None, None, -(P + T) :].bool()
                allowed = allowed | (pos[None, :] == P + torch.arange(T, device=x.device)[:, None])  # no empty row
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


# ---------------------------------------------------------------------------------------------------- MoE
class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        E = config.num_experts
        self.top_k, self.renorm = config.num_experts_per_token, config.moe_renormalize
        self.scale, self.bias_in_weights = config.routed_scaling_factor, config.moe_bias_in_weights
        self.weight = nn.Parameter(torch.zeros(E, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x_TD):
        cdt = _cdt(x_TD.dtype)
        scores = F.linear(x_TD.to(cdt), self.weight.to(cdt)).sigmoid()
        biased = scores + self.e_score_correction_bias.to(cdt)
        idx = torch.topk(biased, self.top_k, dim=-1, sorted=False).indices
        w = (biased if self.bias_in_weights else scores).gather(1, idx)
        if self.renorm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.scale


class Expert(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.w1 = nn.Linear(d, ff, bias=False)  # gate
        self.w2 = nn.Linear(ff, d, bias=False)  # down
        self.w3 = nn.Linear(d, ff, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, ff = config.hidden_size, config.moe_intermediate_size
        self.gate = Router(config)
        self.experts = nn.ModuleList(Expert(d, ff) for _ in range(config.num_experts))
        n_shared = config.num_shared_experts
        self.shared_experts = SwiGLU(d, ff * n_shared) if n_shared > 0 else None

    def forward(self, x):
        B, T, D = x.shape
        x_TD = x.reshape(B * T, D)
        idx, w = self.gate(x_TD)
        acc = x_TD.new_zeros(B * T, D, dtype=_cdt(x.dtype))
        for e in torch.unique(idx).tolist():
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            y = self.experts[e](x_TD[rows])
            acc.index_add_(0, rows, y.to(acc.dtype) * w[rows, slot].to(acc.dtype).unsqueeze(-1))
        out = acc.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_TD)
        return out.view(B, T, D)


# ------------------------------------------------------------------------------------------------ AttnRes
def depth_mix(sources: List[torch.Tensor], q_d: torch.Tensor, eps: float) -> torch.Tensor:
    """Softmax over sources of ``q . RMSNorm(v)`` (no temperature), weighted sum of the raw sources, in fp32."""
    if len(sources) == 1:
        return sources[0]
    dtype = sources[0].dtype
    V = torch.stack(sources).to(_cdt(dtype))
    logits = (V * torch.rsqrt(V.pow(2).mean(-1, keepdim=True) + eps)) @ q_d.to(V.dtype)
    return (torch.softmax(logits, dim=0).unsqueeze(-1) * V).sum(0).to(dtype)


class DepthQuery(nn.Module):
    """Holder of the ``*_res_norm`` / ``*_res_proj`` parameters of one AttnRes read."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(d, eps)
        self.proj = nn.Linear(d, 1, bias=False)
        self.proj._attnres_query = True

    def query(self):
        return self.proj.weight[0] * self.norm.weight


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, starts: set):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.eps, self.mode = eps, config.attnres_mode
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        is_mla = config.layer_types[layer_idx] == "full_attention"
        self.self_attn = (MultiLatentAttention if is_mla else KimiDeltaAttention)(config, layer_idx)
        self.is_moe = config.mlp_layer_types[layer_idx] == "sparse"
        if self.is_moe:
            self.block_sparse_moe = MoE(config)
        else:
            self.mlp = SwiGLU(d, config.intermediate_size)
        self.opens = (2 * layer_idx in starts, 2 * layer_idx + 1 in starts)
        if self.mode != "prenorm":
            q_attn, q_mlp = DepthQuery(d, eps), DepthQuery(d, eps)
            self.self_attention_res_norm, self.self_attention_res_proj = q_attn.norm, q_attn.proj
            self.mlp_res_norm, self.mlp_res_proj = q_mlp.norm, q_mlp.proj

    def _sub(self, k, h, cache, mask):
        if k == 0:
            return self.self_attn(self.input_layernorm(h), cache, mask)
        h = self.post_attention_layernorm(h)
        return self.block_sparse_moe(h) if self.is_moe else self.mlp(h)

    def forward(self, blocks, partial, cache, mask):
        if self.mode == "prenorm":
            h = partial + self._sub(0, partial, cache, mask)
            return blocks, h + self._sub(1, h, cache, mask)
        queries = (
            self.self_attention_res_proj.weight[0] * self.self_attention_res_norm.weight,
            self.mlp_res_proj.weight[0] * self.mlp_res_norm.weight,
        )
        for k in (0, 1):
            if self.opens[k] and partial is not None:
                blocks, partial = blocks + [partial], None
            h = depth_mix(blocks + ([partial] if partial is not None else []), queries[k], self.eps)
            y = self._sub(k, h, cache, mask)
            partial = y if partial is None else partial + y
        return blocks, partial


# ------------------------------------------------------------------------------------------------ models
class KimiLinearAttnResPreTrainedModel(PreTrainedModel):
    config_class = KimiLinearAttnResConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we build our own AttnResCache in forward

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_attnres_query", False):
                module.weight.zero_()  # AttnRes pseudo-queries start at zero
            else:
                module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.Conv1d):
            module.reset_parameters()
        elif isinstance(module, KimiDeltaAttention):
            module.A_log.copy_(torch.empty_like(module.A_log).uniform_(1, 16).log())
            dt = torch.empty_like(module.dt_bias).uniform_(-6.9, -2.3).exp()  # logU(1e-3, 1e-1)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif isinstance(module, Router):
            module.weight.normal_(0.0, std)
            module.e_score_correction_bias.zero_()


class KimiLinearAttnResModel(KimiLinearAttnResPreTrainedModel):
    def __init__(self, config: KimiLinearAttnResConfig):
        super().__init__(config)
        d = config.hidden_size
        starts = set(config.block_starts())
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(DecoderLayer(config, i, starts) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        if config.attnres_mode != "prenorm":
            q = DepthQuery(d, config.rms_norm_eps)
            self.output_attn_res_norm, self.output_attn_res_proj = q.norm, q.proj
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, inputs_embeds=None, cache=None, mask=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.attnres_mode == "prenorm":
            blocks, partial = [], x
        else:
            blocks, partial = [x], None
        for layer in self.layers:
            blocks, partial = layer(blocks, partial, cache, mask)
        if self.config.attnres_mode == "prenorm":
            return self.norm(partial)
        q = self.output_attn_res_proj.weight[0] * self.output_attn_res_norm.weight
        return self.norm(depth_mix(blocks + ([partial] if partial is not None else []), q, self.config.rms_norm_eps))


class KimiLinearAttnResForCausalLM(KimiLinearAttnResPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: KimiLinearAttnResConfig):
        super().__init__(config)
        self.model = KimiLinearAttnResModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        return_dict=None,
        past_key_values=None,
        **kwargs,
    ):
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the decoding cache once: as `cache` (transformers >= 5.24) or `past_key_values`")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, AttnResCache):
            raise TypeError(f"this model decodes with its own AttnResCache, got {type(cache).__name__}")
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training and labels is None
        if use_cache and cache is None:
            cache = AttnResCache(self.config.num_hidden_layers)
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        T = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        hidden = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache if use_cache else None, mask=mask
        )
        if use_cache:
            cache.seen += T
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep > 0 else slice(None)
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            shift = logits[:, :-1].to(_cdt(logits.dtype))
            loss = F.cross_entropy(shift.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
