"""Tensor mapping between our state dict and Hugging Face KimiLinear's: pure functions over tensors, no files.

The bottom layer of interop/: formats and the file API build on it (docs/hf_interop.md "Code layers"). It
reads either HF layout (the released checkpoint's on-disk names, or transformers' runtime names) and writes
either; every name and shape is in docs/hf_interop.md "Tensor name mapping".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..config.errors import UserInputError
from ..config.model import ModelConfig, as_model_config, is_moe_layer, validate_model_config
from ..model import build_model

LAYOUTS = ("checkpoint", "transformers")

ATTNRES_EXPORT_MESSAGE = (
    "an AttnRes model (residual.mode={mode!r}) cannot be exported in the native transformers KimiLinear format, "
    "which has no Attention Residuals; use the trust_remote_code format instead (format 'remote' / "
    "'--format remote', the default 'auto' picks it), which ships its modeling code with the weights"
)


class _Reader:
    """Takes tensors out of an HF state dict with clear errors; remembers what was used."""

    def __init__(self, sd: Mapping[str, torch.Tensor]):
        self.sd = sd
        self.used: set = set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str, shape: Optional[Tuple[int, ...]] = None, numel: Optional[int] = None) -> torch.Tensor:
        if key not in self.sd:
            raise UserInputError(f"HF state dict is missing tensor {key!r}")
        t = self.sd[key]
        if not isinstance(t, torch.Tensor):
            raise UserInputError(f"HF state dict entry {key!r} is a {type(t).__name__}, not a tensor")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise UserInputError(f"HF tensor {key!r} has shape {tuple(t.shape)}, but the config needs {tuple(shape)}")
        if numel is not None and t.numel() != numel:
            raise UserInputError(f"HF tensor {key!r} has shape {tuple(t.shape)}, but the config needs {numel} values")
        self.used.add(key)
        return t

    def leftover(self) -> List[str]:
        return sorted(k for k in self.sd if k not in self.used)


def _dims(cfg: ModelConfig) -> Dict[str, int]:
    return {
        "d": cfg.hidden_size,
        "H": cfg.kda.num_heads,
        "K": cfg.kda.head_dim,
        "W": cfg.kda.conv_size,
        "mH": cfg.mla.num_heads,
        "qk": cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim,
        "nope": cfg.mla.qk_nope_head_dim,
        "rope": cfg.mla.qk_rope_head_dim,
        "v": cfg.mla.v_head_dim,
        "r": cfg.mla.kv_lora_rank,
        "E": cfg.moe.num_experts,
        "ff": cfg.moe.intermediate_size,
        "sff": cfg.moe.intermediate_size * cfg.moe.num_shared_experts,
        "dff": cfg.moe.dense_intermediate_size,
    }


def _kda_linear_shapes(x: Dict[str, int]) -> Dict[str, Tuple[int, int]]:
    d, HK, K, H = x["d"], x["H"] * x["K"], x["K"], x["H"]
    return {
        "q_proj": (HK, d),
        "k_proj": (HK, d),
        "v_proj": (HK, d),
        "f_a_proj": (K, d),
        "f_b_proj": (HK, K),
        "b_proj": (H, d),
        "g_a_proj": (K, d),
        "g_b_proj": (HK, K),
        "o_proj": (d, HK),
    }


def _mla_shapes(x: Dict[str, int]) -> Dict[str, Tuple[int, ...]]:
    d = x["d"]
    return {
        "q_proj.weight": (x["mH"] * x["qk"], d),
        "kv_a_proj_with_mqa.weight": (x["r"] + x["rope"], d),
        "kv_a_layernorm.weight": (x["r"],),
        "kv_b_proj.weight": (x["mH"] * (x["nope"] + x["v"]), x["r"]),
        "o_proj.weight": (d, x["mH"] * x["v"]),
    }


def _swiglu_shapes(d: int, ff: int) -> Dict[str, Tuple[int, int]]:
    return {"gate_proj.weight": (ff, d), "up_proj.weight": (ff, d), "down_proj.weight": (d, ff)}


def _copy_norms_and_mla(src: "_Reader", out: dict, p: str, x: Dict[str, int], is_mla: bool) -> None:
    """Tensors named the same in every layout: a layer's two RMSNorms and, for MLA layers, the whole mixer."""
    d = x["d"]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{p}{norm}.weight"] = src.take(f"{p}{norm}.weight", (d,))
    if is_mla:
        a = p + "self_attn."
        for name, shape in _mla_shapes(x).items():
            out[a + name] = src.take(a + name, shape)


