"""Config of a Kimi-Linear model with Attention Residuals (AttnRes), for ``trust_remote_code=True`` loading.

Shipped inside exports written by attnres-train (``attnres-convert to-hf``); self-contained (imports only
transformers). The fields are the released Kimi-Linear config.json names (``linear_attn_config``,
``layer_types``, ``mlp_layer_types``, ``num_experts``, ...) plus the AttnRes fields:

* ``attnres_mode``: ``"prenorm"`` (plain residual), ``"full"`` (a source per sublayer) or ``"block"``;
* ``attnres_num_blocks`` / ``attnres_block_size``: block mode, exactly one of them (decoder layers per block
  for ``block_size``; ``num_layers // num_blocks`` layers per block, the last one taking the rest, otherwise);
* ``attnres_partition``: how ``attnres_num_blocks`` cuts the 2 x num_layers sublayers: ``"decoder_layer"``
  (the rule above; also when absent) or ``"sublayer"`` (the paper's: ``2 * num_layers // num_blocks`` sublayers
  per block, the last one taking the rest, so a block may open at a layer's MLP);
* ``kda_chunk_size``: chunk length of the pure-torch chunked KDA core used for prompts;
* ``moe_bias_in_weights``: whether the router's correction bias also enters the expert weights.
"""

from transformers import PretrainedConfig


class KimiLinearAttnResConfig(PretrainedConfig):
    model_type = "kimi_linear_attnres"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache output: 5.23 name, 5.24+ name

    def __init__(
        self,
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=512,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        num_experts=8,
        num_experts_per_token=2,
        num_shared_experts=1,
        moe_renormalize=True,
        routed_scaling_factor=2.446,
        moe_bias_in_weights=False,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        layer_types=None,
        mlp_layer_types=None,
        linear_attn_config=None,
        attnres_mode="block",
        attnres_num_blocks=None,
        attnres_block_size=None,
        attnres_partition=None,
        kda_chunk_size=64,
        use_cache=True,
        **kwargs,
    ):
        lac = dict(linear_attn_config or {})
        lac.setdefault("head_dim", 32)
        lac.setdefault("num_heads", 2)
        lac.setdefault("short_conv_kernel_size", 4)
        n = num_hidden_layers
        if layer_types is None:  # the released 1-based lists, else MLA at the last layer only
            full = set(lac.get("full_attn_layers", [n]))
            layer_types = ["full_attention" if i + 1 in full else "linear_attention" for i in range(n)]
        if mlp_layer_types is None:
            k = kwargs.get("first_k_dense_replace", 1)
            mlp_layer_types = ["dense" if i < k else "sparse" for i in range(n)]
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = n
        self.num_attention_heads = num_attention_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.num_experts = num_experts
        self.num_experts_per_token = num_experts_per_token
        self.num_shared_experts = num_shared_experts
        self.moe_renormalize = moe_renormalize
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_bias_in_weights = moe_bias_in_weights
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.layer_types = list(layer_types)
        self.mlp_layer_types = list(mlp_layer_types)
        self.linear_attn_config = lac
        self.attnres_mode = attnres_mode
        self.attnres_num_blocks = attnres_num_blocks
        self.attnres_block_size = attnres_block_size
        self.attnres_partition = attnres_partition
        self.kda_chunk_size = kda_chunk_size
        self.use_cache = use_cache
        if attnres_mode not in ("prenorm", "full", "block"):
            raise ValueError(f"attnres_mode must be prenorm|full|block, got {attnres_mode!r}")
        if attnres_mode == "block" and (attnres_num_blocks is None) == (attnres_block_size is None):
            raise ValueError("attnres_mode='block' needs exactly one of attnres_num_blocks / attnres_block_size")
        if attnres_partition not in (None, "decoder_layer", "sublayer"):
            raise ValueError(f"attnres_partition must be decoder_layer|sublayer, got {attnres_partition!r}")
        if attnres_partition == "sublayer" and attnres_num_blocks is None:
            raise ValueError("attnres_partition='sublayer' needs attnres_num_blocks")
        if len(self.layer_types) != n or len(self.mlp_layer_types) != n:
            raise ValueError(f"layer_types and mlp_layer_types must have num_hidden_layers={n} entries")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def block_starts(self):
        """Sublayer indices (2i: layer i's token mixer, 2i+1: its FFN) that open a new AttnRes block."""
        n = self.num_hidden_layers
        if self.attnres_mode == "prenorm":
            return []
        if self.attnres_mode == "full":
            return list(range(2 * n))
        if self.attnres_block_size is not None:
            return [2 * i for i in range(0, n, self.attnres_block_size)]
        if self.attnres_partition == "sublayer":
            return [(2 * n // self.attnres_num_blocks) * b for b in range(self.attnres_num_blocks)]
        size = n // self.attnres_num_blocks
        return [2 * size * b for b in range(self.attnres_num_blocks)]
