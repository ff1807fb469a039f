"""HF interop: our model vs transformers' native KimiLinear on tiny random models (CPU, no network).

What is proven here:
* ``load_from_hf`` of a ``save_pretrained`` directory gives transformers' logits (fp32 1e-4, fp64 1e-10), with a
  non-zero router correction bias so that biased selection / unbiased weighting is exercised;
* ``save_to_hf`` of our PreNorm model loads in ``KimiLinearForCausalLM.from_pretrained`` with bit-identical
  tensors and the same logits (AttnRes exports: ``test_hf_remote.py``; training checkpoints:
  ``test_checkpoint_export.py``);
* importing into Block / Full AttnRes (zero pseudo-queries) reproduces the PreNorm function;
* the ``attnres-convert`` round trip, and clear one-line errors for bad input.

fp64 note: transformers' KimiLinear casts to ``torch.float32`` in several places meant as *up*casts from bf16
(RMSNorm, gated norm, forget gate, KDA core, router), which *down*casts an fp64 model. For the fp64 comparisons
we run transformers under :class:`KeepFloat64`, which turns exactly those fp64→fp32 casts into no-ops, i.e. the
"compute in at least fp32" setting both implementations intend.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "KimiLinearForCausalLM"):
    pytest.skip("this transformers has no native KimiLinear", allow_module_level=True)

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402

from attnres_train.cli.convert import main as convert_main  # noqa: E402
from attnres_train.config.errors import UserInputError  # noqa: E402
from attnres_train.interop import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    load_from_hf,
    save_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)

VOCAB, T = 1024, 40  # T: not a multiple of our KDA chunk (16) nor of transformers' (64)


def tiny_hf_config(rms_norm_eps: float = 1e-5) -> KimiLinearConfig:
    """The spec's debug model: 4 layers, MLA at 1-based layer 4, first layer dense, 8 experts top-2 + 1 shared."""
    return KimiLinearConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        kv_lora_rank=64,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        routed_scaling_factor=2.446,
        rms_norm_eps=rms_norm_eps,
        initializer_range=0.05,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        first_k_dense_replace=1,
        linear_attn_config={
            "full_attn_layers": [4],
            "kda_layers": [1, 2, 3],
            "head_dim": 32,
            "num_heads": 2,
            "short_conv_kernel_size": 4,
        },
    )


def random_hf_model(rms_norm_eps: float, seed: int) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(tiny_hf_config(rms_norm_eps)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)  # O(1) residual stream (see the AttnRes test)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # every RMSNorm gain, incl. o_norm and kv_a_layernorm
                p.uniform_(0.5, 1.5)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):  # MoE layer: non-zero aux-loss-free correction bias
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.config._experts_implementation = "eager"  # grouped_mm has no fp64 on CPU
    return model