def state_dict_from_hf(sd: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Convert an HF KimiLinear state dict (checkpoint or transformers runtime layout) to our layout.

    Every tensor is checked against the shapes ``model_cfg`` implies; missing, unexpected or mis-shaped tensors
    raise :class:`UserInputError` naming the key. When ``model_cfg.residual.mode`` is ``block``/``full`` the
    AttnRes tensors are added with their initial values (key-norm gains 1, pseudo-queries 0), so the loaded
    model starts as the uniform-average AttnRes network of the paper.
    """
    out: Dict[str, torch.Tensor] = {}
    for part in iter_state_dict_from_hf(sd, model_cfg):
        out.update(part)
    return out


def iter_state_dict_from_hf(
    sd: Mapping[str, torch.Tensor], model_cfg: ModelConfig
) -> Iterator[Dict[str, torch.Tensor]]:
    """:func:`state_dict_from_hf` one part at a time: the embedding / final norm / head (and the initial AttnRes
    tensors), then one decoder layer per part. With a lazy ``sd`` (``hf_files.LazySafetensors``) only the part
    being converted is in memory, so a consumer that keeps just its own shards never holds the whole model.
    The leftover check runs after the last part."""
    cfg = validate_model_config(as_model_config(model_cfg))
    x = _dims(cfg)
    src = _Reader(sd)
    d = x["d"]
    mla_layers = set(cfg.mla_layers)

    top: Dict[str, torch.Tensor] = {}
    top["model.embed_tokens.weight"] = src.take("model.embed_tokens.weight", (cfg.vocab_size, d))
    top["model.norm.weight"] = src.take("model.norm.weight", (d,))
    if src.has("lm_head.weight"):
        top["lm_head.weight"] = src.take("lm_head.weight", (cfg.vocab_size, d))
        if cfg.tie_word_embeddings and not torch.equal(top["lm_head.weight"], top["model.embed_tokens.weight"]):
            raise UserInputError(
                "config has tie_word_embeddings=true but 'lm_head.weight' differs from 'model.embed_tokens.weight' "
                "(transformers' KimiLinear never ties them); set tie_word_embeddings=false in config.json to import "
                "them as separate weights"
            )
    elif cfg.tie_word_embeddings:
        top["lm_head.weight"] = top["model.embed_tokens.weight"]
    else:
        src.take("lm_head.weight")  # raises: missing
    if cfg.residual.mode != "prenorm":
        top.update(initial_attnres_tensors(cfg, dtype=top["model.norm.weight"].dtype))
    yield top
    del top

    for i in range(cfg.num_layers):
        out: Dict[str, torch.Tensor] = {}
        p = f"model.layers.{i}."
        _copy_norms_and_mla(src, out, p, x, i in mla_layers)
        if i not in mla_layers:
            _kda_from_hf(src, out, p + "self_attn.", x)
        if not is_moe_layer(cfg, i):
            # The released checkpoint names the dense FFN ``mlp.*``; transformers 5.x save_pretrained writes
            # ``block_sparse_moe.*`` (its reverse rename also hits dense layers). Accept both.
            dense = p + ("mlp." if src.has(f"{p}mlp.gate_proj.weight") else "block_sparse_moe.")
            for name, shape in _swiglu_shapes(d, x["dff"]).items():
                out[f"{p}mlp.{name}"] = src.take(dense + name, shape)
        else:
            _moe_from_hf(src, out, p, x)
        yield out

    leftover = src.leftover()
    if leftover:
        more = f" (and {len(leftover) - 5} more)" if len(leftover) > 5 else ""
        raise UserInputError(
            f"HF state dict has tensors the config does not use: {', '.join(leftover[:5])}{more}; "
            "does config.json match the weights?"
        )


def _kda_from_hf(src: _Reader, out: dict, a: str, x: Dict[str, int]) -> None:
    H, K, W = x["H"], x["K"], x["W"]
    HK = H * K
    fg = a + "forget_gate."  # transformers runtime layout keeps the forget-gate tensors in a submodule
    runtime = src.has(a + "conv1d.weight") or src.has(fg + "A_log")
    for name, shape in _kda_linear_shapes(x).items():
        key = f"{a}{name}.weight"
        if name in ("f_a_proj", "f_b_proj") and runtime and not src.has(key):
            key = f"{fg}{name}.weight"
        out[f"{a}{name}.weight"] = src.take(key, shape)
    if src.has(a + "conv1d.weight"):
        conv = src.take(a + "conv1d.weight", (3 * HK, 1, W))
        for j, name in enumerate(("q_conv1d", "k_conv1d", "v_conv1d")):
            out[f"{a}{name}.weight"] = conv[j * HK : (j + 1) * HK]
    else:
        for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
            out[f"{a}{name}.weight"] = src.take(f"{a}{name}.weight", (HK, 1, W))
    gate = fg if runtime and src.has(fg + "A_log") else a
    out[a + "A_log"] = src.take(gate + "A_log", numel=H).reshape(H)
    out[a + "dt_bias"] = src.take(gate + "dt_bias", (HK,))
    out[a + "o_norm.weight"] = src.take(a + "o_norm.weight", (K,))


def _moe_from_hf(src: _Reader, out: dict, p: str, x: Dict[str, int]) -> None:
    E, ff, d = x["E"], x["ff"], x["d"]
    hf = p + ("block_sparse_moe." if src.has(p + "block_sparse_moe.gate.weight") else "mlp.")
    o = p + "block_sparse_moe."
    out[o + "gate.weight"] = src.take(hf + "gate.weight", (E, d))
    out[o + "gate.e_score_correction_bias"] = src.take(hf + "gate.e_score_correction_bias", (E,))
    if src.has(hf + "experts.gate_up_proj"):  # transformers runtime layout: [E, 2ff, d] = [gate; up]
        gate_up = src.take(hf + "experts.gate_up_proj", (E, 2 * ff, d))
        out[o + "experts.w1"], out[o + "experts.w3"] = gate_up[:, :ff], gate_up[:, ff:]
        out[o + "experts.w2"] = src.take(hf + "experts.down_proj", (E, d, ff))
    elif src.has(hf + "experts.w1"):  # already stacked (our layout)
        out[o + "experts.w1"] = src.take(hf + "experts.w1", (E, ff, d))
        out[o + "experts.w3"] = src.take(hf + "experts.w3", (E, ff, d))
        out[o + "experts.w2"] = src.take(hf + "experts.w2", (E, d, ff))
    else:  # checkpoint layout: one Linear per expert
        for w, shape in (("w1", (ff, d)), ("w3", (ff, d)), ("w2", (d, ff))):
            out[f"{o}experts.{w}"] = torch.stack([src.take(f"{hf}experts.{j}.{w}.weight", shape) for j in range(E)])
    if x["sff"] > 0:
        for name, shape in _swiglu_shapes(d, x["sff"]).items():
            out[f"{o}shared_experts.{name}"] = src.take(f"{hf}shared_experts.{name}", shape)
    else:  # transformers always builds a (zero-width) shared expert
        for name in _swiglu_shapes(d, 0):
            key = f"{hf}shared_experts.{name}"
            if src.has(key) and src.sd[key].numel() == 0:
                src.take(key)


def initial_attnres_tensors(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """AttnRes tensors at their initial values: key-norm gains 1, pseudo-queries 0 (Kimi-K3 names)."""
    d = cfg.hidden_size
    out: Dict[str, torch.Tensor] = {}
    prefixes = [f"model.layers.{i}.{s}" for i in range(cfg.num_layers) for s in ("self_attention_res", "mlp_res")]
    for pre in prefixes + ["model.output_attn_res"]:
        out[f"{pre}_norm.weight"] = torch.ones(d, dtype=dtype)
        out[f"{pre}_proj.weight"] = torch.zeros(1, d, dtype=dtype)
    return out


def state_dict_to_hf(
    sd: Mapping[str, torch.Tensor], model_cfg: ModelConfig, layout: str = "checkpoint"
) -> Dict[str, torch.Tensor]:
    """Convert our state dict to an HF KimiLinear one (PreNorm models only).

    ``layout="checkpoint"`` (default) gives the on-disk layout of the released checkpoint and of transformers'
    ``save_pretrained`` (per-expert ``w1/w2/w3``); ``layout="transformers"`` gives the names of
    ``KimiLinearForCausalLM.state_dict()`` (for ``load_state_dict`` on an instantiated transformers model).
    With tied embeddings ``lm_head.weight`` is still written: transformers' KimiLinear never ties them.
    """
    cfg = validate_model_config(as_model_config(model_cfg))
    if cfg.residual.mode != "prenorm":
        raise UserInputError(ATTNRES_EXPORT_MESSAGE.format(mode=cfg.residual.mode))
    out: Dict[str, torch.Tensor] = {}
    for layer, keys in group_keys(sd, cfg.num_layers).items():
        out.update(group_to_hf({k: sd[k] for k in keys}, cfg, layer, layout))
    return out


def group_keys(keys, num_layers: int) -> Dict[Optional[int], List[str]]:
    """Our tensor names grouped for streaming conversion: ``None`` (embedding, final norm, head, output
    AttnRes query) first, then one group per decoder layer. Always has every group, possibly empty."""
    groups: Dict[Optional[int], List[str]] = {None: []}
    groups.update({i: [] for i in range(num_layers)})
    for k in keys:
        parts = k.split(".")
        i = int(parts[2]) if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None
        groups.setdefault(i, []).append(k)
    return groups


def group_to_hf(
    sd: Mapping[str, torch.Tensor], cfg: ModelConfig, layer: Optional[int], layout: str = "checkpoint"
) -> Dict[str, torch.Tensor]:
    """Convert one :func:`group_keys` group (``layer=None``: the non-layer tensors) of a PreNorm state dict.

    ``cfg`` may have any residual mode, but ``sd`` must not hold AttnRes tensors (the remote-code export passes
    them through itself). Missing, unexpected or mis-shaped tensors raise :class:`UserInputError`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    x = _dims(cfg)
    src = _Reader(sd)
    out: Dict[str, torch.Tensor] = {}
    d, H, E = x["d"], x["H"], x["E"]
    runtime = layout == "transformers"

    if layer is None:
        out["model.embed_tokens.weight"] = src.take("model.embed_tokens.weight", (cfg.vocab_size, d))
        out["model.norm.weight"] = src.take("model.norm.weight", (d,))
        if src.has("lm_head.weight"):
            out["lm_head.weight"] = src.take("lm_head.weight", (cfg.vocab_size, d))
        elif cfg.tie_word_embeddings:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        else:
            src.take("lm_head.weight")
        _check_leftover(src)
        return out
    i = layer
    p = f"model.layers.{i}."
    a = p + "self_attn."
    _copy_norms_and_mla(src, out, p, x, i in set(cfg.mla_layers))
    if i not in set(cfg.mla_layers):
        fg = a + "forget_gate." if runtime else a
        for name, shape in _kda_linear_shapes(x).items():
            dst = fg if name in ("f_a_proj", "f_b_proj") else a
            out[f"{dst}{name}.weight"] = src.take(f"{a}{name}.weight", shape)
        convs = [src.take(f"{a}{n}.weight", (H * x["K"], 1, x["W"])) for n in ("q_conv1d", "k_conv1d", "v_conv1d")]
        if runtime:
            out[a + "conv1d.weight"] = torch.cat(convs, dim=0)
        else:
            for n, t in zip(("q_conv1d", "k_conv1d", "v_conv1d"), convs):
                out[f"{a}{n}.weight"] = t
        out[fg + "A_log"] = src.take(a + "A_log", numel=H).reshape(1, 1, H, 1)
        out[fg + "dt_bias"] = src.take(a + "dt_bias", (H * x["K"],))
        out[a + "o_norm.weight"] = src.take(a + "o_norm.weight", (x["K"],))
    if not is_moe_layer(cfg, i):
        for name, shape in _swiglu_shapes(d, x["dff"]).items():
            out[f"{p}mlp.{name}"] = src.take(f"{p}mlp.{name}", shape)
        _check_leftover(src)
        return out
    o = p + "block_sparse_moe."
    hf = p + ("mlp." if runtime else "block_sparse_moe.")
    out[hf + "gate.weight"] = src.take(o + "gate.weight", (E, d))
    out[hf + "gate.e_score_correction_bias"] = src.take(o + "gate.e_score_correction_bias", (E,))
    w1 = src.take(o + "experts.w1", (E, x["ff"], d))
    w3 = src.take(o + "experts.w3", (E, x["ff"], d))
    w2 = src.take(o + "experts.w2", (E, d, x["ff"]))
    if runtime:
        out[hf + "experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        out[hf + "experts.down_proj"] = w2
    else:
        for j in range(E):
            out[f"{hf}experts.{j}.w1.weight"] = w1[j]
            out[f"{hf}experts.{j}.w3.weight"] = w3[j]
            out[f"{hf}experts.{j}.w2.weight"] = w2[j]
    for name, shape in _swiglu_shapes(d, x["sff"]).items():
        key = f"{o}shared_experts.{name}"
        out[f"{hf}shared_experts.{name}"] = src.take(key, shape) if x["sff"] > 0 else torch.zeros(shape)
    _check_leftover(src)
    return out


def _check_leftover(src: _Reader) -> None:
    leftover = src.leftover()
    if leftover:
        raise UserInputError(f"state dict has tensors the config does not describe: {', '.join(leftover[:5])}")


def check_state_dict(sd: Mapping[str, torch.Tensor], model_cfg: ModelConfig, what: str = "checkpoint") -> None:
    """Raise :class:`UserInputError` unless ``sd`` has exactly the keys and shapes of our model for ``model_cfg``.

    The reference model is built on the meta device, so this costs no memory.
    """
    expected = {k: tuple(v.shape) for k, v in build_model(model_cfg, device="meta").state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise UserInputError(
            f"{what} is missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise UserInputError(
            f"{what} has unexpected tensor {unexpected[0]!r}"
            + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise UserInputError(f"{what} tensor {k!r} has shape {tuple(sd[k].shape)}, the config needs {shape}")
