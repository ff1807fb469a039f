"""The trust_remote_code export of AttnRes models: transformers loads it, reproduces our logits and generates.

What is proven here (tiny random models, CPU, no network):
* ``save_to_hf`` of a Block (num_blocks / uneven block_size) or Full AttnRes model, with random non-zero
  pseudo-queries and router correction biases, loads with ``AutoModelForCausalLM.from_pretrained(dir,
  trust_remote_code=True)`` and gives our logits (fp32 1e-4; fp64 1e-10, i.e. the same function);
* its cached decoding (prefill, single tokens, a multi-token chunk) equals the full forward, and
  ``generate()`` (greedy) equals our model's greedy continuation; sampling runs;
* importing the export back (``load_from_hf``) is bit-exact; bf16 + sharded exports load;
* the shipped files are self-contained (no ``attnres_train`` import) and config.json carries ``auto_map``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from packaging.version import Version

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from attnres_train.config.errors import UserInputError  # noqa: E402
from attnres_train.interop import load_from_hf, save_to_hf  # noqa: E402
from attnres_train.interop.hf_remote import REMOTE_DIR, REMOTE_FILES  # noqa: E402
from tests.interop.helpers import MODES, random_model  # noqa: E402

VOCAB, T = 1024, 40


def load_remote(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=sorted(MODES))
def exported(request, tmp_path_factory):
    model, cfg = random_model(MODES[request.param])
    path = tmp_path_factory.mktemp(f"remote_{request.param}")
    save_to_hf(model, cfg, path)
    return model, cfg, path


def test_remote_export_matches_our_logits(exported, ids):
    model, cfg, path = exported
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "kimi_linear_attnres" and raw["attnres_mode"] == cfg.residual.mode
    assert raw["auto_map"]["AutoModelForCausalLM"] == "modeling_attnres.KimiLinearAttnResForCausalLM"
    assert all((path / f).is_file() for f in REMOTE_FILES)
    hf = load_remote(path)
    with torch.no_grad():
        err = (hf(ids).logits - model(ids)).abs().max().item()
    assert err < 1e-4, err


def test_remote_export_fp64_is_the_same_function(exported, ids):
    model, _, path = exported
    hf = load_remote(path, dtype=torch.float64)
    assert hf.dtype == torch.float64
    with torch.no_grad():
        err = (hf(ids).logits - model.double()(ids)).abs().max().item()
    model.float()
    assert err < 1e-10, err


def test_remote_reimport_is_bit_exact(exported):
    model, cfg, path = exported
    back, back_cfg = load_from_hf(path)
    assert back_cfg.residual == cfg.residual and back_cfg.num_layers == cfg.num_layers
    ref = model.state_dict()
    assert set(back.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())
    with pytest.raises(UserInputError, match="keeps its own residual mode"):
        load_from_hf(path, **{"residual.mode": "full"})


# transformers 5.24 renamed the cache argument/output `past_key_values` -> `cache` (the old name is deprecated)
CACHE_KW = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def test_cached_decoding_and_generate(exported, ids):
    model, _, path = exported
    hf = load_remote(path, dtype=torch.float64)
    x = ids[:1]
    with torch.no_grad():
        full = hf(x, use_cache=False).logits
        out = hf(x[:, :20], use_cache=True)  # prefill
        steps, cache = [out.logits], out[CACHE_KW]
        for t in range(20, 25):  # one token at a time (recurrent KDA, cached MLA keys)
            out = hf(x[:, t : t + 1], use_cache=True, **{CACHE_KW: cache})
            steps.append(out.logits)
            cache = out[CACHE_KW]
        out = hf(x[:, 25:], use_cache=True, **{CACHE_KW: cache})  # a multi-token chunk after the cache
        steps.append(out.logits)
    assert out[CACHE_KW] is cache and cache.get_seq_length() == T  # updated in place
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-10

    hf32 = load_remote(path)
    prompt = ids[:1, :8]
    gen = hf32.generate(prompt, max_new_tokens=8, do_sample=False)
    ref = prompt
    with torch.no_grad():
        for _ in range(8):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(gen, ref)
    sampled = hf32.generate(ids[:, :5], max_new_tokens=4, do_sample=True, top_k=20)
    assert sampled.shape == (2, 9) and int(sampled.max()) < VOCAB


def test_bf16_sharded_export_loads(tmp_path, ids):
    model, cfg = random_model(MODES["block2"], seed=3)
    save_to_hf(model, cfg, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "bf16" / s).is_file() for s in shards)
    disk = {}
    for s in shards:
        disk.update(load_file(str(tmp_path / "bf16" / s)))
    assert disk["model.layers.1.block_sparse_moe.gate.e_score_correction_bias"].dtype == torch.float32
    assert disk["model.layers.1.self_attention_res_proj.weight"].dtype == torch.bfloat16
    assert AutoConfig.from_pretrained(tmp_path / "bf16", trust_remote_code=True).dtype == torch.bfloat16
    hf = load_remote(tmp_path / "bf16", dtype=torch.float32)
    with torch.no_grad():
        err = (hf(ids).logits - model(ids)).abs().max().item()
    assert err < 0.5  # bf16 weights: rounding only (a wrong mapping gives O(10))


def test_prenorm_can_use_remote_format(tmp_path, ids):
    model, cfg = random_model({"mode": "prenorm"}, seed=5)
    save_to_hf(model, cfg, tmp_path / "pre", fmt="remote")
    hf = load_remote(tmp_path / "pre")
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_shipped_files_are_self_contained():
    for name in REMOTE_FILES:
        text = (REMOTE_DIR / name).read_text()
        assert "attnres_train" not in text.replace("attnres-train", ""), name
        assert len(text.splitlines()) <= 500
    assert Path(REMOTE_DIR / "modeling_attnres.py").read_text().count("from .configuration_attnres import") == 1
