"""Hugging Face config mapping: transformers ``KimiLinearConfig`` <-> our ``ModelConfig``, plus overrides.

A format module of interop/ (docs/hf_interop.md "Code layers", "Config mapping"). transformers is imported
lazily, only where a transformers object is needed: importing it takes seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from ..config.errors import ConfigError, UserInputError
from ..config.model import ModelConfig, as_model_config, validate_model_config
from .hf_mapping import ATTNRES_EXPORT_MESSAGE

HF_MODEL_TYPE = "kimi_linear"
HF_ARCHITECTURE = "KimiLinearForCausalLM"


# ================================================================================================ config
def _require_transformers():
    try:
        import transformers
        from transformers import KimiLinearConfig, KimiLinearForCausalLM  # noqa: F401
    except ImportError as exc:
        raise UserInputError(
            "Hugging Face interop needs transformers with native KimiLinear support (transformers >= 5); "
            f"import failed: {exc}"
        ) from None
    return transformers


def _hf_config_dict(hf_config: Any) -> Dict[str, Any]:
    """A plain dict of the HF config: a config.json dict as is, a transformers config via ``to_dict()``."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise UserInputError(f"expected a KimiLinear config (dict or transformers config), got {type(hf_config).__name__}")


def _normalised_hf_config(hf_config: Any):
    """The transformers ``KimiLinearConfig`` for ``hf_config`` (so we read it exactly as transformers does)."""
    _require_transformers()
    from transformers import KimiLinearConfig

    if isinstance(hf_config, KimiLinearConfig):
        return hf_config
    raw = _hf_config_dict(hf_config)
    try:
        return KimiLinearConfig.from_dict(raw)
    except Exception as exc:  # strict dataclass validation: wrong field type / value
        first = str(exc).strip().splitlines()
        raise UserInputError(f"invalid KimiLinear config: {' '.join(s.strip() for s in first[:2])}") from None