class KeepFloat64(TorchFunctionMode):
    """Make fp64→fp32 casts (``.to``/``.type``/``.float``/``dtype=float32``) no-ops for fp64 tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is not None and src.dtype == torch.float64:
            if func is torch.Tensor.float:
                return src
            if func in (torch.Tensor.to, torch.Tensor.type):
                args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        if kwargs.get("dtype") is torch.float32 and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args
        ):
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


@torch.no_grad()
def hf_logits(model: KimiLinearForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    if next(model.parameters()).dtype == torch.float64:
        with KeepFloat64():
            return model(ids).logits
    return model(ids).logits


@torch.no_grad()
def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (ours - ref).abs().max().item()
    hint = ""
    if ours.dtype == torch.float64 and err > tol:
        hint = " (~1e-8 in fp64 means some op of ours computed in fp32, e.g. an fp32 cast in the MoE router)"
    assert err < tol, f"max |logits diff| = {err:.3e} >= {tol:.0e}{hint}"


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_model() -> KimiLinearForCausalLM:
    return random_hf_model(1e-5, seed=0)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_tiny")
    hf_model.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ configs
def test_config_mapping_and_round_trip(hf_model):
    cfg = config_from_hf(hf_model.config)
    assert cfg.mla_layers == [3]  # 1-based full_attn_layers=[4]
    assert (cfg.kda.num_heads, cfg.kda.head_dim, cfg.kda.conv_size) == (2, 32, 4)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.num_shared_experts, cfg.moe.first_k_dense) == (8, 2, 1, 1)
    assert (cfg.moe.intermediate_size, cfg.moe.dense_intermediate_size) == (64, 256)
    assert cfg.moe.bias_in_weights is False and cfg.moe.renormalize is True
    assert cfg.residual.mode == "prenorm"

    hf = config_to_hf(cfg)
    assert hf.layer_types == hf_model.config.layer_types
    assert hf.mlp_layer_types == hf_model.config.mlp_layer_types
    assert hf.linear_attn_config["full_attn_layers"] == [4] and hf.linear_attn_config["kda_layers"] == [1, 2, 3]
    assert config_from_hf(hf, name=cfg.name) == cfg
    assert config_from_hf(json.loads(hf.to_json_string()), name=cfg.name) == cfg


def test_config_from_released_style_dict():
    """The released 48B config.json keys (1-based layer lists inside linear_attn_config)."""
    mla = [4, 8, 12, 16, 20, 24, 27]
    released = {
        "model_type": "kimi_linear",
        "architectures": ["KimiLinearForCausalLM"],
        "vocab_size": 163840,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "moe_intermediate_size": 1024,
        "num_hidden_layers": 27,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_experts": 256,
        "num_experts_per_token": 8,
        "num_shared_experts": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "moe_renormalize": True,
        "moe_router_activation_func": "sigmoid",
        "routed_scaling_factor": 2.446,
        "use_grouped_topk": True,
        "num_expert_group": 1,
        "topk_group": 1,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "mla_use_nope": True,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
        "pad_token_id": 163839,
        "linear_attn_config": {
            "full_attn_layers": mla,
            "kda_layers": [i for i in range(1, 28) if i not in mla],
            "head_dim": 128,
            "num_heads": 32,
            "short_conv_kernel_size": 4,
        },
    }
    cfg = config_from_hf(released)
    assert cfg.mla_layers == [3, 7, 11, 15, 19, 23, 26]
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.first_k_dense) == (256, 8, 1)
    assert (cfg.kda.num_heads, cfg.kda.head_dim, cfg.mla.kv_lora_rank) == (32, 128, 512)


# ------------------------------------------------------------------------------------------- parity
def test_load_from_hf_matches_transformers_fp32(hf_model, hf_dir, ids):
    ref = hf_logits(hf_model, ids)
    model, cfg = load_from_hf(hf_dir)
    assert cfg.residual.mode == "prenorm" and not model.training
    assert_logits_close(our_logits(model, ids), ref, 1e-4)

    # The parity is sensitive to the routing semantics: weights from the *unbiased* scores (transformers,
    # DeepSeek-V3, vLLM) vs Moonshot's remote-code quirk where the correction bias leaks into the weights.
    quirk, _ = load_from_hf(hf_dir, moe={"bias_in_weights": True})
    assert (our_logits(quirk, ids) - ref).abs().max().item() > 1e-3


def test_router_bias_changes_expert_selection(hf_model):
    """Guard that the fixture's correction bias really moves top-k choices (so parity exercises it)."""
    gate = hf_model.model.layers[1].mlp.gate
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(2))
    _, _, idx_biased = gate(x)
    saved = gate.e_score_correction_bias.clone()
    try:
        gate.e_score_correction_bias.zero_()
        _, _, idx_plain = gate(x)
    finally:
        gate.e_score_correction_bias.copy_(saved)
    changed = (idx_biased.sort(-1).values != idx_plain.sort(-1).values).any(-1).float().mean().item()
    assert changed > 0.2


def test_load_from_hf_matches_transformers_fp64(hf_model, hf_dir, ids):
    ref = hf_logits(copy.deepcopy(hf_model).double(), ids)
    model, _ = load_from_hf(hf_dir, dtype=torch.float64)
    assert_logits_close(our_logits(model, ids), ref, 1e-10)


