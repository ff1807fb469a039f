"""Model config schema: every architectural knob of the Kimi-Linear MoE + AttnRes model, and its validation.

These dataclasses are the Hydra structured-config schema for the ``model`` group (presets in
``configs/model/``). :func:`validate_model_config` (called by ``build_model``) raises one :class:`ConfigError`
naming the field, and refuses options the chosen mode never reads (no silent no-ops). The choice lists
(``RESIDUAL_MODES``, ``RESIDUAL_IMPLS``, ``KDA_IMPLS``) live here and the model code uses them. Conventions
(decoder layers vs sublayers, 0-based ``mla_layers``, block rules) and the rejected combinations: docs/model.md.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import List, Optional

from .errors import ConfigError
from .structured import as_structured

RESIDUAL_MODES = ("prenorm", "full", "block")
RESIDUAL_IMPLS = ("auto", "torch", "triton", "reference")  # model.residual.impl (model/depth.py resolves it)
BLOCK_PARTITIONS = ("decoder_layer", "sublayer")  # model.residual.partition (block_starts applies it)
KDA_IMPLS = ("auto", "torch", "fla")  # model.kda.impl (model/kda.py resolves it)


@dataclass
class ResidualConfig:
    """How sublayer inputs are formed: plain PreNorm residual, Full AttnRes, or Block AttnRes."""

    # prenorm (standard residual), full (attention over all earlier sublayer outputs) or block (over blocks).
    mode: str = "prenorm"
    # Block mode: number of blocks the sublayers are cut into (see partition); set this or block_size.
    num_blocks: Optional[int] = None
    # Block mode: decoder layers per block (Kimi-K3's setting); set this or num_blocks.
    block_size: Optional[int] = None
    # How num_blocks=N cuts the 2*num_layers sublayers into blocks (docs/model.md "Block partition"):
    # "decoder_layer" (blocks of num_layers // N whole decoder layers, the last taking the remainder; also the
    # only rule for block_size, Kimi-K3's decoder layers per block) or "sublayer" (the paper's §3.2 rule: blocks
    # of S = 2*num_layers // N sublayers, the last taking the remainder; a boundary may fall between a layer's
    # token mixer and its FFN). The two agree whenever N divides num_layers.
    partition: str = "decoder_layer"
    # Block/Full mode: batched phase-1 + online-softmax phase-2 (True) or direct softmax per sublayer
    # (False, the slow reference used by tests).
    two_phase: bool = True
    # Depth-mixing implementation: "torch" (hand-differentiated torch ops, the CPU path), "triton"
    # (attnres_kernels: fused phase 1/2 with a recomputing backward; CUDA, or CPU under TRITON_INTERPRET=1 for
    # tests), "reference" (plain autograd through the defining formulas, for debugging) or "auto" (triton for
    # CUDA tensors when triton imports, torch otherwise). fp64 never uses triton; two_phase=false always uses
    # the reference (tensor parallelism runs the chosen path on each rank's local shard).
    impl: str = "auto"


@dataclass
class KDAConfig:
    """Kimi Delta Attention token mixer (linear attention with a per-channel forget gate)."""

    # KDA heads per layer.
    num_heads: int = 2
    # null: hidden_size // num_heads (must divide exactly); Kimi Linear uses an explicit 128.
    head_dim: Optional[int] = 32
    # Kernel width of the short causal depthwise convolutions on q, k and v.
    conv_size: int = 4
    # Tokens per chunk of the chunked KDA recurrence; null = the core's own: 64 in fla's kernel (CUDA); in the
    # torch chunked form (CPU) 32 for head_dim >= 128, else 16 (kda.torch_default_chunk). fla supports 32 and 64.
    chunk_size: Optional[int] = None
    # "auto": flash-linear-attention's chunk_kda on CUDA when installed, pure torch otherwise.
    impl: str = "auto"


@dataclass
class MLAConfig:
    """Multi-head latent attention with NoPE (the "rope" dims exist but are never rotated)."""

    # MLA heads per layer.
    num_heads: int = 2
    # Rank of a low-rank q projection; only null (full-rank q, as in Kimi Linear) is supported.
    q_lora_rank: Optional[int] = None
    # Width of the compressed key/value latent each token stores.
    kv_lora_rank: int = 64
    # Per-head query/key dims without position information.
    qk_nope_head_dim: int = 32
    # Per-head query/key dims kept separate from the latent, as DeepSeek's RoPE dims (never rotated here).
    qk_rope_head_dim: int = 16
    # Per-head value dims.
    v_head_dim: int = 32


@dataclass
class MoEConfig:
    """DeepSeek-V3 style sigmoid-routed MoE with shared experts and aux-loss-free bias balancing."""

    # Routed experts per MoE layer.
    num_experts: int = 8
    # Routed experts each token is sent to.
    top_k: int = 2
    # Hidden width of each routed and each shared expert's SwiGLU.
    intermediate_size: int = 64
    # Experts every token goes through besides the routed ones (0 = none).
    num_shared_experts: int = 1
    # The first ``first_k_dense`` decoder layers use a dense SwiGLU FFN of ``dense_intermediate_size``.
    first_k_dense: int = 1
    # Hidden width of the dense SwiGLU FFN of the first ``first_k_dense`` layers.
    dense_intermediate_size: int = 512
    # Multiplier on the routed experts' combine weights (DeepSeek-V3's routed_scaling_factor).
    routed_scaling_factor: float = 2.446
    # Normalise each token's top_k routing weights to sum to 1 (before the scaling factor).
    renormalize: bool = True
    # False (default): weights from the unbiased sigmoid scores (DeepSeek-V3, vLLM, transformers native).
    # True: reproduce Moonshot's remote-code quirk where the correction bias leaks into the weights.
    bias_in_weights: bool = False
    # Aux-loss-free balancing: b_i += speed * sign(mean_load - load_i) after each optimizer step.
    bias_update_speed: float = 1.0e-3
    # "sign" (DeepSeek-V3) or "centered" (Moonlight: subtract the mean of the signs).
    bias_update_rule: str = "sign"
    # Sequence-wise balance loss coefficient (DeepSeek-V3 uses 1e-4); 0 disables it.
    seq_aux_loss_coef: float = 0.0


@dataclass
class ModelConfig:
    """The whole model. Defaults are the ``tiny`` test model."""

    # A label for logs, plans and exported model cards (the preset's name); no effect on the model.
    name: str = "tiny"
    # Rows of the embedding and the LM head; at least the tokenizer's vocabulary.
    vocab_size: int = 1024
    # Width of the residual stream (d).
    hidden_size: int = 128
    # Decoder layers (each a token mixer + an FFN or MoE).
    num_layers: int = 4
    # 0-based decoder layers whose token mixer is MLA; every other layer uses KDA.
    mla_layers: List[int] = field(default_factory=lambda: [3])
    # Epsilon of every RMSNorm.
    rms_norm_eps: float = 1.0e-5
    # Share the embedding matrix with the LM head.
    tie_word_embeddings: bool = False
    # Standard deviation of the normal initialisation of linear, embedding and expert weights (model/init.py).
    init_std: float = 0.02
    # Training loss: fused LM head + cross entropy over chunks of this many tokens (never the whole
    # [tokens, vocab] logits; docs/performance.md); 0 = unfused (F.linear then F.cross_entropy, logits returned).
    lm_loss_chunk_tokens: int = 1024
    kda: KDAConfig = field(default_factory=KDAConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)


def _positive(value, path: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(path, f"must be a positive integer, got {value!r}")


def validate_model_config(cfg: ModelConfig, prefix: str = "model") -> ModelConfig:
    """Check every field; raise one ConfigError naming the first bad field. Returns ``cfg``."""
    p = prefix
    for name in ("vocab_size", "hidden_size", "num_layers"):
        _positive(getattr(cfg, name), f"{p}.{name}")
    if not cfg.rms_norm_eps >= 0:
        raise ConfigError(f"{p}.rms_norm_eps", f"must be >= 0, got {cfg.rms_norm_eps!r}")
    if not cfg.init_std > 0:
        raise ConfigError(f"{p}.init_std", f"must be > 0, got {cfg.init_std!r}")
    c = cfg.lm_loss_chunk_tokens
    if not isinstance(c, int) or isinstance(c, bool) or c < 0:
        raise ConfigError(f"{p}.lm_loss_chunk_tokens", f"must be an integer >= 0 (0 = unfused), got {c!r}")
    mla = list(cfg.mla_layers)
    for i in mla:
        if not isinstance(i, int) or not 0 <= i < cfg.num_layers:
            raise ConfigError(f"{p}.mla_layers", f"index {i!r} is outside 0..{cfg.num_layers - 1} (0-based)")
    if len(set(mla)) != len(mla):
        raise ConfigError(f"{p}.mla_layers", f"duplicate layer indices in {mla}")

    k = cfg.kda
    _positive(k.num_heads, f"{p}.kda.num_heads")
    if k.head_dim is None:
        if cfg.hidden_size % k.num_heads:
            raise ConfigError(
                f"{p}.kda.num_heads",
                f"hidden_size={cfg.hidden_size} is not divisible by num_heads={k.num_heads} "
                f"(or set {p}.kda.head_dim explicitly)",
            )
        k.head_dim = cfg.hidden_size // k.num_heads
    for name in ("head_dim", "conv_size", "chunk_size"):
        if getattr(k, name) is not None or name != "chunk_size":
            _positive(getattr(k, name), f"{p}.kda.{name}")
    if k.impl not in KDA_IMPLS:
        raise ConfigError(f"{p}.kda.impl", f"must be one of {'|'.join(KDA_IMPLS)}, got {k.impl!r}")

    m = cfg.mla
    for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        _positive(getattr(m, name), f"{p}.mla.{name}")
    if not isinstance(m.qk_rope_head_dim, int) or m.qk_rope_head_dim < 0:
        raise ConfigError(f"{p}.mla.qk_rope_head_dim", f"must be an integer >= 0, got {m.qk_rope_head_dim!r}")
    if m.q_lora_rank is not None:
        raise ConfigError(f"{p}.mla.q_lora_rank", "only full-rank q (null) is supported, as in Kimi Linear")

    e = cfg.moe
    for name in ("num_experts", "top_k", "intermediate_size", "dense_intermediate_size"):
        _positive(getattr(e, name), f"{p}.moe.{name}")
    if e.top_k > e.num_experts:
        raise ConfigError(f"{p}.moe.top_k", f"top_k={e.top_k} exceeds num_experts={e.num_experts}")
    if not isinstance(e.num_shared_experts, int) or e.num_shared_experts < 0:
        raise ConfigError(f"{p}.moe.num_shared_experts", f"must be >= 0, got {e.num_shared_experts!r}")
    if not isinstance(e.first_k_dense, int) or not 0 <= e.first_k_dense <= cfg.num_layers:
        raise ConfigError(f"{p}.moe.first_k_dense", f"must be in 0..{cfg.num_layers}, got {e.first_k_dense!r}")
    if e.bias_update_rule not in ("sign", "centered"):
        raise ConfigError(f"{p}.moe.bias_update_rule", f"must be sign|centered, got {e.bias_update_rule!r}")
    if e.bias_update_speed < 0:
        raise ConfigError(f"{p}.moe.bias_update_speed", f"must be >= 0, got {e.bias_update_speed!r}")
    if e.seq_aux_loss_coef < 0:
        raise ConfigError(f"{p}.moe.seq_aux_loss_coef", f"must be >= 0, got {e.seq_aux_loss_coef!r}")
    if not e.routed_scaling_factor > 0:
        raise ConfigError(f"{p}.moe.routed_scaling_factor", f"must be > 0, got {e.routed_scaling_factor!r}")
    _reject_moe_no_ops(e, cfg.num_layers, f"{p}.moe")

    r = cfg.residual
    if r.mode not in RESIDUAL_MODES:
        raise ConfigError(f"{p}.residual.mode", f"unknown mode {r.mode!r}; choose one of {'|'.join(RESIDUAL_MODES)}")
    if r.impl not in RESIDUAL_IMPLS:
        raise ConfigError(f"{p}.residual.impl", f"must be one of {'|'.join(RESIDUAL_IMPLS)}, got {r.impl!r}")
    if r.impl == "triton" and importlib.util.find_spec("triton") is None:
        raise ConfigError(
            f"{p}.residual.impl", "'triton' needs the triton package (pip install triton); use auto|torch"
        )
    # The device is checked at the first read (the model may be built on CPU or meta and moved to CUDA later):
    # depth.resolve_impl raises a ConfigError naming this field for CPU tensors outside TRITON_INTERPRET=1.
    _reject_residual_no_ops(r, f"{p}.residual")
    if r.mode == "block":
        if (r.num_blocks is None) == (r.block_size is None):
            raise ConfigError(f"{p}.residual.num_blocks", "block mode needs exactly one of num_blocks or block_size")
        if r.num_blocks is not None:
            _positive(r.num_blocks, f"{p}.residual.num_blocks")
            if r.partition == "sublayer" and r.num_blocks > 2 * cfg.num_layers:
                raise ConfigError(
                    f"{p}.residual.num_blocks",
                    f"num_blocks={r.num_blocks} exceeds the {2 * cfg.num_layers} sublayers "
                    f"(2 x num_layers={cfg.num_layers}; partition=sublayer)",
                )
            if r.partition == "decoder_layer" and r.num_blocks > cfg.num_layers:
                raise ConfigError(
                    f"{p}.residual.num_blocks",
                    f"num_blocks={r.num_blocks} exceeds num_layers={cfg.num_layers} (partition=decoder_layer: "
                    "blocks hold whole decoder layers; partition=sublayer allows up to 2 x num_layers)",
                )
        else:
            _positive(r.block_size, f"{p}.residual.block_size")
            if r.block_size > cfg.num_layers:
                raise ConfigError(
                    f"{p}.residual.block_size", f"block_size={r.block_size} exceeds num_layers={cfg.num_layers}"
                )
    return cfg


def _reject_residual_no_ops(r: ResidualConfig, p: str) -> None:
    """A residual option the chosen mode never reads is an error, not a silently ignored setting.

    Without this, ``-m model.residual.num_blocks=1,2,4`` on a PreNorm preset trains three identical baselines.
    """
    fix = "set it to null, or pick the mode that uses it"
    if r.partition not in BLOCK_PARTITIONS:
        raise ConfigError(f"{p}.partition", f"must be one of {'|'.join(BLOCK_PARTITIONS)}, got {r.partition!r}")
    if r.mode != "block":
        for name in ("num_blocks", "block_size"):
            if getattr(r, name) is not None:
                raise ConfigError(
                    f"{p}.{name}",
                    f"{name}={getattr(r, name)!r} has no effect with mode={r.mode!r} "
                    f"(only mode=block partitions layers into blocks); {fix}",
                )
        if r.partition != BLOCK_PARTITIONS[0]:
            raise ConfigError(
                f"{p}.partition",
                f"partition={r.partition!r} has no effect with mode={r.mode!r} (only mode=block partitions "
                f"layers into blocks); leave it at {BLOCK_PARTITIONS[0]}, or pick mode=block",
            )
    elif r.partition == "sublayer" and r.block_size is not None:
        raise ConfigError(
            f"{p}.partition",
            f"partition='sublayer' does not apply to block_size={r.block_size} (block_size counts decoder "
            "layers per block, Kimi-K3's rule); give num_blocks for the paper's sublayer rule, or use "
            "partition=decoder_layer with block_size",
        )
    if r.mode == "prenorm":
        if r.two_phase is not True:
            raise ConfigError(
                f"{p}.two_phase",
                "two_phase=false has no effect with mode='prenorm' (PreNorm has "
                "no depth mixing); leave it at true, or pick mode=full|block",
            )
        if r.impl != "auto":
            raise ConfigError(
                f"{p}.impl",
                f"impl={r.impl!r} has no effect with mode='prenorm' (PreNorm has no "
                "depth mixing); leave it at auto, or pick mode=full|block",
            )
    elif r.two_phase is not True and r.impl in ("torch", "triton"):
        raise ConfigError(
            f"{p}.impl",
            f"impl={r.impl!r} has no effect with two_phase=false (the direct softmax "
            "read always runs the reference); use impl=auto|reference, or two_phase=true",
        )


def _reject_moe_no_ops(e: MoEConfig, num_layers: int, p: str) -> None:
    """Non-default MoE options that nothing reads: no MoE layer at all, or balancing switched off."""
    if e.first_k_dense == num_layers:  # every FFN is dense
        for name, default in (("seq_aux_loss_coef", 0.0), ("bias_update_rule", "sign"), ("bias_in_weights", False)):
            if getattr(e, name) != default:
                raise ConfigError(
                    f"{p}.{name}",
                    f"{name}={getattr(e, name)!r} has no effect: first_k_dense="
                    f"{e.first_k_dense} = num_layers makes every FFN dense (no MoE layer)",
                )
    if e.bias_update_speed == 0 and e.bias_update_rule != "sign":
        raise ConfigError(
            f"{p}.bias_update_rule",
            f"bias_update_rule={e.bias_update_rule!r} has no effect with "
            "bias_update_speed=0 (the router bias is never updated)",
        )


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    """Whether decoder layer ``layer_idx`` has a routed MoE FFN (every layer after the first ``moe.first_k_dense``,
    which use a dense SwiGLU): the one rule the model, FLOP counts, estimates and the HF mapping share."""
    return layer_idx >= cfg.moe.first_k_dense


def block_starts(cfg: ModelConfig) -> List[int]:
    """Sublayer indices (0..2*num_layers-1) at which a new AttnRes block starts.

    Sublayer ``2*i`` is decoder layer i's token mixer, ``2*i+1`` its FFN. Block mode with
    ``partition=decoder_layer`` starts blocks only at token mixers (decoder-layer boundaries), with
    ``partition=sublayer`` every ``2*num_layers // num_blocks`` sublayers (possibly at an FFN); full mode starts
    one at every sublayer; prenorm has none. In block mode the last block takes the remainder (num_blocks) or is
    the shorter one (block_size). Block 0 is always the embedding, so the first entry here opens block 1.
    """
    r, n = cfg.residual, cfg.num_layers
    if r.mode == "prenorm":
        return []
    if r.mode == "full":
        return list(range(2 * n))
    if r.block_size is not None:
        return [2 * i for i in range(0, n, r.block_size)]
    if r.partition == "sublayer":
        return [(2 * n // r.num_blocks) * b for b in range(r.num_blocks)]
    size = n // r.num_blocks
    return [2 * size * b for b in range(r.num_blocks)]


def as_model_config(cfg) -> ModelConfig:
    """Accept a ModelConfig, a plain dict or an OmegaConf DictConfig; return a typed ModelConfig.

    Unknown keys or wrong types raise a ConfigError naming the field.
    """
    return as_structured(ModelConfig, cfg, "model")