def _check_supported(raw: Dict[str, Any]) -> None:
    """Reject config features that neither our model nor transformers' native KimiLinear implements."""
    model_type = raw.get("model_type")
    if model_type != HF_MODEL_TYPE:
        hint = ""
        if isinstance(raw.get("text_config"), Mapping):
            hint = " (a multimodal/Kimi-K3 wrapper config with a text_config is not supported)"
        raise UserInputError(f"not a KimiLinear config: model_type is {model_type!r}, expected {HF_MODEL_TYPE!r}{hint}")
    lac = raw.get("linear_attn_config") or {}

    def bad(key: str, why: str) -> None:
        raise UserInputError(f"unsupported KimiLinear config field {key}: {why}")

    if raw.get("q_lora_rank") is not None:
        bad("q_lora_rank", f"low-rank q ({raw['q_lora_rank']}) is not supported; Kimi Linear uses full-rank q (null)")
    if raw.get("hidden_act", "silu") != "silu":
        bad("hidden_act", f"{raw['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    if raw.get("attention_bias", False):
        bad("attention_bias", "biased MLA projections are not supported")
    if raw.get("moe_router_activation_func", "sigmoid") != "sigmoid":
        bad("moe_router_activation_func", f"{raw['moe_router_activation_func']!r}; only 'sigmoid' is supported")
    if raw.get("mla_use_nope", True) is not True:
        bad("mla_use_nope", "RoPE in MLA is not supported (Kimi Linear's MLA is NoPE)")
    if raw.get("mla_use_output_gate", False):
        bad("mla_use_output_gate", "gated MLA (Kimi-K3) is not supported")
    if raw.get("moe_layer_freq", 1) != 1:
        bad("moe_layer_freq", f"{raw['moe_layer_freq']}; only 1 (every layer after first_k_dense_replace) is supported")
    if (raw.get("num_nextn_predict_layers") or 0) > 0:
        bad("num_nextn_predict_layers", "multi-token-prediction layers are not supported")
    if raw.get("attn_res_block_size") is not None:
        bad("attn_res_block_size", "importing Kimi-K3-style AttnRes checkpoints is not supported yet")
    if raw.get("quantization_config") is not None:
        bad("quantization_config", "quantized checkpoints are not supported; use a bf16/fp32 checkpoint")
    if lac.get("gate_lower_bound") is not None:
        bad("linear_attn_config.gate_lower_bound", "the safe (lower-bounded sigmoid) KDA gate is not supported")
    if lac.get("use_full_rank_gate", False):
        bad("linear_attn_config.use_full_rank_gate", "the full-rank KDA gate is not supported")


def config_from_hf(hf_config: Any, name: str = "hf") -> ModelConfig:
    """Our :class:`ModelConfig` for a KimiLinear HF config (a transformers config object or a config.json dict).

    The config is interpreted exactly as transformers does (through ``KimiLinearConfig``): e.g. the layer
    pattern comes from ``layer_types`` if present, else from the 1-based ``linear_attn_config`` lists, else from
    transformers' own default. MoE routing keeps transformers' semantics (``bias_in_weights=False``).
    Unsupported features raise :class:`UserInputError` naming the field.
    """
    raw = _hf_config_dict(hf_config)
    _check_supported(raw)
    c = _normalised_hf_config(hf_config)
    n = c.num_hidden_layers

    layer_types = list(c.layer_types)
    if len(layer_types) != n or any(t not in ("full_attention", "linear_attention") for t in layer_types):
        raise UserInputError(
            f"layer_types must list 'full_attention'/'linear_attention' for each of the {n} layers, got {layer_types}"
        )
    mla_layers = [i for i, t in enumerate(layer_types) if t == "full_attention"]

    mlp_types = list(c.mlp_layer_types)
    first_k_dense = sum(1 for t in mlp_types if t == "dense")
    if len(mlp_types) != n or mlp_types != ["dense"] * first_k_dense + ["sparse"] * (n - first_k_dense):
        raise UserInputError(
            f"mlp_layer_types must be 'dense' for the first k layers and 'sparse' after, got {mlp_types}"
        )
    n_group, topk_group = c.n_group or 1, c.topk_group or 1
    if n_group > 1 and topk_group < n_group:
        raise UserInputError(
            f"unsupported KimiLinear config field num_expert_group: group-limited routing "
            f"(num_expert_group={n_group}, topk_group={topk_group}) is not implemented"
        )
    if c.num_key_value_heads not in (None, c.num_attention_heads):
        raise UserInputError(
            f"unsupported KimiLinear config field num_key_value_heads: MLA expands keys/values per head, so it must "
            f"equal num_attention_heads ({c.num_attention_heads}), got {c.num_key_value_heads}"
        )

    cfg_dict = {
        "name": name,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_layers": n,
        "mla_layers": mla_layers,
        "rms_norm_eps": float(c.rms_norm_eps),
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "init_std": float(c.initializer_range),
        "kda": {
            "num_heads": c.linear_num_heads,
            "head_dim": c.linear_head_dim,
            "conv_size": c.linear_conv_kernel_dim,
        },
        "mla": {
            "num_heads": c.num_attention_heads,
            "q_lora_rank": None,
            "kv_lora_rank": c.kv_lora_rank,
            "qk_nope_head_dim": c.qk_nope_head_dim,
            "qk_rope_head_dim": c.qk_rope_head_dim,
            "v_head_dim": c.v_head_dim,
        },
        "moe": {
            "num_experts": c.num_local_experts,
            "top_k": c.num_experts_per_tok,
            "intermediate_size": c.moe_intermediate_size,
            "num_shared_experts": c.n_shared_experts,
            "first_k_dense": first_k_dense,
            "dense_intermediate_size": c.intermediate_size,
            "routed_scaling_factor": float(c.routed_scaling_factor),
            "renormalize": bool(c.norm_topk_prob),
            "bias_in_weights": False,
        },
    }
    try:
        return validate_model_config(as_model_config(cfg_dict))
    except ConfigError as exc:
        raise UserInputError(f"the HF config does not give a valid model config: {exc}") from None


def config_to_hf(model_cfg: ModelConfig):
    """A transformers ``KimiLinearConfig`` describing ``model_cfg`` (PreNorm architecture only).

    Both the resolved ``layer_types``/``mlp_layer_types`` and the released checkpoint's 1-based
    ``linear_attn_config`` lists are written, so transformers, Moonshot's remote code and vLLM all read the same
    layer pattern. Token ids are left unset (we do not know the tokenizer).
    """
    cfg = validate_model_config(as_model_config(model_cfg))
    if cfg.residual.mode != "prenorm":
        raise UserInputError(ATTNRES_EXPORT_MESSAGE.format(mode=cfg.residual.mode))
    if cfg.moe.bias_in_weights:
        raise UserInputError(
            "model.moe.bias_in_weights=True cannot be exported: transformers' KimiLinear always weights experts "
            "by the unbiased sigmoid scores, so the exported model would compute a different function"
        )
    _require_transformers()
    from transformers import KimiLinearConfig

    n, mla = cfg.num_layers, sorted(cfg.mla_layers)
    k = cfg.moe.first_k_dense
    return KimiLinearConfig(
        architectures=[HF_ARCHITECTURE],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe.dense_intermediate_size,
        moe_intermediate_size=cfg.moe.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=cfg.mla.num_heads,
        num_key_value_heads=cfg.mla.num_heads,
        n_shared_experts=cfg.moe.num_shared_experts,
        routed_scaling_factor=cfg.moe.routed_scaling_factor,
        kv_lora_rank=cfg.mla.kv_lora_rank,
        q_lora_rank=None,
        qk_rope_head_dim=cfg.mla.qk_rope_head_dim,
        v_head_dim=cfg.mla.v_head_dim,
        qk_nope_head_dim=cfg.mla.qk_nope_head_dim,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=cfg.moe.top_k,
        norm_topk_prob=cfg.moe.renormalize,
        hidden_act="silu",
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        num_local_experts=cfg.moe.num_experts,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        layer_types=["full_attention" if i in mla else "linear_attention" for i in range(n)],
        mlp_layer_types=["dense" if i < k else "sparse" for i in range(n)],
        linear_attn_config={
            "full_attn_layers": [i + 1 for i in mla],
            "kda_layers": [i + 1 for i in range(n) if i not in mla],
            "head_dim": cfg.kda.head_dim,
            "num_heads": cfg.kda.num_heads,
            "short_conv_kernel_size": cfg.kda.conv_size,
        },
        # Released-checkpoint fields that transformers ignores but Moonshot's remote code / vLLM read.
        first_k_dense_replace=k,
        moe_layer_freq=1,
        moe_router_activation_func="sigmoid",
        use_grouped_topk=True,
        mla_use_nope=True,
        num_nextn_predict_layers=0,
    )


def apply_overrides(model_cfg: ModelConfig, overrides: Optional[Mapping] = None) -> ModelConfig:
    """``model_cfg`` with nested (``residual={"mode": "block"}``) or dotted (``{"residual.mode": "block"}``)
    overrides applied; unknown fields / bad types / invalid values raise :class:`ConfigError` naming the field."""
    base = OmegaConf.to_container(OmegaConf.structured(model_cfg), resolve=True)
    for key, value in (overrides or {}).items():
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        parts = str(key).split(".")
        patch: Any = value
        for part in reversed(parts):
            patch = {part: patch}
        _deep_merge(base, patch)
    return validate_model_config(as_model_config(base))


def _deep_merge(dst: dict, src: Mapping) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = dict(v) if isinstance(v, Mapping) else v


# =========================================================================================== state dicts