def test_save_to_hf_loads_in_transformers(hf_model, hf_dir, ids, tmp_path):
    model, cfg = load_from_hf(hf_dir)
    ours = our_logits(model, ids)
    out = save_to_hf(model, cfg, tmp_path / "export")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # Released checkpoint layout on disk: per-expert Linear weights, separate convs, A_log [1,1,H,1].
    disk = load_file(str(out / "model.safetensors"))
    assert disk["model.layers.1.block_sparse_moe.experts.7.w2.weight"].shape == (128, 64)
    assert disk["model.layers.0.self_attn.A_log"].shape == (1, 1, 2, 1)
    assert "model.layers.0.mlp.gate_proj.weight" in disk and "model.layers.0.self_attn.q_conv1d.weight" in disk

    back = KimiLinearForCausalLM.from_pretrained(out, experts_implementation="eager").eval()
    ref_sd, back_sd = hf_model.state_dict(), back.state_dict()
    assert set(back_sd) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(back_sd[k], v), k
    assert_logits_close(ours, hf_logits(back, ids), 1e-4)


def test_state_dict_layouts_round_trip(hf_model):
    cfg = config_from_hf(hf_model.config)
    runtime_sd = hf_model.state_dict()
    ours = state_dict_from_hf(runtime_sd, cfg)  # transformers runtime layout in
    back = state_dict_to_hf(ours, cfg, layout="transformers")
    assert set(back) == set(runtime_sd)
    assert all(torch.equal(back[k], v) for k, v in runtime_sd.items())
    disk = state_dict_to_hf(ours, cfg)  # checkpoint layout
    again = state_dict_from_hf(disk, cfg)
    assert set(again) == set(ours) and all(torch.equal(again[k], v) for k, v in ours.items())


def test_tied_embeddings_round_trip(ids, tmp_path):
    """transformers' KimiLinear never ties lm_head to the embedding, so a tied model exports both tensors."""
    from attnres_train.model import build_model

    cfg = dataclasses.replace(config_from_hf(tiny_hf_config()), tie_word_embeddings=True)
    torch.manual_seed(4)
    model = build_model(cfg).eval()
    ours = our_logits(model, ids)
    save_to_hf(model, cfg, tmp_path / "tied")
    hf = KimiLinearForCausalLM.from_pretrained(tmp_path / "tied", experts_implementation="eager").eval()
    assert hf.config.tie_word_embeddings
    assert_logits_close(ours, hf_logits(hf, ids), 1e-4)
    back, back_cfg = load_from_hf(tmp_path / "tied")
    assert back_cfg.tie_word_embeddings and back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(our_logits(back, ids), ours)


# ------------------------------------------------------------------------------------------ AttnRes
@pytest.fixture(scope="module")
def hf_dir_tiny_eps(tmp_path_factory):
    model = random_hf_model(1e-14, seed=3)
    path = tmp_path_factory.mktemp("hf_tiny_eps")
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize(
    "overrides",
    [
        {"residual": {"mode": "block", "num_blocks": 2}},  # nested override
        {"residual.mode": "full"},  # dotted override
    ],
    ids=["block2", "full"],
)
def test_attnres_with_zero_queries_matches_prenorm(hf_dir_tiny_eps, ids, overrides):
    # Zero pseudo-queries give a uniform average over the n sources, i.e. the PreNorm stream divided by n;
    # the next RMSNorm removes the 1/n only up to its eps: rsqrt(ms/n^2 + eps) vs rsqrt(ms + eps), a relative
    # change of about n^2*eps/(2*ms). Hence the tiny rms_norm_eps: with an O(1) stream (ms ~ 1) and up to
    # n = 9 sources (full mode), eps=1e-12 would already cost ~4e-11 (measured 1e-10 on the logits, too close
    # to the tolerance); eps=1e-14 keeps it near 1e-12.
    hf_model, path = hf_dir_tiny_eps
    ref = hf_logits(copy.deepcopy(hf_model).double(), ids)
    model, cfg = load_from_hf(path, dtype=torch.float64, **overrides)
    assert cfg.residual.mode in ("block", "full") and cfg.rms_norm_eps == 1e-14
    sd = model.state_dict()
    queries = [k for k in sd if k.endswith("_res_proj.weight")]
    assert len(queries) == 2 * cfg.num_layers + 1
    assert all(not sd[k].any() for k in queries)
    assert all(torch.equal(sd[k.replace("_proj.", "_norm.")], torch.ones(128, dtype=torch.float64)) for k in queries)
    assert_logits_close(our_logits(model, ids), ref, 1e-10)


