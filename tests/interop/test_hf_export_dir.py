"""`attnres-convert to-hf` of a training checkpoint is a normal Hugging Face model directory.

Held here: the run's tokenizer is in it (the byte tokenizer, and a BPE tokenizer directory) and loads with
AutoTokenizer, giving the ids training used; ``generate()`` stops at the EOS (the model is built to always
predict EOS: a large constant in embedding column 0 and a head whose only non-zero entry is EOS x column 0,
so the EOS logit is ~ +sqrt(d) and every other logit is exactly 0); every file is 0644 under umask 022; the
README model card names the model, the training step and tokens, and carries the run's config; the
remote code's generate() raises no deprecation warning on the installed transformers.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnres_train.checkpoint import CheckpointManager  # noqa: E402
from attnres_train.cli.convert import main as convert_main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TEXT = "héllo wörld\tdef alpha_beta(x):\n    return x + 1 🙂"


def _tiny_cfg(mode: str):
    from omegaconf import OmegaConf

    from attnres_train.config.model import as_model_config, validate_model_config

    raw = OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml")
    raw.residual = {"mode": mode, "num_blocks": 2 if mode == "block" else None, "block_size": None}
    return validate_model_config(as_model_config(raw))


def _eos_run(root: Path, mode: str, tokenizer: str, eos: int) -> Path:
    """A run dir with one checkpoint of a model that predicts ``eos`` after any prefix, and a metrics.jsonl."""
    from omegaconf import OmegaConf
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from attnres_train.model import build_model

    cfg = _tiny_cfg(mode)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 100.0  # the final hidden state's column 0 is large and positive
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0] = 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model_sd, optim_sd = get_state_dict(model, [opt])
    text = OmegaConf.to_yaml(
        OmegaConf.create(
            {
                "model": OmegaConf.to_container(OmegaConf.structured(cfg)),
                "data": {"tokenizer": tokenizer, "seq_len": 64},
            }
        )
    )
    run = root / "run"
    CheckpointManager(run / "checkpoints", keep_last=0).save(
        7, {"model": model_sd, "optim": optim_sd}, config_text=text, meta={"tokens_seen": 3584, "data": {}}
    )
    records = [
        {"kind": "train", "step": 7, "loss": 2.5, "tokens_seen": 3584},
        {"kind": "val", "step": 7, "val_loss": 2.75},
        {"kind": "train", "step": 9, "loss": 9.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _export(run: Path, out: Path) -> None:
    old = os.umask(0o022)
    try:
        assert convert_main(["to-hf", str(run), str(out)]) == 0
    finally:
        os.umask(old)


def _check_modes_and_card(out: Path, model_name: str) -> None:
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f.name, oct(f.stat().st_mode))
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"# {model_name}" in card and "| optimizer steps | 7 |" in card and "| tokens seen | 3,584 |" in card
    assert "| last training loss | 2.5000 |" in card and "| last validation loss | 2.7500 |" in card  # not step 9
    assert "```yaml\nmodel:\n  name: tiny" in card


def test_byte_tokenizer_export_generates_until_eos(tmp_path, capfd):
    out = tmp_path / "hf"
    _export(_eos_run(tmp_path, "block", "byte", eos=256), out)
    names = {f.name for f in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"} <= names, names
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["bos_token_id"], gen["pad_token_id"]) == (256, 256, 257)
    _check_modes_and_card(out, "tiny")

    # AttnRes exports carry remote code, which transformers' AutoTokenizer reads (config.json) before the
    # tokenizer: it needs trust_remote_code like the model. The tokenizer itself is plain: no remote code.
    tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    plain = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    expected = list(TEXT.encode("utf-8"))  # the byte tokenizer's ids: the UTF-8 bytes
    assert tok(TEXT)["input_ids"] == expected and plain(TEXT)["input_ids"] == expected
    assert tok.decode(expected + [256]) == TEXT + "<|endoftext|>"
    assert (tok.eos_token_id, tok.pad_token_id) == (256, 257)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    prompt = tok("def ", return_tensors="pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seq = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0].tolist()
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecated == []  # e.g. the cache argument renamed in transformers 5.24
    n = prompt["input_ids"].shape[1]
    assert seq[:n] == list(b"def ") and seq[n:] == [256], seq  # one new token, the EOS, then it stopped


def test_bpe_tokenizer_native_export_loads_without_remote_code(tmp_path, capfd):
    from tokenizers import Tokenizer

    from attnres_train.data.tokenizer import train_bpe_tokenizer

    bpe = tmp_path / "bpe"
    words = "alpha beta gamma delta kernel block residual query key value softmax".split()
    train_bpe_tokenizer((" ".join(words[i:] + words[:i]) for i in range(200)), 300, str(bpe))
    eos = Tokenizer.from_file(str(bpe / "tokenizer.json")).token_to_id("<|endoftext|>")
    out = tmp_path / "hf"
    _export(_eos_run(tmp_path, "prenorm", str(bpe), eos=eos), out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "kimi_linear"
    _check_modes_and_card(out, "tiny")

    capfd.readouterr()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))  # no trust_remote_code anywhere
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert "custom code" not in "".join(capfd.readouterr())
    raw = Tokenizer.from_file(str(bpe / "tokenizer.json"))
    text = "alpha beta kernel query"
    assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    assert tok.eos_token_id == eos
    prompt = tok(text, return_tensors="pt")
    seq = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0].tolist()
    assert seq[prompt["input_ids"].shape[1] :] == [eos], seq