def test_save_to_hf_native_refuses_attnres(hf_dir, tmp_path):
    """The native format cannot express AttnRes (the default, fmt="auto", writes the remote-code format)."""
    model, cfg = load_from_hf(hf_dir, residual={"mode": "block", "block_size": 2})
    with pytest.raises(UserInputError, match="trust_remote_code"):
        save_to_hf(model, cfg, tmp_path / "x", fmt="native")
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------------------- CLI
def test_cli_round_trip(hf_model, hf_dir, ids, tmp_path, capsys):
    ours, back = tmp_path / "ours", tmp_path / "hf"
    assert convert_main(["from-hf", str(hf_dir), str(ours)]) == 0
    assert sorted(p.name for p in ours.iterdir()) == ["model.safetensors", "model_config.yaml"]
    assert convert_main(["to-hf", str(ours), str(back)]) == 0
    reloaded = KimiLinearForCausalLM.from_pretrained(back, experts_implementation="eager").eval()
    ref_sd = hf_model.state_dict()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ref_sd.items())

    # A non-empty DST is refused (nothing touched) unless --overwrite.
    before = (back / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert convert_main(["to-hf", str(ours), str(back)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert (back / "model.safetensors").stat().st_mtime_ns == before
    assert convert_main(["to-hf", str(ours), str(back), "--overwrite"]) == 0

    # Import straight into Block AttnRes; such a checkpoint cannot go back to *native* HF (clean error), the
    # default format is the trust_remote_code one (tests/interop/test_hf_remote.py).
    block = tmp_path / "block"
    assert convert_main(["from-hf", str(hf_dir), str(block), "--residual-mode", "block", "--num-blocks", "2"]) == 0
    assert "mode: block" in (block / "model_config.yaml").read_text()
    assert load_file(str(block / "model.safetensors"))["model.output_attn_res_proj.weight"].abs().sum() == 0
    capsys.readouterr()
    assert convert_main(["to-hf", str(block), str(tmp_path / "nope"), "--format", "native"]) == 2
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and "Traceback" not in err
    assert not (tmp_path / "nope").exists()
    assert convert_main(["to-hf", str(block), str(tmp_path / "remote")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert json.loads((tmp_path / "remote" / "config.json").read_text())["model_type"] == "kimi_linear_attnres"


# -------------------------------------------------------------------------------------- bad inputs
def _copy_hf_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path: Path, key: str, value) -> None:
    sd = load_file(str(path / "model.safetensors"))
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def _missing_dir(d: Path) -> Path:
    return d / "does-not-exist"


def _no_config(d: Path) -> Path:
    (d / "config.json").unlink()
    return d


def _not_kimi(d: Path) -> Path:
    _edit_config(d, model_type="llama")
    return d


def _q_lora(d: Path) -> Path:
    _edit_config(d, q_lora_rank=32)
    return d


def _shape_mismatch(d: Path) -> Path:
    _edit_weights(d, "model.layers.1.self_attn.q_proj.weight", torch.zeros(65, 128))
    return d


def _missing_tensor(d: Path) -> Path:
    _edit_weights(d, "model.layers.3.self_attn.kv_b_proj.weight", None)
    return d


BAD_INPUTS = {  # case -> (make the bad source from a copy of a good HF dir, text the error must contain)
    "missing_dir": (_missing_dir, "no such directory"),
    "no_config": (_no_config, "missing config.json"),
    "not_kimi": (_not_kimi, "model_type is 'llama'"),
    "q_lora": (_q_lora, "q_lora_rank"),
    "shape_mismatch": (_shape_mismatch, "'model.layers.1.self_attn.q_proj.weight' has shape (65, 128)"),
    "missing_tensor": (_missing_tensor, "missing tensor 'model.layers.3.self_attn.kv_b_proj.weight'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_clear_error(case, hf_dir, tmp_path, capsys):
    make, expected = BAD_INPUTS[case]
    src = make(_copy_hf_dir(hf_dir, tmp_path / "src"))
    with pytest.raises(UserInputError) as info:
        load_from_hf(src)
    assert expected in str(info.value)

    dst = tmp_path / "dst"
    capsys.readouterr()
    assert convert_main(["from-hf", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not dst.exists()
